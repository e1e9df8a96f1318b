"""Family ``logprobs``: ``onepass.token_logprobs(logits, targets, return_entropy=True)`` (logits input)."""
from __future__ import annotations

import onepass
from onepass import reference

from .registry import CPU_VOCABS, CUDA_VOCABS, QUICK_VOCABS, Floor, family, itemsize, onepass_backend, randn, \
    targets


def make_inputs(shape, dtype, device, gen):
    n, v = shape["N"], shape["V"]
    return {"logits": randn((n, v), dtype, device, gen, scale=2.0), "targets": targets(n, v, device, gen)}


def run_onepass(x):
    return onepass.token_logprobs(x["logits"], x["targets"], return_entropy=True, backend=onepass_backend())


def run_naive(x):
    return reference.token_logprobs(x["logits"], x["targets"], return_entropy=True)


TRL_SEQ_LEN = 256


def trl_logprobs_entropy(logits, targets):
    """TRL's log-softmax gather and entropy (``selective_log_softmax_and_entropy``) called as a TRL trainer
    calls it: logits [B, T, V] of sequences of ``TRL_SEQ_LEN`` tokens (its float32 path loops over the B
    sequences), ignored positions (-100) as masked rows."""
    from trl.trainer.utils import selective_log_softmax_and_entropy

    n, v = logits.shape
    t = TRL_SEQ_LEN if n % TRL_SEQ_LEN == 0 else n
    keep = (targets != -100).view(-1, t)
    logp, ent = selective_log_softmax_and_entropy(logits.view(-1, t, v), targets.clamp_min(0).view(-1, t),
                                                  row_mask=keep)
    return logp.reshape(n), ent.reshape(n)


def run_trl(x):
    return trl_logprobs_entropy(x["logits"], x["targets"])


def run_liger(x):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(reduction="none")(x["logits"], x["targets"])   # = -logp, no entropy


def floor(shape, dtype, pass_, variant):
    n, v, s = shape["N"], shape["V"], itemsize(dtype)
    fwd = n * v * s + n * 8 + 2 * n * 4                 # read logits + targets, write logp + entropy
    bwd = n * v * s + n * v * s + 2 * n * 4             # read logits again + write dlogits (+ upstream)
    return Floor(bytes=fwd + (bwd if pass_ == "fwd+bwd" else 0), label="HBM")


FAMILIES = [family(
    "logprobs", op="token_logprobs", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive, "trl": run_trl, "liger": run_liger},
    shapes={"cpu": [{"N": 4096, "V": v} for v in CPU_VOCABS],
            "cuda": [{"N": 16384, "V": v} for v in CUDA_VOCABS],
            "quick": [{"N": 64, "V": v} for v in QUICK_VOCABS]},
    default={"cpu": {"N": 256, "V": 32000}, "cuda": {"N": 16384, "V": 151936}},
    order=10,
    grad_inputs=("logits",), floor=floor,
    notes={"liger": "LigerCrossEntropyLoss(reduction='none'): -logp only, no entropy",
           "trl": "trl selective_log_softmax_and_entropy on [B, 256, V] (logp, entropy; ignored rows masked)"},
)]
