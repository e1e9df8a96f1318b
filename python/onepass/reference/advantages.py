"""Plain-PyTorch reference of ``onepass.group_advantages`` (the oracle, the ``"torch"`` backend and the
naive side of the benchmarks).

Everything is computed in float64 with the textbook formulas; groups given by ``group_ids`` are handled
one at a time in a Python loop.  Arguments are not validated here (the public function does that).
See ``onepass.advantages.group_advantages`` for the semantics.
"""
from __future__ import annotations

import torch

#: OpenRLHF's floor on the batch variance in the REINFORCE++ whitening: rsqrt(clamp(var, min=1e-8)).
REINFORCE_PP_VAR_FLOOR = 1e-8


def _group_stats(r: torch.Tensor, group_size: int | None, group_ids: torch.Tensor | None):
    """Per-element (n, group sum, group mean, group unbiased std) of the group of each element, float64.

    The std of a group of one is defined as 0 (its advantage is forced to 0 anyway)."""
    B = r.numel()
    if group_ids is None:
        g = r.view(-1, group_size)
        n = torch.full_like(g, float(group_size))
        s = g.sum(dim=1, keepdim=True).expand_as(g)
        # mean around the first member, so that equal rewards give exactly r - mean = 0
        mean = (g[:, :1] + (g - g[:, :1]).mean(dim=1, keepdim=True)).expand_as(g)
        if group_size > 1:
            std = g.std(dim=1, unbiased=True, keepdim=True).expand_as(g)
        else:
            std = torch.zeros_like(g)
        return n.reshape(B), s.reshape(B), mean.reshape(B), std.reshape(B)
    ids = group_ids.reshape(-1).to(torch.int64)
    n = torch.empty_like(r)
    s = torch.empty_like(r)
    mean = torch.empty_like(r)
    std = torch.zeros_like(r)
    for gid in torch.unique(ids).tolist():
        members = ids == gid
        vals = r[members]
        k = vals.numel()
        n[members] = float(k)
        s[members] = vals.sum()
        mean[members] = vals[0] + (vals - vals[0]).mean()
        if k > 1:
            std[members] = vals.std(unbiased=True)
    return n, s, mean, std


def group_advantages(rewards: torch.Tensor, *, group_size: int | None = None,
                     group_ids: torch.Tensor | None = None, estimator: str = "grpo",
                     scale: str = "group", eps: float = 1e-6,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference group advantages, computed in float64.

    Returns a [B] tensor of ``out_dtype`` (default: float64 for float64 rewards, else float32).

    - ``"grpo"``: (r − mean_g) / (std_g + eps), std_g unbiased; ``scale="batch"`` divides by
      (std of all rewards, unbiased) + eps instead; ``scale="none"`` does not divide.
    - ``"dr_grpo"``: r − mean_g.
    - ``"rloo"``: r − (sum_g − r)/(n_g − 1) (the mean of the other members).
    - ``"reinforce_pp"``: x = r − mean_g, then (x − mean(x)) · rsqrt(max(var(x), 1e-8)) with the
      biased (population) batch variance, as OpenRLHF's REINFORCE++-baseline.
    - A group of one gets 0 with every estimator.
    """
    if out_dtype is None:
        out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().reshape(-1).to(torch.float64)
    B = r.numel()
    if B == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)
    n, s, mean, std = _group_stats(r, group_size, group_ids)
    if estimator == "grpo":
        if scale == "group":
            denom = std + eps
            adv = (r - mean) / torch.where(denom > 0, denom, torch.ones_like(denom))  # 0/0 -> 0 (eps=0)
        elif scale == "batch":
            batch_std = r.std(unbiased=True) if B > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
            denom = batch_std + eps
            adv = (r - mean) / (denom if denom > 0 else 1.0)
        elif scale == "none":
            adv = r - mean
        else:
            raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    elif estimator == "dr_grpo":
        adv = r - mean
    elif estimator == "rloo":
        adv = r - (s - r) / (n - 1).clamp(min=1.0)
    elif estimator == "reinforce_pp":
        x = r - mean
        mu = x.mean()
        var = x.var(unbiased=False)
        adv = (x - mu) * var.clamp(min=REINFORCE_PP_VAR_FLOOR).rsqrt()
    else:
        raise ValueError(f"estimator must be 'grpo', 'dr_grpo', 'rloo' or 'reinforce_pp', got {estimator!r}")
    adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    return adv.to(out_dtype)
