"""Float64 references of the advantage estimators of verl 0.9, TRL 1.16 and OpenRLHF 0.11: the test oracle
of ``onepass.group_advantages``'s estimators and options beyond the kernel conventions (and of
``onepass.reinforce_pp_returns``); never called by the library itself.

Plain PyTorch, one group at a time; written from the definitions restated in ``docs/loss_variants.md``.
Rewards are per sequence [B]; ``group_ids`` [B] are integer labels (any order, ragged groups).
Estimators that whiten over tokens take the response mask [B, T] and return per-token advantages [B, T]
(zero on masked tokens); the others return [B] (broadcast over the response tokens by the loss).

Options shared by the group estimators:
- ``singleton``: what a group of one gets. "zero" (onepass, TRL, OpenRLHF rloo/baseline in effect);
  "verl": verl's convention, mean 0 and std 1 for a group of one, so its advantage is r / (1 + eps)
  (GRPO) or r (RLOO, REINFORCE++-baseline, OPO, GPG).
- ``nan_rewards``: "raise" (onepass), or "exclude" (TRL's "unscorable" completions: a NaN reward is left
  out of its group's statistics and gets advantage 0; a group left with one scorable member gives 0).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _prepare(rewards: Tensor, group_ids: Tensor, nan_rewards: str):
    r = rewards.detach().reshape(-1).to(torch.float64)
    if nan_rewards not in ("raise", "exclude"):
        raise ValueError(f"nan_rewards must be 'raise' or 'exclude', got {nan_rewards!r}")
    if nan_rewards == "raise" and bool(torch.isnan(r).any()):
        raise ValueError("rewards contain NaN (pass nan_rewards='exclude' to leave them out of their group)")
    ids = group_ids.reshape(-1).to(torch.int64)
    if ids.shape != r.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but rewards has {tuple(rewards.shape)}")
    groups = [torch.nonzero(ids == g).flatten() for g in torch.unique(ids).tolist()]
    return r, groups


def _check_singleton(singleton):
    if singleton not in ("zero", "verl"):
        raise ValueError(f"singleton must be 'zero' or 'verl', got {singleton!r}")


def _unbiased_std(x: Tensor) -> Tensor:
    return x.std(unbiased=True) if x.numel() > 1 else torch.tensor(math.nan, dtype=x.dtype)


def grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, scale: str = "group", singleton: str = "zero",
         nan_rewards: str = "raise") -> Tensor:
    """GRPO: (r − mean_g)/(std_g + eps) (unbiased std; ``scale="batch"``: the std of all scorable
    rewards; ``"none"``: no division).  TRL uses eps = 1e-4, verl 1e-6, OpenRLHF group_norm 1e-9."""
    _check_singleton(singleton)
    r, groups = _prepare(rewards, group_ids, nan_rewards)
    ok = ~torch.isnan(r)
    adv = torch.zeros_like(r)
    batch_std = _unbiased_std(r[ok])
    for idx in groups:
        idx = idx[ok[idx]]
        vals = r[idx]
        if vals.numel() == 1:
            if singleton == "verl":
                adv[idx] = vals / (1.0 + eps) if scale == "group" else vals
            continue
        centered = vals - vals.mean()
        if scale == "group":
            adv[idx] = centered / (vals.std(unbiased=True) + eps)
        elif scale == "batch":
            adv[idx] = centered / (batch_std + eps)
        elif scale == "none":
            adv[idx] = centered
        else:
            raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return adv


def rloo(rewards: Tensor, group_ids: Tensor, *, normalize: bool = False, eps: float = 1e-4,
         singleton: str = "zero", nan_rewards: str = "raise") -> Tensor:
    """RLOO: r − mean of the other (scorable) members; ``normalize`` then whitens the advantages of the
    members of groups with ≥ 2 scorable rewards over the batch: (a − mean)/(std + eps), unbiased std
    (TRL ``RLOOConfig.normalize_advantages``, eps 1e-4).  verl's group of one keeps r."""
    _check_singleton(singleton)
    r, groups = _prepare(rewards, group_ids, nan_rewards)
    ok = ~torch.isnan(r)
    adv = torch.zeros_like(r)
    has = torch.zeros_like(r, dtype=torch.bool)
    for idx in groups:
        idx = idx[ok[idx]]
        vals = r[idx]
        n = vals.numel()
        if n == 1:
            if singleton == "verl":
                adv[idx] = vals
            continue
        adv[idx] = vals - (vals.sum() - vals) / (n - 1)
        has[idx] = True
    if normalize:
        a = adv[has]
        if a.numel() == 0:
            return adv
        adv = torch.where(has, (adv - a.mean()) / (_unbiased_std(a) + eps), torch.zeros_like(adv))
        adv = torch.nan_to_num(adv, nan=0.0)
    return adv


def grpo_passk(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, norm_by_std: bool = True) -> Tensor:
    """Pass@k GRPO (verl ``grpo_passk``): in each group only the best member (``torch.topk`` order)
    gets r_max − r_second, divided by (std_g + eps) with ``norm_by_std``; everyone else 0.  Groups need
    at least 2 members."""
    r, groups = _prepare(rewards, group_ids, "raise")
    adv = torch.zeros_like(r)
    for idx in groups:
        vals = r[idx]
        if vals.numel() < 2:
            raise ValueError(f"grpo_passk needs at least 2 samples per group, got {vals.numel()}")
        top, top_idx = torch.topk(vals, 2)
        a = top[0] - top[1]
        if norm_by_std:
            a = a / (vals.std(unbiased=True) + eps)
        adv[idx[top_idx[0]]] = a
    return adv


