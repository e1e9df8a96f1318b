"""Family ``linear_divergence``: ``onepass.linear_divergence(student_hidden, student_weight, teacher_hidden,
teacher_weight, kind="reverse_kl")``; the gradient flows to the student head only (frozen teacher).

CPU default shapes are smaller than ``linear_logprobs`` (two LM heads per call, 2-core budget)."""
from __future__ import annotations

import onepass
from onepass import reference

from .registry import CPU_VOCABS, CUDA_VOCABS, QUICK_VOCABS, Floor, family, linear_gemms, onepass_backend, \
    randn, targets

_LIGER_BETA = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": 0.5}


def make_inputs(shape, dtype, device, gen):
    n, d, v = shape["N"], shape["D"], shape["V"]
    return {"student_hidden": randn((n, d), dtype, device, gen),
            "student_weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "teacher_hidden": randn((n, d), dtype, device, gen),
            "teacher_weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "targets": targets(n, v, device, gen)}


def _args(x):
    return x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"]


def run_onepass(x, kind):
    return onepass.linear_divergence(*_args(x), kind=kind, targets=x["targets"], backend=onepass_backend())


def run_naive(x, kind):
    return reference.linear_divergence(*_args(x), kind=kind, targets=x["targets"])


def run_liger(x, kind):
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=_LIGER_BETA[kind])(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["targets"])


def liger_chunked_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kind):
    """Liger's chunked fused-linear distillation loss (``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``,
    torch + torch.compile) with the soft loss only; beta 1 = reverse KL, 0 = forward KL, 0.5 = JSD."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=_LIGER_BETA[kind])
    return loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets)


def run_liger_chunked(x, kind):
    return liger_chunked_jsd(*_args(x), x["targets"], kind)


def floor(shape, dtype, pass_, variant):
    n, d, v = shape["N"], shape["D"], shape["V"]
    g = linear_gemms(n, d, v, pass_) + linear_gemms(n, d, v, pass_, grad=False)
    return Floor(gemms=g, label="GEMM")


FAMILIES = [family(
    "linear_divergence", op="linear_divergence", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive, "liger-chunked": run_liger_chunked, "liger": run_liger},
    shapes={"cpu": [{"N": 1024, "D": 256, "V": v} for v in CPU_VOCABS],
            "cuda": [{"N": 16384, "D": 4096, "V": v} for v in CUDA_VOCABS],
            "quick": [{"N": 64, "D": 32, "V": v} for v in QUICK_VOCABS]},
    default={"cpu": {"N": 128, "D": 256, "V": 32000}, "cuda": {"N": 16384, "D": 4096, "V": 151936}},
    variants=[{"kind": "reverse_kl"}],
    order=40,
    grad_inputs=("student_hidden", "student_weight"), floor=floor,
    notes={"liger": "LigerFusedLinearJSD: scalar mean loss",
           "liger-chunked": "liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (soft loss only, beta=1: reverse "
                            "KL): scalar loss"},
)]
