"""Launchers of ``onepass.group_advantages`` for the triton, cpu and cuda backends.

All take the same arguments: contiguous ``rewards`` [B] (fp32/fp16/bf16/fp64), the groups in CSR
form (``perm`` [B] int64 or None for consecutive groups, ``offsets`` [S+1] int64, ``max_n`` the size of
the largest group), the estimator and scale codes below and ``eps``; they return the advantages [B]
(float32, float64 for float64 rewards).  ``segments`` builds the CSR form.  Nothing is validated here.
"""
from __future__ import annotations

import torch

from onepass.backends._common import dtype_code, ptr

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
SCALES = ("group", "batch", "none")


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


def _out(rewards: torch.Tensor) -> torch.Tensor:
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return torch.empty(rewards.numel(), dtype=dt, device=rewards.device)


def triton(rewards, perm, offsets, max_n, estimator, scale, eps):
    from onepass.triton_kernels.advantages import group_advantages_triton

    return group_advantages_triton(rewards, perm, offsets, max_n, estimator, scale, eps)


def cpu(rewards, perm, offsets, max_n, estimator, scale, eps):
    from onepass import _C

    out = _out(rewards)
    if rewards.numel() == 0:
        return out
    _C.advantages_cpu(ptr(rewards), dtype_code(rewards), ptr(perm), ptr(offsets), offsets.numel() - 1,
                      rewards.numel(), estimator, scale, float(eps), ptr(out))
    return out


def cuda(rewards, perm, offsets, max_n, estimator, scale, eps):
    from onepass import _C

    out = _out(rewards)
    if rewards.numel() == 0:
        return out
    stats = torch.zeros(2, dtype=out.dtype, device=rewards.device)
    stream = torch.cuda.current_stream(rewards.device).cuda_stream
    _C.advantages_cuda(ptr(rewards), dtype_code(rewards), ptr(perm), ptr(offsets), offsets.numel() - 1,
                       rewards.numel(), max_n, estimator, scale, float(eps), ptr(out), ptr(stats), stream)
    return out


LAUNCHERS = {"triton": triton, "cpu": cpu, "cuda": cuda}