def opo(rewards: Tensor, group_ids: Tensor, lengths: Tensor, *, singleton: str = "verl") -> Tensor:
    """OPO (verl ``opo``): r − Σ_g |y|·r / Σ_g |y| (the length-weighted group mean); verl's group of one
    keeps r."""
    _check_singleton(singleton)
    r, groups = _prepare(rewards, group_ids, "raise")
    n = lengths.reshape(-1).to(torch.float64)
    adv = torch.zeros_like(r)
    for idx in groups:
        if idx.numel() == 1:
            adv[idx] = r[idx] if singleton == "verl" else 0.0
            continue
        adv[idx] = r[idx] - (n[idx] * r[idx]).sum() / n[idx].sum()
    return adv


def gpg(rewards: Tensor, group_ids: Tensor, *, f_norm: float = 1.0, singleton: str = "verl") -> Tensor:
    """GPG (verl ``gpg`` estimator): α·(r − mean_g)/f_norm with α = B / max(#nonzero rewards, 1);
    verl's group of one keeps α·r/f_norm."""
    _check_singleton(singleton)
    r, groups = _prepare(rewards, group_ids, "raise")
    alpha = r.numel() / max(int(torch.count_nonzero(r)), 1)
    adv = torch.zeros_like(r)
    for idx in groups:
        if idx.numel() == 1:
            adv[idx] = alpha * r[idx] / f_norm if singleton == "verl" else 0.0
            continue
        adv[idx] = alpha * (r[idx] - r[idx].mean()) / f_norm
    return adv


def remax(rewards: Tensor, baselines: Tensor) -> Tensor:
    """ReMax (verl ``remax``, outcome reward): r − b, b the reward of the greedy response."""
    return rewards.reshape(-1).to(torch.float64) - baselines.reshape(-1).to(torch.float64)


def returns_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = r_t + γ·G_{t'} over the unmasked tokens (t' the next unmasked token), 0 on masked tokens."""
    r = token_rewards.to(torch.float64)
    m = mask.to(torch.float64)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        new = r[:, t] + gamma * running
        out[:, t] = new * m[:, t]
        running = torch.where(m[:, t] > 0, new, running)
    return out


def token_whiten(values: Tensor, mask: Tensor, *, variance: str = "unbiased") -> Tensor:
    """Whitening over the unmasked tokens of the whole batch (each sequence weighs its length):
    (x − μ)·rsqrt(var + 1e-8) with the unbiased token variance (verl ``masked_whiten``), or
    (x − μ)·rsqrt(max(var, 1e-8)) with the biased one (``variance="biased"``, OpenRLHF); 0 on masked."""
    x = values.to(torch.float64)
    m = mask.to(torch.float64)
    n = m.sum()
    if n < (2 if variance == "unbiased" else 1):
        raise ValueError(f"token whitening with the {variance} variance needs at least "
                         f"{2 if variance == 'unbiased' else 1} unmasked tokens")
    mu = (x * m).sum() / n
    var = (((x - mu) ** 2) * m).sum() / n
    if variance == "unbiased":
        scale = torch.rsqrt(var * n / (n - 1) + 1e-8)
    elif variance == "biased":
        scale = var.clamp_min(1e-8).rsqrt()
    else:
        raise ValueError(f"variance must be 'unbiased' or 'biased', got {variance!r}")
    return (x - mu) * scale * m


def reinforce_pp(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, variance: str = "unbiased") -> Tensor:
    """REINFORCE++ (verl ``reinforce_plus_plus``): discounted returns-to-go of the token rewards,
    whitened over the batch's tokens.  Returns [B, T]."""
    return token_whiten(returns_to_go(token_rewards, mask, gamma), mask, variance=variance)


def reinforce_pp_baseline(rewards: Tensor, group_ids: Tensor, mask: Tensor | None = None, *, singleton: str = "verl",
                          variance: str = "unbiased") -> Tensor:
    """REINFORCE++-baseline: x = r − mean_g, whitened over the batch's tokens (``mask`` [B, T], each sequence
    weighs its length; returns [B, T]) or, without ``mask``, over the samples (each counts once; returns [B]).
    verl (``reinforce_plus_plus_baseline``): ``singleton="verl"`` (a group of one keeps x = r) and
    ``variance="unbiased"``; OpenRLHF (``reinforce_baseline``): ``singleton="zero"`` (a group of one has x = 0
    in the statistics and gets advantage 0: OpenRLHF's groups all have one size, and with size 1 every x and
    advantage is 0) and ``variance="biased"``."""
    _check_singleton(singleton)
    r, groups = _prepare(rewards, group_ids, "raise")
    x = torch.zeros_like(r)
    alone = torch.zeros_like(r, dtype=torch.bool)
    for idx in groups:
        if idx.numel() == 1:
            x[idx] = r[idx] if singleton == "verl" else 0.0
            alone[idx] = True
        else:
            x[idx] = r[idx] - r[idx].mean()
    if mask is None:
        adv = token_whiten(x[:, None], torch.ones_like(x)[:, None], variance=variance)[:, 0]
        return torch.where(alone, 0.0, adv) if singleton == "zero" else adv
    adv = token_whiten(x[:, None] * mask.to(torch.float64), mask, variance=variance)
    return torch.where(alone[:, None], 0.0, adv) if singleton == "zero" else adv
