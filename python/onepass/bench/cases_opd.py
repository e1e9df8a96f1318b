"""Family ``opd_loss``: ``onepass.opd_loss`` with the full-vocabulary reverse KL to a teacher LM head
(student and teacher tiles in one sweep) vs the naive loss materializing both [B, T, V] logit tensors and
their log-softmax.  The teacher is frozen (no gradient)."""
from __future__ import annotations

import torch

import onepass
from onepass import reference

from .cases_linear_divergence import liger_chunked_jsd
from .registry import Floor, family, linear_gemms, onepass_backend, randn, targets


def make_inputs(shape, dtype, device, gen):
    b, t, d, v = shape["B"], shape["T"], shape["D"], shape["V"]
    return {"hidden": randn((b, t, d), dtype, device, gen),
            "weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "teacher_hidden": randn((b, t, d), dtype, device, gen),
            "teacher_weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "targets": targets(b * t, v, device, gen, ignore_frac=0.0).view(b, t),
            "mask": (torch.rand(b, t, generator=gen) > 0.1).float().to(device)}


def run_onepass(x):
    loss, _ = onepass.opd_loss(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["targets"],
                               mask=x["mask"], divergence="reverse_kl", backend=onepass_backend())
    return loss


def run_naive(x):
    with torch.no_grad():
        zt = x["teacher_hidden"] @ x["teacher_weight"].T
    d = reference.divergence(x["hidden"] @ x["weight"].T, zt, kind="reverse_kl")
    m = x["mask"]
    return (d * m).sum() / m.sum().clamp_min(1)


def run_liger_chunked(x):
    """Liger's chunked distillation loss; masked positions are given as ignored targets."""
    d = x["hidden"].shape[-1]
    tgt = x["targets"].masked_fill(x["mask"] == 0, -100).reshape(-1)
    return liger_chunked_jsd(x["hidden"].reshape(-1, d), x["weight"], x["teacher_hidden"].reshape(-1, d),
                             x["teacher_weight"], tgt, "reverse_kl")


def floor(shape, dtype, pass_, variant):
    n, d, v = shape["B"] * shape["T"], shape["D"], shape["V"]
    return Floor(gemms=linear_gemms(n, d, v, pass_) + linear_gemms(n, d, v, pass_, grad=False), label="GEMM")


FAMILIES = [family(
    "opd_loss", op="opd_loss", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive, "liger-chunked": run_liger_chunked},
    shapes={"cpu": [{"B": 4, "T": 256, "D": 1024, "V": 32000}],
            "cuda": [{"B": 16, "T": 1024, "D": 4096, "V": v} for v in (32000, 151936)],
            "quick": [{"B": 2, "T": 16, "D": 32, "V": v} for v in (256, 512)]},
    default={"cpu": {"B": 1, "T": 128, "D": 256, "V": 32000}, "cuda": {"B": 16, "T": 1024, "D": 4096, "V": 151936}},
    order=70, grad_inputs=("hidden", "weight"), passes=("fwd+bwd",), floor=floor,
    notes={"liger-chunked": "liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (soft loss only, beta=1: reverse "
                            "KL), masked tokens as ignored targets"},
)]
