"""Families ``trl_logprobs`` and ``trl_grpo_forward``: onepass inside TRL (``onepass.integrations.trl``).

``trl_logprobs``: the per-token log-prob + entropy op a TRL trainer calls on [N, D] hidden states and the
[V, D] head: onepass (``OnepassLogProbFunction``, what the patch installs), naive (logits materialized,
``onepass.reference``) and ``trl`` (``trl.kernels.ChunkedLogProbFunction``, TRL 1.16's default).

``trl_grpo_forward``: the model part of one GRPO training step: a 1-layer Qwen2 backbone (hidden D,
vocabulary V, untied head) called as GRPOTrainer calls it, ``model(input_ids, attention_mask, labels,
fused_lm_head=True)``, giving per-token log-probs and entropies of the completion, then backward through
the head and the backbone.  onepass = TRL's fused head patched with onepass; ``trl`` = TRL's own chunked
head; naive = the model's original forward (full [B, T, V] logits) + log_softmax / entropy.  Generation and
the optimizer step are the same for all three and left out.  verl's fused function is not a provider: its
package imports Ray (see docs/integrations/verl.md).
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch

from onepass import reference

from .registry import family, randn, targets

OUTPUTS = ("log_probs", "entropy")


def make_head_inputs(shape, dtype, device, gen):
    n, d, v = shape["N"], shape["D"], shape["V"]
    return {"hidden": randn((n, d), dtype, device, gen),
            "weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "targets": targets(n, v, device, gen, ignore_frac=0.0)}


def run_head_onepass(x):
    from onepass.integrations.trl import OnepassLogProbFunction

    return OnepassLogProbFunction.apply(x["hidden"], x["weight"], None, x["targets"], 1.0, None, None, 1.0,
                                        OUTPUTS)[:2]


def run_head_trl(x):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    return ChunkedLogProbFunction.apply(x["hidden"], x["weight"], None, x["targets"], 1.0,
                                        _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, OUTPUTS)[:2]


def run_head_naive(x):
    return reference.linear_token_logprobs(x["hidden"], x["weight"], x["targets"], return_entropy=True)


def make_model_inputs(shape, dtype, device, gen):
    """A tiny Qwen2 (hidden D, vocabulary V) with TRL's fused head added, and a [B, T] batch whose last
    T // 2 positions are the completion.  N = B·(T − 1) scored positions."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    b, t, d, v = shape["B"], shape["T"], shape["D"], shape["V"]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=device)))
    config = Qwen2Config(vocab_size=v, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1,
                         num_attention_heads=max(1, d // 64), num_key_value_heads=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=getattr(torch, dtype))
    add_fused_lm_head(model, outputs=OUTPUTS)
    input_ids = torch.randint(0, v, (b, t), generator=gen, device=device)
    labels = input_ids.clone()
    labels[:, : t - t // 2] = -100
    return {"model": model, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": labels}


@contextmanager
def _onepass_head():
    import onepass.integrations.trl as onepass_trl
    import trl.trainer.utils as trl_utils

    original = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = onepass_trl.OnepassLogProbFunction
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = original


def _fused_forward(x):
    model = x["model"]
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=x["labels"],
                fused_lm_head=True)
    return out.log_probs.reshape(-1), out.entropy.reshape(-1)


def run_model_onepass(x):
    with _onepass_head():
        return _fused_forward(x)


def run_model_trl(x):
    return _fused_forward(x)


def run_model_naive(x):
    model = x["model"]
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[:, :-1]
    return reference.token_logprobs(logits, x["labels"][:, 1:], return_entropy=True)


# Every provider (onepass included) runs inside TRL: without trl installed these families are not listed.
FAMILIES = [] if importlib.util.find_spec("trl") is None else [
    family("trl_logprobs", op="trl ChunkedLogProbFunction", make_inputs=make_head_inputs,
           providers={"onepass": run_head_onepass, "naive": run_head_naive, "trl": run_head_trl},
           shapes={"cpu": [{"N": 1024, "D": 256, "V": 151936}],
                   "cuda": [{"N": 16384, "D": 4096, "V": 151936}],
                   "quick": [{"N": 64, "D": 32, "V": 512}]},
           default={"cpu": {"N": 128, "D": 256, "V": 32000}},
           grad_inputs=("hidden", "weight"), order=90,
           notes={"trl": "trl.kernels.ChunkedLogProbFunction (TRL 1.16 default head), log-probs + entropy"}),
    family("trl_grpo_forward", op="GRPO model fwd(+bwd)", make_inputs=make_model_inputs,
           providers={"onepass": run_model_onepass, "naive": run_model_naive, "trl": run_model_trl},
           shapes={"cpu": [{"N": 8 * 127, "B": 8, "T": 128, "D": 256, "V": 151936}],
                   "cuda": [{"N": 16 * 1023, "B": 16, "T": 1024, "D": 256, "V": 151936}],
                   "quick": [{"N": 4 * 15, "B": 4, "T": 16, "D": 32, "V": 512}]},
           default={"cpu": {"N": 2 * 63, "B": 2, "T": 64, "D": 256, "V": 32000}},
           grad_inputs=(), order=91,
           notes={"trl": "GRPOTrainer's default: TRL's fused head (ChunkedLogProbFunction)",
                  "naive": "the model's own forward: full [B, T, V] logits"}),
]
