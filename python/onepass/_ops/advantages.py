"""The group-advantages op: ``onepass::group_advantages`` (a custom op without gradient: advantages are
constants of the policy loss) over the backends' ``group_advantages`` launchers.

Every launcher takes contiguous ``rewards`` [B] (fp32/fp16/bf16/fp64), the groups in CSR form
(``perm`` [B] int64 or None for consecutive groups, ``offsets`` [S+1] int64, ``max_n`` the size of the
largest group), the estimator and scale codes (positions in ``ADVANTAGE_ESTIMATORS`` /
``ADVANTAGE_SCALES``) and ``eps``; it returns the advantages [B] (float32, float64 for float64 rewards).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._contract import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, stats_dtype
from .._dispatch import launcher


def segments(rewards: torch.Tensor, group_size: int | None, group_ids: torch.Tensor | None):
    """(perm, offsets, max_n): ``perm`` [B] int64 lists the members segment by segment (None when the
    groups are the consecutive blocks of ``group_size``), ``offsets`` [S+1] int64 the segment bounds in
    it.  Segments are the distinct ``group_ids`` in increasing order; members keep their batch order
    (stable sort), so every later reduction has a fixed order."""
    B = rewards.numel()
    device = rewards.device
    if group_ids is None:
        offsets = torch.arange(0, B + 1, group_size, dtype=torch.int64, device=device)
        return None, offsets, int(group_size)
    ids = group_ids.reshape(-1)
    _, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
    perm = torch.sort(inverse, stable=True).indices.to(torch.int64).contiguous()
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    max_n = int(counts.max()) if counts.numel() else 0
    return perm, offsets, max_n


@torch.library.custom_op("onepass::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_ids: Optional[torch.Tensor], group_size: int,
                         estimator: str, scale: str, eps: float, backend: str) -> torch.Tensor:
    if rewards.numel() == 0:
        return rewards.new_empty((0,), dtype=stats_dtype(rewards))
    perm, offsets, max_n = segments(rewards, group_size if group_ids is None else None, group_ids)
    return launcher("advantages", backend).group_advantages(rewards, perm, offsets, max_n,
                                                            ADVANTAGE_ESTIMATORS.index(estimator),
                                                            ADVANTAGE_SCALES.index(scale), eps)


@_group_advantages_op.register_fake
def _(rewards, group_ids, group_size, estimator, scale, eps, backend):
    return rewards.new_empty(rewards.shape, dtype=stats_dtype(rewards))


def group_advantages(rewards: torch.Tensor, *, group_ids: Optional[torch.Tensor], group_size: int, estimator: str,
                     scale: str, eps: float, backend: str) -> torch.Tensor:
    """Advantages [B] of validated ``rewards`` [B] (contiguous) with either ``group_ids`` [B] or
    ``group_size`` > 0 (consecutive groups; 0 when ``group_ids`` is given)."""
    return _group_advantages_op(rewards, group_ids, group_size, estimator, scale, eps, backend)
