"""A CPU stand-in for the parts of vLLM's API that ``onepass.train.rollout_vllm`` uses (vLLM itself runs on
GPUs only): ``LLM(model=..., ...)`` loading a local HF model, ``generate`` on token-id prompts with
``SamplingParams(n, temperature, top_p, top_k, max_tokens, logprobs)`` returning request outputs whose
samples' ``token_ids`` end with the EOS token when they stop on it and whose ``logprobs`` hold the sampled
token's log-prob after temperature, ``llm_engine.model_executor.driver_worker.model_runner.model.load_weights``
and ``reset_prefix_cache``.  It checks the argument values vLLM would reject, and records every call so the
tests can see what the engine asked for."""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    logprobs: int | None = None

    def __post_init__(self):
        assert self.n >= 1 and self.temperature > 0 and 0 < self.top_p <= 1 and self.max_tokens >= 1
        assert self.top_k == -1 or self.top_k >= 1, "vLLM: top_k is -1 (off) or >= 1"


@dataclass
class Logprob:
    logprob: float


class _RunnerModel:
    def __init__(self, llm):
        self.llm = llm

    def load_weights(self, weights):
        state = self.llm.model.state_dict()
        for name, value in weights:
            assert name in state, f"unknown weight {name}"
            state[name].copy_(value)
        self.llm.calls.append("load_weights")


class LLM:
    instances: list["LLM"] = []

    def __init__(self, model: str, dtype: str, seed: int, gpu_memory_utilization: float, max_model_len,
                 logprobs_mode: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert 0 < gpu_memory_utilization <= 1 and logprobs_mode == "processed_logprobs"
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        self.eos = AutoTokenizer.from_pretrained(model).eos_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list = []
        runner = types.SimpleNamespace(model=_RunnerModel(self))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))
        LLM.instances.append(self)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    @torch.no_grad()
    def _sample(self, prompt: list[int], sp: SamplingParams):
        ids, token_ids, logprobs = torch.tensor([prompt]), [], []
        for _ in range(sp.max_tokens):
            logits = self.model(ids).logits[0, -1].float() / sp.temperature
            if sp.top_k > 0:
                logits[logits < logits.topk(sp.top_k).values[-1]] = float("-inf")
            logp = torch.log_softmax(logits, -1)
            tok = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
            token_ids.append(tok)
            logprobs.append({tok: Logprob(float(logp[tok]))})
            if tok == self.eos:
                break
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
        return types.SimpleNamespace(token_ids=token_ids, logprobs=logprobs if sp.logprobs is not None else None)

    def generate(self, prompts, sampling_params: SamplingParams, use_tqdm: bool = True):
        self.calls.append(("generate", len(prompts), sampling_params))
        return [types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                      outputs=[self._sample(p["prompt_token_ids"], sampling_params)
                                               for _ in range(sampling_params.n)])
                for p in prompts]


def module() -> types.ModuleType:
    """A ``vllm`` module object to put in ``sys.modules``."""
    m = types.ModuleType("vllm")
    m.LLM, m.SamplingParams = LLM, SamplingParams
    LLM.instances = []
    return m
