"""Family ``grpo_loss``: ``onepass.grpo_loss`` (fused, token-mean, ε 0.2/0.2, β 0.04 with k3 to a
precomputed reference log-prob, off-policy ratio from old_logp) vs the naive TRL-style loss that
materializes [B, T, V] logits and their log-softmax, and Liger's chunked ``LigerFusedLinearGRPOLoss``
with the same loss (loss_type "bnpo" = token mean over the batch, same β, ε, reference and old log-probs).
"""
from __future__ import annotations

import torch

import onepass
from onepass import reference

from .registry import Floor, family, linear_gemms, onepass_backend, randn, targets

BETA, EPS = 0.04, 0.2


def make_inputs(shape, dtype, device, gen):
    b, t, d, v = shape["B"], shape["T"], shape["D"], shape["V"]
    mask = (torch.rand(b, t, generator=gen) > 0.1).float().to(device)
    return {"hidden": randn((b, t, d), dtype, device, gen),
            "weight": randn((v, d), dtype, device, gen, scale=d ** -0.5 * 2.0),
            "targets": targets(b * t, v, device, gen, ignore_frac=0.0).view(b, t),
            "mask": mask,
            "advantages": randn((b,), "float32", device, gen),
            "old_logp": randn((b, t), "float32", device, gen, scale=0.1) - 7.0,
            "ref_logp": randn((b, t), "float32", device, gen, scale=0.1) - 7.0}


def run_onepass(x):
    loss, _ = onepass.grpo_loss(x["hidden"], x["weight"], x["targets"], x["advantages"], mask=x["mask"],
                                old_logp=x["old_logp"], ref_logp=x["ref_logp"], beta=BETA, epsilon_low=EPS,
                                epsilon_high=EPS, backend=onepass_backend())
    return loss


def run_naive(x):
    """TRL-style: logits materialized, log-softmax, gather, clipped ratio loss + β·k3, token mean."""
    logp = reference.linear_token_logprobs(x["hidden"], x["weight"], x["targets"])
    ratio = torch.exp((logp - x["old_logp"]).clamp(-20, 20))
    adv = x["advantages"][:, None]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - EPS, 1 + EPS))
    kl = reference.kl_penalty(logp, x["ref_logp"], estimator="k3")
    m = x["mask"]
    return ((pg + BETA * kl) * m).sum() / m.sum().clamp_min(1)


def run_liger_chunked(x):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    fn = LigerFusedLinearGRPOLoss(beta=BETA, use_ref_model=True, epsilon_low=EPS, epsilon_high=EPS,
                                  loss_type="bnpo")
    out = fn(x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"], ref_per_token_logps=x["ref_logp"],
             old_per_token_logps=x["old_logp"])
    return out[0] if isinstance(out, tuple) else out


def floor(shape, dtype, pass_, variant):
    n = shape["B"] * shape["T"]
    return Floor(gemms=linear_gemms(n, shape["D"], shape["V"], pass_),
                 label="4-GEMM" if pass_ == "fwd+bwd" else "GEMM")


FAMILIES = [family(
    "grpo_loss", op="grpo_loss", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive, "liger-chunked": run_liger_chunked},
    shapes={"cpu": [{"B": 8, "T": 512, "D": 1024, "V": 32000}],
            "cuda": [{"B": 16, "T": 1024, "D": 4096, "V": v} for v in (32000, 151936)],
            "quick": [{"B": 2, "T": 16, "D": 32, "V": v} for v in (256, 512)]},
    default={"cpu": {"B": 1, "T": 128, "D": 512, "V": 32000}, "cuda": {"B": 16, "T": 1024, "D": 4096, "V": 151936}},
    order=60, grad_inputs=("hidden", "weight"), floor=floor, passes=("fwd+bwd",),
    notes={"liger-chunked": "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(loss_type='bnpo', same β, ε, ref "
                            "and old log-probs)"},
)]
