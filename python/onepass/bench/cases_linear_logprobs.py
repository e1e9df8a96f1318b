"""Family ``linear_logprobs``: ``onepass.linear_token_logprobs(hidden, weight, targets, return_entropy=True)``.

naive = hidden @ weight.T materialized, then log_softmax + gather + entropy (``onepass.reference``).
"""
from __future__ import annotations

import onepass
from onepass import reference

from .cases_logprobs import trl_logprobs_entropy
from .registry import CPU_VOCABS, CUDA_VOCABS, QUICK_VOCABS, Floor, family, linear_gemms, onepass_backend, \
    randn, targets


def make_inputs(shape, dtype, device, gen):
    n, d, v = shape["N"], shape["D"], shape["V"]
    return {"hidden": randn((n, d), dtype, device, gen),
            "weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "targets": targets(n, v, device, gen)}


def run_onepass(x):
    return onepass.linear_token_logprobs(x["hidden"], x["weight"], x["targets"], return_entropy=True,
                                         backend=onepass_backend())


def run_naive(x):
    return reference.linear_token_logprobs(x["hidden"], x["weight"], x["targets"], return_entropy=True)


def run_trl(x):
    return trl_logprobs_entropy(x["hidden"] @ x["weight"].T, x["targets"])


def run_liger(x):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="none")(x["weight"], x["hidden"], x["targets"])  # -logp


def run_cce(x):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none")  # -logp


def floor(shape, dtype, pass_, variant):
    return Floor(gemms=linear_gemms(shape["N"], shape["D"], shape["V"], pass_),
                 label="4-GEMM" if pass_ == "fwd+bwd" else "GEMM")


FAMILIES = [family(
    "linear_logprobs", op="linear_token_logprobs", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive, "trl": run_trl, "liger": run_liger, "cce": run_cce},
    shapes={"cpu": [{"N": 4096, "D": 1024, "V": v} for v in CPU_VOCABS],
            "cuda": [{"N": 16384, "D": 4096, "V": v} for v in CUDA_VOCABS],
            "quick": [{"N": 64, "D": 32, "V": v} for v in QUICK_VOCABS]},
    default={"cpu": {"N": 256, "D": 512, "V": 32000}, "cuda": {"N": 16384, "D": 4096, "V": 151936}},
    compile_default=("fwd+bwd",),
    order=20,
    grad_inputs=("hidden", "weight"), floor=floor,
    notes={"trl": "logits materialized (hidden @ weight.T), then trl selective_log_softmax_and_entropy",
           "liger": "LigerFusedLinearCrossEntropyLoss(reduction='none'): -logp only, no entropy",
           "cce": "cut_cross_entropy.linear_cross_entropy(reduction='none'): -logp only, no entropy"},
)]
