"""Triton kernels of onepass.sinkhorn_distance: the G x G cost construction and its backward sweep.

Rows are cut into consecutive groups of G rows (the last may be smaller).  Every G x G quantity is
stored "banded" as [N, G]: entry (i, jj) pairs student row i with teacher row gstart(i) + jj of the
same group (entries past the end of a short last group are 0).

- `_sinkhorn_cost_kernel`: grid (group x i-block, j-block); loops over vocab tiles, recomputing
  p = exp(a/T - lse_a), q = exp(b/T - lse_b) on the fly (never storing [G, V] probabilities), and writes
  C_ij and the two "chain-rule" matrices A_ij = sum_v p_iv dC_ij/dp_iv, B_ij = sum_v q_jv dC_ij/dq_jv
  which give the per-row softmax-Jacobian means of the backward without a second sweep.
    KIND 0 l1:          C = sum |p - q|,            A = sum p sign(p - q),   B = sum q sign(q - p)
    KIND 1 sqeuclidean: C = |p|^2 + |q|^2 - 2 p.q,  A = 2(|p|^2 - p.q),     B = 2(|q|^2 - p.q)
    KIND 2 hellinger:   C = sum p + sum q - 2 sqrt(p).sqrt(q),  A = B = -sqrt(p).sqrt(q)
  (hellinger's A, B drop the constant part of dC/dp, which the softmax Jacobian annihilates).
- `_sinkhorn_grad_kernel`: grid (group x x-block, vocab block); for one side x (student, or teacher with
  the transposed upstream matrix) loops over the rows y of the group and writes
    grad_x = (w - x S_x) / T,  w_v = x_v dL/dx_v:
    l1: w = x * sum_y G_xy sign(x - y);  sqeuclidean: w = 2 x (rs_x x - G @ y);  hellinger: w = -sqrt(x) (G @ sqrt(y))
  with G the banded upstream dL/dC (transposed for the teacher), S_x = sum_y G_xy A_xy, rs_x = sum_y G_xy.

All math in fp32 (inputs loaded then converted); epsilon/temperature are runtime values; no autotune,
no block pointers, no libdevice (the kernels run under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from onepass._contract import Cost
from onepass._dispatch import triton_interpreting as _interpreting

L1, SQEUCLIDEAN, HELLINGER = (tl.constexpr(int(c)) for c in Cost)


@triton.jit
def _prob_tile(X, LSE, rows, cols, row_mask, col_mask, stride, inv_temp):
    """p[rows, cols] = exp(x * inv_temp - lse) as fp32; 0 outside the masks."""
    m = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    z = tl.where(m, x * inv_temp - lse[:, None], float("-inf"))
    return tl.exp(z), z


@triton.jit
def _sinkhorn_cost_kernel(A, B, LSE_A, LSE_B, OUT_C, OUT_A, OUT_B, N, V, G, n_iblocks, stride_a, stride_b, inv_temp,
                          KIND: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    pid0 = tl.program_id(0)
    jb = tl.program_id(1)
    grp = pid0 // n_iblocks
    ib = pid0 % n_iblocks
    gstart = grp * G
    gend = tl.minimum(gstart + G, N)
    ii = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    rows_i = gstart + ii
    rows_j = gstart + jj
    mask_i = rows_i < gend
    mask_j = rows_j < gend
    acc_c = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    n_i = tl.zeros((BLOCK_I,), dtype=tl.float32)
    n_j = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        p, zp = _prob_tile(A, LSE_A, rows_i, cols, mask_i, cmask, stride_a, inv_temp)
        q, zq = _prob_tile(B, LSE_B, rows_j, cols, mask_j, cmask, stride_b, inv_temp)
        if KIND == L1:
            p3 = p[:, None, :]
            d = p3 - q[None, :, :]
            s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            acc_c += tl.sum(tl.abs(d), axis=2)
            acc_a += tl.sum(p3 * s, axis=2)
        elif KIND == SQEUCLIDEAN:
            acc_c = tl.dot(p, tl.trans(q), acc_c, input_precision="ieee")
            n_i += tl.sum(p * p, axis=1)
            n_j += tl.sum(q * q, axis=1)
        else:
            sp = tl.exp(0.5 * zp)
            sq = tl.exp(0.5 * zq)
            acc_c = tl.dot(sp, tl.trans(sq), acc_c, input_precision="ieee")
            n_i += tl.sum(p, axis=1)
            n_j += tl.sum(q, axis=1)
    if KIND == L1:
        acc_b = acc_c - acc_a  # sum q sign(q - p) = sum (p - q) sign(p - q) - sum p sign(p - q)
    elif KIND == SQEUCLIDEAN:
        dot = acc_c
        acc_c = n_i[:, None] + n_j[None, :] - 2.0 * dot
        acc_a = 2.0 * (n_i[:, None] - dot)
        acc_b = 2.0 * (n_j[None, :] - dot)
    elif KIND == HELLINGER:
        dot = acc_c
        acc_c = n_i[:, None] + n_j[None, :] - 2.0 * dot
        acc_a = -dot
        acc_b = -dot
    m = mask_i[:, None] & mask_j[None, :]
    off = rows_i[:, None].to(tl.int64) * G + jj[None, :]
    tl.store(OUT_C + off, acc_c, mask=m)
    tl.store(OUT_A + off, acc_a, mask=m)
    tl.store(OUT_B + off, acc_b, mask=m)


@triton.jit
def _sinkhorn_grad_kernel(X, Y, LSE_X, LSE_Y, GM, SX, RSX, OUT, N, V, G, n_iblocks, stride_x, stride_y,
                          inv_temp, KIND: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    pid0 = tl.program_id(0)
    vb = tl.program_id(1)
    grp = pid0 // n_iblocks
    ib = pid0 % n_iblocks
    gstart = grp * G
    gend = tl.minimum(gstart + G, N)
    rows_i = gstart + ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < gend
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    x, zx = _prob_tile(X, LSE_X, rows_i, cols, mask_i, cmask, stride_x, inv_temp)
    acc = tl.zeros((BLOCK_I, BLOCK_V), dtype=tl.float32)
    for j0 in range(0, G, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        rows_j = gstart + jj
        mask_j = rows_j < gend
        gm = tl.load(GM + rows_i[:, None].to(tl.int64) * G + jj[None, :],
                     mask=mask_i[:, None] & mask_j[None, :], other=0.0)
        y, zy = _prob_tile(Y, LSE_Y, rows_j, cols, mask_j, cmask, stride_y, inv_temp)
        if KIND == L1:
            d = x[:, None, :] - y[None, :, :]
            s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            acc += tl.sum(gm[:, :, None] * s, axis=1)
        elif KIND == SQEUCLIDEAN:
            acc = tl.dot(gm, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(gm, tl.exp(0.5 * zy), acc, input_precision="ieee")
    sx = tl.load(SX + rows_i, mask=mask_i, other=0.0)
    if KIND == L1:
        w = x * acc
    elif KIND == SQEUCLIDEAN:
        rs = tl.load(RSX + rows_i, mask=mask_i, other=0.0)
        w = 2.0 * x * (rs[:, None] * x - acc)
    else:
        w = -tl.exp(0.5 * zx) * acc
    grad = (w - x * sx[:, None]) * inv_temp
    tl.store(OUT + rows_i[:, None].to(tl.int64) * stride_x + cols[None, :],
             grad.to(OUT.dtype.element_ty), mask=mask_i[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (signatures in onepass._ops.sinkhorn).
# ----------------------------------------------------------------------------------------------
def _blocks(kind: int) -> tuple[int, int, int]:
    if kind == Cost.L1:
        return 16, 16, (16 if _interpreting() else 32)
    return 16, 16, 64


def sinkhorn_cost(a: torch.Tensor, b: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor,
                  inv_temp: float, group_size: int, kind: int) -> torch.Tensor:
    """[3, N, G] fp32 banded (C, A, B) for logits a, b [N, V] and fp32 lse's [N]."""
    n, v = a.shape
    g = int(group_size)
    out = torch.zeros((3, n, g), dtype=torch.float32, device=a.device)
    if n == 0:
        return out
    bi, bj, bv = _blocks(kind)
    n_ib = triton.cdiv(g, bi)
    n_groups = triton.cdiv(n, g)
    _sinkhorn_cost_kernel[(n_groups * n_ib, triton.cdiv(g, bj))](
        a, b, lse_a, lse_b, out[0], out[1], out[2], n, v, g, n_ib, a.stride(0), b.stride(0), float(inv_temp),
        KIND=int(kind), BLOCK_I=bi, BLOCK_J=bj, BLOCK_V=bv)
    return out


