"""Off-policy corrections between the trainer's and the rollout engine's log-probs (docs/loss_variants.md §5):
importance weights to pass as ``token_weights`` of ``onepass.grpo_loss`` / ``policy_loss`` (verl's
``rollout_is_weights``, OpenRLHF's IS correction, TRL's vLLM IS correction) and verl's rejection mask to
multiply into ``mask``.  All outputs are detached, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validate
from .kl import check_bounds, clamp_to

IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")
SEQ_REDUCTIONS = ("sum", "mean")
GATINGS = ("ratio", "binary_kl", "tv")
MASK_WEIGHTS = ("level", "token")
TRL_VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _float(x: Tensor) -> Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Σ m·x / max(Σ m, 1) (x broadcast to the mask's shape; exactly 0 where the mask is 0)."""
    x = x.expand(mask.shape)
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum(dim) / mask.to(x.dtype).sum(dim).clamp_min(1.0)


def _check_pair(old_logp, rollout_logp, mask) -> None:
    _validate.check_float("old_logp", old_logp, min_dim=2)
    if old_logp.dim() != 2:
        raise ValueError(f"old_logp must be [B, T], got shape {tuple(old_logp.shape)}")
    _validate.check_float("rollout_logp", rollout_logp, min_dim=0)
    _validate.check_tensor("mask", mask)
    for name, x in (("rollout_logp", rollout_logp), ("mask", mask)):
        if x.shape != old_logp.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but old_logp has {tuple(old_logp.shape)}")
    _validate.check_same_device(old_logp=old_logp, rollout_logp=rollout_logp, mask=mask)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def rollout_is_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, level: str = "token",
                       mode: str = "truncate", low=None, high=2.0, seq_reduce: str = "sum", gating: str = "ratio",
                       mask_weight: str = "level", log_clamp=None, batch_normalize: bool = False) -> Tensor:
    """Detached off-policy correction weights between the trainer's (old) and the rollout engine's
    log-probs, multiplied onto the per-token policy term: [B, T] at token level, [B, 1] per sequence.

    x_t = old_logp_t − rollout_logp_t (masked → 0, NaN → 0).  The statistic s is, per ``gating``:
    "ratio": exp(x_t) (``level="token"``) or exp(Σ_t x_t) / exp(mean_t x_t) (``level="sequence"``,
    ``seq_reduce="sum"`` / ``"mean"``), the log clamped to ``log_clamp`` first; "binary_kl" / "tv": the
    Bernoulli KL / |p − q| of the sampled token's probabilities p = exp(rollout), q = exp(old) (both
    clamped to [1e-6, 1 − 1e-6]), averaged over the sequence at ``level="sequence"`` (OpenRLHF).
    ``mode="truncate"``: w = clamp(s, low, high) (TIS); ``mode="mask"``: w = s inside [low, high], 0
    outside (IcePop / MIS); with ``mask_weight="token"`` the survivors get their own token ratio exp(x_t)
    instead of s (OpenRLHF; the result is then [B, T]).  ``batch_normalize`` divides by the mean weight
    (over unmasked tokens, or over non-empty sequences) when it exceeds 1e-8 (verl).
    """
    _check_pair(old_logp, rollout_logp, mask)
    for name, value, allowed in (("level", level, IS_LEVELS), ("mode", mode, IS_MODES),
                                 ("seq_reduce", seq_reduce, SEQ_REDUCTIONS), ("gating", gating, GATINGS),
                                 ("mask_weight", mask_weight, MASK_WEIGHTS)):
        _choice(name, value, allowed)
    log_clamp = check_bounds("log_clamp", log_clamp)
    for name, bound in (("low", low), ("high", high)):
        if bound is not None and not (isinstance(bound, (int, float)) and not math.isnan(bound)):
            raise ValueError(f"{name} must be a number or None, got {bound!r}")
    old_logp, rollout_logp = _float(old_logp), _float(rollout_logp)
    dt = old_logp.dtype
    m = mask.to(dt)
    x = torch.nan_to_num((old_logp - rollout_logp) * m, nan=0.0)
    if gating == "ratio":
        if level == "token":
            stat = torch.exp(clamp_to(x, log_clamp))
        else:
            s = x.sum(-1, keepdim=True)
            if seq_reduce == "mean":
                s = s / m.sum(-1, keepdim=True).clamp_min(1.0)
            stat = torch.exp(clamp_to(s, log_clamp))
    else:
        p = torch.exp(_float(rollout_logp)).clamp(1e-6, 1 - 1e-6)
        q = torch.exp(_float(old_logp)).clamp(1e-6, 1 - 1e-6)
        if gating == "binary_kl":
            stat = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        else:
            stat = (p - q).abs()
        if level == "sequence":
            stat = _masked_mean(stat, mask, dim=-1).unsqueeze(-1)
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    if mode == "truncate":
        w = stat.clamp(lo, hi)
    else:
        keep = (stat >= lo) & (stat <= hi)
        kept = torch.exp(x) if mask_weight == "token" else stat
        w = torch.where(keep, kept, torch.zeros_like(kept))
    if w.shape[-1] != 1:
        w = w * m
    if batch_normalize:
        if w.shape[-1] != 1:
            mean = _masked_mean(w, mask)
        else:
            seq_mask = m.sum(-1) > 0
            mean = w[:, 0][seq_mask].sum() / seq_mask.sum().clamp_min(1)
        if mean > 1e-8:
            w = w / mean
    return w.detach()


