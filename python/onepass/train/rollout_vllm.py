"""Rollouts with vLLM (``rollout.engine: vllm``; optional, GPU only), colocated with the trainer.

The engine is built once from the initial model directory (same architecture and tokenizer as the
policy), and before the first generation after each optimizer update (``policy_updated``) it loads the policy's current
weights into vLLM's model (``load_weights``, as TRL's colocate mode does) and resets its prefix cache, so
samples always come from the policy being trained.  It returns the same ``Rollout`` layout as the HF
engine (``rollout.generate``): left-padded prompt ids from the same tokenizer call, completions padded
after their end, the completion mask up to and including the first EOS.  vLLM's own log-probs of the
sampled tokens (after temperature / top-p / top-k, ``logprobs_mode="processed_logprobs"``) are kept in
``extras["sampling_logp"]`` [N, C] for off-policy corrections; the loss's old log-probs still come from
``onepass.linear_token_logprobs`` on the trainer's model, with the model's logit soft-cap and scale (vLLM's
logits processor applies the same ``final_logit_softcapping`` / logit scale, so both are log-probs of one
distribution up to numerics and top-p / top-k).
"""
from __future__ import annotations

import torch

from .config import ConfigError, RolloutConfig
from .rollout import Rollout, completion_mask


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ConfigError("rollout.engine: vllm needs the vllm package (pip install vllm; it runs on GPUs "
                          f"only): {e}") from e
    return vllm


class VLLMEngine:
    """One colocated ``vllm.LLM`` per process; ``generate`` has the signature of ``rollout.generate``."""

    def __init__(self, model_path: str, cfg: RolloutConfig, *, seed: int, dtype: str):
        vllm = _import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(model=str(model_path), dtype=dtype, seed=seed,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                            max_model_len=cfg.vllm_max_model_len or None, logprobs_mode="processed_logprobs")
        self._stale = True             # vLLM's weights differ from the policy's (sync before the next generate)

    def policy_updated(self) -> None:
        """Called by the trainer after each optimizer update of the policy."""
        self._stale = True

    def sync_weights(self, model) -> None:
        """Load ``model``'s parameters into vLLM's copy (names as in the HF state dict)."""
        runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        runner_model.load_weights((name, p.detach()) for name, p in model.state_dict().items())
        self.llm.reset_prefix_cache()

    def _sampling_params(self, cfg: RolloutConfig):
        return self._vllm.SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                         top_k=cfg.top_k if cfg.top_k > 0 else -1, max_tokens=cfg.max_new_tokens,
                                         logprobs=0)

    @torch.no_grad()
    def generate(self, model, tokenizer, texts: list[str], columns: dict[str, list], cfg: RolloutConfig) -> Rollout:
        """``num_generations`` samples per prompt from vLLM, with ``model``'s current weights."""
        if self._stale:
            self.sync_weights(model)
            self._stale = False
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=True)
        prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(enc["input_ids"], enc["attention_mask"])]
        outputs = self.llm.generate(prompts, sampling_params=self._sampling_params(cfg), use_tqdm=False)
        samples = [o for request in outputs for o in request.outputs]
        g = cfg.num_generations
        if len(samples) != len(texts) * g:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for {len(texts)} prompts × {g} generations")
        c = max(1, max(len(s.token_ids) for s in samples))
        comp = torch.full((len(samples), c), tokenizer.pad_token_id, dtype=torch.long)
        sampling_logp = torch.zeros((len(samples), c), dtype=torch.float32)
        for i, s in enumerate(samples):
            comp[i, :len(s.token_ids)] = torch.tensor(list(s.token_ids), dtype=torch.long)
            if s.logprobs is not None:
                sampling_logp[i, :len(s.token_ids)] = torch.tensor(
                    [step[tok].logprob for step, tok in zip(s.logprobs, s.token_ids)], dtype=torch.float32)
        # Positions past a sample's length are padding even when the pad token is not EOS.
        ended = torch.arange(c)[None, :] >= torch.tensor([len(s.token_ids) for s in samples])[:, None]
        cmask = completion_mask(comp, tokenizer.eos_token_id).masked_fill(ended, 0.0)
        device = next(model.parameters()).device
        ids = torch.cat([enc["input_ids"].repeat_interleave(g, 0), comp], 1).to(device)
        am = torch.cat([enc["attention_mask"].repeat_interleave(g, 0), cmask.long()], 1).to(device)
        completions = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(comp, cmask)]
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
        return Rollout(ids, am, cmask.to(device), enc["input_ids"].shape[1], rep(texts), completions,
                       {k: rep(v) for k, v in columns.items()}, {"sampling_logp": (sampling_logp * cmask).to(device)})
