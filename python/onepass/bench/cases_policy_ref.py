"""Family ``policy_ref``: ``onepass.linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, targets)``
-> logp, ref_logp, entropy and the exact full-vocabulary KL, both LM heads in one sweep (no grad to the
reference)."""
from __future__ import annotations

import onepass
from onepass import reference

from .registry import CPU_VOCABS, CUDA_VOCABS, QUICK_VOCABS, Floor, family, linear_gemms, onepass_backend, \
    randn, targets


def make_inputs(shape, dtype, device, gen):
    n, d, v = shape["N"], shape["D"], shape["V"]
    return {"hidden": randn((n, d), dtype, device, gen),
            "weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "ref_hidden": randn((n, d), dtype, device, gen),
            "ref_weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "targets": targets(n, v, device, gen)}


def _args(x):
    return x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["targets"]


def run_onepass(x):
    return onepass.linear_policy_ref_stats(*_args(x), backend=onepass_backend())


def run_naive(x):
    return reference.linear_policy_ref_stats(*_args(x))


def floor(shape, dtype, pass_, variant):
    n, d, v = shape["N"], shape["D"], shape["V"]
    return Floor(gemms=linear_gemms(n, d, v, pass_) + linear_gemms(n, d, v, pass_, grad=False), label="GEMM")


FAMILIES = [family(
    "policy_ref", op="linear_policy_ref_stats", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive},
    shapes={"cpu": [{"N": 1024, "D": 256, "V": v} for v in CPU_VOCABS],
            "cuda": [{"N": 16384, "D": 4096, "V": v} for v in CUDA_VOCABS],
            "quick": [{"N": 64, "D": 32, "V": v} for v in QUICK_VOCABS]},
    default={"cpu": {"N": 128, "D": 256, "V": 32000}, "cuda": {"N": 16384, "D": 4096, "V": 151936}},
    order=50,
    grad_inputs=("hidden", "weight"), floor=floor,
)]