def rollout_rejection_mask(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, options: dict) -> Tensor:
    """verl's rejection sampling (``compute_rollout_rejection_mask``): the mask [B, T] with the tokens, or
    whole sequences, whose train/rollout divergence is out of bounds set to 0.

    x_t = clamp(old_logp − rollout_logp, ±20); per token k1 = −x, k2 = x²/2, k3 = exp(x) − 1 − x.
    ``options`` maps verl option names to bounds: "token_k{1,2,3}" (per token), "seq_sum_k{1,2,3}",
    "seq_mean_k{1,2,3}" (masked sum / mean over the sequence), "seq_max_k{2,3}" (masked max, 0 for an
    empty row).  k1 options take a (low, high) pair kept as log(low) ≤ k1 ≤ log(high) — note that k1 is
    log(π_rollout/π_train), so the band bounds the inverse of the train/rollout ratio; the others take an
    upper bound.  Every option must pass.
    """
    _check_pair(old_logp, rollout_logp, mask)
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict of verl rejection options, got {type(options).__name__}")
    dt = _float(old_logp).dtype
    m = mask.to(dt)
    x = (_float(old_logp) - _float(rollout_logp)).clamp(-20.0, 20.0)
    per_token = {"k1": -x, "k2": 0.5 * x * x, "k3": torch.exp(x) - 1.0 - x}
    keep = torch.ones_like(m)
    for name, bound in options.items():
        level, _, kind = name.rpartition("_")
        if kind not in per_token or level not in ("token", "seq_sum", "seq_mean", "seq_max"):
            raise ValueError(f"unknown rejection option {name!r} (token_k*, seq_sum_k*, seq_mean_k*, seq_max_k*)")
        value = per_token[kind]
        if level == "seq_sum":
            value = torch.where(mask.bool(), value.expand(mask.shape), torch.zeros_like(m)).sum(-1, keepdim=True)
        elif level == "seq_mean":
            value = _masked_mean(value, mask, dim=-1).unsqueeze(-1)
        elif level == "seq_max":
            value = torch.where(mask.bool(), value, torch.full_like(value, -math.inf)).amax(-1, keepdim=True)
            value = torch.where(torch.isinf(value), torch.zeros_like(value), value)
        if kind == "k1":
            ok = (value >= math.log(bound[0])) & (value <= math.log(bound[1]))
        else:
            ok = value <= bound
        keep = keep * ok.to(dt)
    return m * keep


def trl_vllm_is_weights(old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, *, mode: str = "sequence_mask",
                        clip_min=None, clip_max=3.0) -> Tensor:
    """TRL's ``vllm_importance_sampling_correction`` ratio ([B, T] token modes, [B, 1] sequence modes):
    exp of the (summed, for sequence modes) masked log-ratio old − sampling, truncated to / masked
    outside [clip_min, clip_max]."""
    _choice("mode", mode, TRL_VLLM_IS_MODES)
    level, _, how = mode.partition("_")
    return rollout_is_weights(old_logp, sampling_logp, mask, level=level, mode=how, low=clip_min, high=clip_max,
                              seq_reduce="sum")
