"""Family ``divergence``: ``onepass.divergence(student_logits, teacher_logits, kind=...)`` (logits input),
kinds reverse_kl and jsd (beta=0.5); the gradient flows to the student only (frozen teacher)."""
from __future__ import annotations

import torch

import onepass
from onepass import reference

from .registry import CPU_VOCABS, CUDA_VOCABS, QUICK_VOCABS, Floor, family, itemsize, onepass_backend, randn, \
    targets

_LIGER_BETA = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": 0.5}


def make_inputs(shape, dtype, device, gen):
    n, v = shape["N"], shape["V"]
    return {"student": randn((n, v), dtype, device, gen, scale=2.0),
            "teacher": randn((n, v), dtype, device, gen, scale=2.0),
            "targets": targets(n, v, device, gen)}


def run_onepass(x, kind):
    return onepass.divergence(x["student"], x["teacher"], kind=kind, targets=x["targets"], backend=onepass_backend())


def run_naive(x, kind):
    return reference.divergence(x["student"], x["teacher"], kind=kind, targets=x["targets"])


def run_liger(x, kind):
    from liger_kernel.transformers import LigerJSD

    logp = torch.log_softmax(x["student"].float(), -1)
    logq = torch.log_softmax(x["teacher"].float(), -1)
    return LigerJSD(beta=_LIGER_BETA[kind])(logp, logq, x["targets"])      # scalar mean over tokens


def floor(shape, dtype, pass_, variant):
    n, v, s = shape["N"], shape["V"], itemsize(dtype)
    fwd = 2 * n * v * s + n * 8 + n * 4                 # read both logits + targets, write the divergence
    bwd = 2 * n * v * s + n * v * s + n * 4             # read both again + write dstudent (+ upstream)
    return Floor(bytes=fwd + (bwd if pass_ == "fwd+bwd" else 0), label="HBM")


FAMILIES = [family(
    "divergence", op="divergence", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive, "liger": run_liger},
    shapes={"cpu": [{"N": 4096, "V": v} for v in CPU_VOCABS],
            "cuda": [{"N": 16384, "V": v} for v in CUDA_VOCABS],
            "quick": [{"N": 64, "V": v} for v in QUICK_VOCABS]},
    default={"cpu": {"N": 128, "V": 32000}, "cuda": {"N": 16384, "V": 151936}},
    variants=[{"kind": "reverse_kl"}, {"kind": "jsd"}],
    order=30,
    grad_inputs=("student",), floor=floor,
    notes={"liger": "LigerJSD on log_softmax'ed fp32 inputs (materialized): scalar mean loss"},
)]
