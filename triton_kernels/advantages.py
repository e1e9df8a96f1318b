"""Triton kernels of ``onepass.group_advantages``: segmented (per-group) statistics and advantages.

Groups arrive in CSR form: ``offsets`` [S+1] int64 and, for ragged ``group_ids``, ``perm`` [B] int64
(the members of segment s are ``perm[offsets[s]:offsets[s+1]]``; without ``perm`` they are the
consecutive positions ``offsets[s]:offsets[s+1]``).  The launcher in
``onepass._ops.advantages`` builds them with a stable sort, so the order of every reduction is a
function of the inputs alone.

- ``_adv_segment_kernel``: one program per block of SEG_BLOCK segments, a [SEG_BLOCK, MEM_BLOCK] tile
  of (segment, member); loops over members when a group is longer than MEM_BLOCK.  Two-pass mean and
  variance around a shift (the first member of the group: all-equal groups give exactly 0), then the
  advantage written back to the members' original positions.  Modes (``SEG_*``): centre only,
  divide by the group std + eps, divide by the batch std + eps, RLOO factor n/(n-1), REINFORCE++
  whitening with the batch mean/variance.  Groups of one are written as 0.
- ``_adv_batch_stats_kernel``: one program, a deterministic two-pass reduction over the whole batch:
  the unbiased std of the rewards (GRPO ``scale="batch"``), or the mean and biased variance of the
  group-centred rewards (REINFORCE++).  The results stay on the device (no host sync).

Accumulation is fp32 (fp64 for fp64 rewards, ACC); fp16/bf16 rewards are loaded and converted first
(the interpreter's bf16 arithmetic is broken).  ``eps`` is a runtime argument.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from onepass._contract import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES

# Segment-kernel modes.
SEG_CENTER = 0       # r - mean_g
SEG_GROUP_STD = 1    # (r - mean_g) / (std_g + eps), unbiased std_g
SEG_BATCH_STD = 2    # (r - mean_g) / (stats[0] + eps)
SEG_RLOO = 3         # (r - mean_g) * n / (n - 1)
SEG_WHITEN = 4       # ((r - mean_g) - stats[0]) * rsqrt(max(stats[1], VAR_FLOOR))

# Batch-stats modes.
BATCH_STD = 0        # stats[0] = unbiased std of x over the batch (0 when B < 2)
BATCH_MEAN_VAR = 1   # stats[0] = mean of x, stats[1] = biased variance of x

VAR_FLOOR = 1e-8

# Estimator / scale codes (onepass._contract, csrc/cpu/advantages.cpp).
EST_GRPO, EST_DR_GRPO, EST_RLOO, EST_REINFORCE_PP = (ADVANTAGE_ESTIMATORS.index(n)
                                                     for n in ("grpo", "dr_grpo", "rloo", "reinforce_pp"))
SCALE_GROUP, SCALE_BATCH, SCALE_NONE = (ADVANTAGE_SCALES.index(n) for n in ("group", "batch", "none"))


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    # IEEE-rounded square root: tl.sqrt is approximate for fp32 on the GPU; sqrt_rn is fp32-only.
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _member_tile(r_ptr, perm_ptr, start, n, smask, j, HAS_PERM: tl.constexpr, ACC: tl.constexpr):
    """Members j [MEM_BLOCK] of each segment of the block: (mask, their batch positions, rewards in ACC)."""
    m = smask[:, None] & (j[None, :] < n[:, None])
    pos = start[:, None] + j[None, :]
    if HAS_PERM:
        idx = tl.load(perm_ptr + pos, mask=m, other=0)
    else:
        idx = pos
    return m, idx, tl.load(r_ptr + idx, mask=m, other=0).to(ACC)


@triton.jit
def _adv_segment_kernel(r_ptr, perm_ptr, off_ptr, out_ptr, stats_ptr, S, eps, var_floor,
                        MODE: tl.constexpr, HAS_PERM: tl.constexpr, ACC: tl.constexpr,
                        SEG_BLOCK: tl.constexpr, MEM_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = pid.to(tl.int64) * SEG_BLOCK + tl.arange(0, SEG_BLOCK)
    smask = seg < S
    start = tl.load(off_ptr + seg, mask=smask, other=0)
    end = tl.load(off_ptr + seg + 1, mask=smask, other=0)
    n = end - start
    nmax = tl.max(n, axis=0)
    live = smask & (n > 0)
    if HAS_PERM:
        first = tl.load(perm_ptr + start, mask=live, other=0)
    else:
        first = start
    cols = tl.arange(0, MEM_BLOCK)
    nf = n.to(ACC)
    n_safe = tl.maximum(nf, 1.0)

    # Pass 0: scale-safe sums: the group is summed as r / k with k a power of two near its largest |r|
    # (exact scaling), so that rewards near the float range limit do not overflow.
    amax = tl.zeros([SEG_BLOCK], dtype=ACC)
    for j0 in range(0, nmax, MEM_BLOCK):
        m, idx, v = _member_tile(r_ptr, perm_ptr, start, n, smask, j0 + cols, HAS_PERM, ACC)
        amax = tl.maximum(amax, tl.max(tl.where(m, tl.abs(v), 0.0), axis=1))
    k = tl.where(amax > 0.0, tl.exp2(tl.floor(tl.log2(tl.where(amax > 0.0, amax, 1.0)))), 1.0)
    shift = tl.load(r_ptr + first, mask=live, other=0).to(ACC) / k

    # Pass 1: mean around the shift.
    s1 = tl.zeros([SEG_BLOCK], dtype=ACC)
    for j0 in range(0, nmax, MEM_BLOCK):
        m, idx, v = _member_tile(r_ptr, perm_ptr, start, n, smask, j0 + cols, HAS_PERM, ACC)
        s1 += tl.sum(tl.where(m, v / k[:, None] - shift[:, None], 0.0), axis=1)
    mean_k = shift + s1 / n_safe  # mean / k

    # Per-segment denominators / factors.
    if MODE == 1:  # SEG_GROUP_STD: pass 2, sum of squared deviations.
        s2 = tl.zeros([SEG_BLOCK], dtype=ACC)
        for j0 in range(0, nmax, MEM_BLOCK):
            m, idx, v = _member_tile(r_ptr, perm_ptr, start, n, smask, j0 + cols, HAS_PERM, ACC)
            d = tl.where(m, v / k[:, None] - mean_k[:, None], 0.0)
            s2 += tl.sum(d * d, axis=1)
        var_k = s2 / tl.maximum(nf - 1.0, 1.0)
        denom = _sqrt(var_k, ACC) + eps / k  # (std + eps) / k: divides x / k below
    elif MODE == 2:  # SEG_BATCH_STD
        bstd = tl.load(stats_ptr).to(ACC)
        denom = tl.zeros([SEG_BLOCK], dtype=ACC) + (bstd + eps)
    elif MODE == 3:  # SEG_RLOO: (r - mean) * n / (n - 1)
        denom = tl.maximum(nf - 1.0, 1.0) / n_safe
    elif MODE == 4:  # SEG_WHITEN
        bmean = tl.load(stats_ptr).to(ACC)
        bvar = tl.load(stats_ptr + 1).to(ACC)
        rstd = 1.0 / _sqrt(tl.maximum(bvar, var_floor), ACC)
        denom = tl.zeros([SEG_BLOCK], dtype=ACC) + 1.0
    else:  # SEG_CENTER
        denom = tl.zeros([SEG_BLOCK], dtype=ACC) + 1.0

    # Pass 3: write the advantages to the members' original positions (0 for groups of one).
    for j0 in range(0, nmax, MEM_BLOCK):
        m, idx, v = _member_tile(r_ptr, perm_ptr, start, n, smask, j0 + cols, HAS_PERM, ACC)
        if MODE == 1:
            x = v / k[:, None] - mean_k[:, None]
        else:
            x = v - (mean_k * k)[:, None]
        if MODE == 4:
            adv = (x - bmean) * rstd
        elif MODE == 0:
            adv = x
        else:
            adv = x / tl.where(denom > 0, denom, 1.0)[:, None]  # denom = 0 only with eps = 0 and x = 0
        adv = tl.where((n > 1)[:, None], adv, 0.0)
        tl.store(out_ptr + idx, adv.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _adv_batch_stats_kernel(x_ptr, stats_ptr, B, bf, MODE: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    shift = tl.load(x_ptr).to(ACC)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, B, BLOCK):
        i = i0 + cols
        m = i < B
        v = tl.load(x_ptr + i, mask=m, other=0).to(ACC)
        acc += tl.where(m, v - shift, 0.0)
    mean = shift + tl.sum(acc, axis=0) / bf
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, B, BLOCK):
        i = i0 + cols
        m = i < B
        v = tl.load(x_ptr + i, mask=m, other=0).to(ACC)
        d = tl.where(m, v - mean, 0.0)
        acc2 += d * d
    ss = tl.sum(acc2, axis=0)
    if MODE == 0:
        var = ss / tl.maximum(bf - 1.0, 1.0)
        std = tl.where(bf > 1.0, _sqrt(var, ACC), 0.0)
        tl.store(stats_ptr, std.to(stats_ptr.dtype.element_ty))
    else:
        tl.store(stats_ptr, mean.to(stats_ptr.dtype.element_ty))
        tl.store(stats_ptr + 1, (ss / bf).to(stats_ptr.dtype.element_ty))


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _launch_segments(rewards, perm, offsets, out, stats, num_segments, max_n, mode, eps, acc):
    mem_block = min(max(_next_pow2(max_n), 2), 256)
    seg_block = min(max(2048 // mem_block, 2), max(_next_pow2(num_segments), 2))
    grid = (triton.cdiv(num_segments, seg_block),)
    _adv_segment_kernel[grid](
        rewards, perm if perm is not None else offsets, offsets, out, stats, num_segments,
        float(eps), VAR_FLOOR,
        MODE=mode, HAS_PERM=perm is not None, ACC=acc, SEG_BLOCK=seg_block, MEM_BLOCK=mem_block,
    )


def _launch_batch_stats(x, stats, mode, acc):
    B = x.numel()
    block = min(max(_next_pow2(B), 16), 1024)
    _adv_batch_stats_kernel[(1,)](x, stats, B, float(B), MODE=mode, ACC=acc, BLOCK=block)


def group_advantages_triton(rewards: torch.Tensor, perm: torch.Tensor | None, offsets: torch.Tensor,
                            max_n: int, estimator: int, scale: int, eps: float) -> torch.Tensor:
    """Advantages [B] (float32, float64 for float64 rewards) for contiguous ``rewards`` [B], groups in
    CSR form (``offsets`` [S+1] int64, ``perm`` [B] int64 or None), ``max_n`` the largest group size.
    """
    B = rewards.numel()
    is64 = rewards.dtype == torch.float64
    acc = tl.float64 if is64 else tl.float32
    out_dtype = torch.float64 if is64 else torch.float32
    out = torch.empty(B, dtype=out_dtype, device=rewards.device)
    num_segments = offsets.numel() - 1
    if B == 0 or num_segments == 0:
        return out
    stats = torch.zeros(2, dtype=out_dtype, device=rewards.device)
    if estimator == EST_GRPO:
        if scale == SCALE_GROUP:
            mode = SEG_GROUP_STD
        elif scale == SCALE_BATCH:
            _launch_batch_stats(rewards, stats, BATCH_STD, acc)
            mode = SEG_BATCH_STD
        else:
            mode = SEG_CENTER
    elif estimator == EST_DR_GRPO:
        mode = SEG_CENTER
    elif estimator == EST_RLOO:
        mode = SEG_RLOO
    elif estimator == EST_REINFORCE_PP:
        _launch_segments(rewards, perm, offsets, out, stats, num_segments, max_n, SEG_CENTER, eps, acc)
        _launch_batch_stats(out, stats, BATCH_MEAN_VAR, acc)
        mode = SEG_WHITEN
    else:
        raise ValueError(f"unknown estimator code {estimator}")
    _launch_segments(rewards, perm, offsets, out, stats, num_segments, max_n, mode, eps, acc)
    return out


#: The launcher under the name every backend's advantages module uses (onepass._dispatch.LAUNCHERS).
group_advantages = group_advantages_triton