def sinkhorn_grad(x: torch.Tensor, y: torch.Tensor, lse_x: torch.Tensor, lse_y: torch.Tensor,
                  gm: torch.Tensor, sx: torch.Tensor, rsx: torch.Tensor, inv_temp: float, group_size: int,
                  kind: int) -> torch.Tensor:
    """dL/dx [N, V] in x's dtype for the side x (see the module docstring)."""
    n, v = x.shape
    g = int(group_size)
    out = torch.empty_like(x)
    if n == 0:
        return out
    bi, bj, bv = _blocks(kind)
    if kind != Cost.L1:
        bv = 64
    n_ib = triton.cdiv(g, bi)
    n_groups = triton.cdiv(n, g)
    _sinkhorn_grad_kernel[(n_groups * n_ib, triton.cdiv(v, bv))](
        x, y, lse_x, lse_y, gm, sx, rsx, out, n, v, g, n_ib, x.stride(0), y.stride(0), float(inv_temp),
        KIND=int(kind), BLOCK_I=bi, BLOCK_J=bj, BLOCK_V=bv)
    return out


def sinkhorn_grads(a: torch.Tensor, b: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor, gm: torch.Tensor,
                   gm_t: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, inv_temp: float, group_size: int, kind: int,
                   need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/da, dL/db): one ``sinkhorn_grad`` sweep per needed side (the teacher side on gm_t)."""
    ga = sinkhorn_grad(a, b, lse_a, lse_b, gm, sa, gm.sum(1), inv_temp, group_size, kind) if need_a else a.new_empty(0)
    gb = (sinkhorn_grad(b, a, lse_b, lse_a, gm_t, sb, gm_t.sum(1), inv_temp, group_size, kind) if need_b
          else b.new_empty(0))
    return ga, gb
