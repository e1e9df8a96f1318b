"""CPU launchers of the Sinkhorn-distance cost sweeps (signatures and the banded layout in
``onepass._ops.sinkhorn``): the C++/OpenMP kernels of ``onepass._C`` for the l1 cost, a vocab-chunked
torch GEMM path for the sqeuclidean and hellinger costs.  fp32 (fp64 for fp64 inputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._contract import Cost
from .._common import compiled_module, dtype_code, ptr

# Scratch budget of the chunked torch paths: elements of one [rows, vocab-chunk] temporary.
_CHUNK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------------------------
# Banded helpers (small [N, G] matrices).
# ----------------------------------------------------------------------------------------------
def _band_matmul_t(x: torch.Tensor, y: torch.Tensor, g: int) -> torch.Tensor:
    """Banded [N, G] of x_i . y_j for i, j in the same group (x, y [N, K])."""
    n, k = x.shape
    nf = n // g
    r = n - nf * g
    parts = []
    if nf:
        parts.append(torch.bmm(x[: nf * g].reshape(nf, g, k), y[: nf * g].reshape(nf, g, k).transpose(1, 2))
                     .reshape(nf * g, g))
    if r:
        parts.append(F.pad(x[nf * g:] @ y[nf * g:].T, (0, g - r)))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _band_apply(gm: torch.Tensor, y: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] rows sum_j gm_ij y_j over the group (gm banded [N, G], y [N, K])."""
    n, k = y.shape
    nf = n // g
    r = n - nf * g
    parts = []
    if nf:
        parts.append(torch.bmm(gm[: nf * g].reshape(nf, g, g), y[: nf * g].reshape(nf, g, k)).reshape(nf * g, k))
    if r:
        parts.append(gm[nf * g:, :r] @ y[nf * g:])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _vocab_chunk(n: int, v: int) -> int:
    return max(64, min(v, _CHUNK_ELEMS // max(n, 1)))


# ----------------------------------------------------------------------------------------------
# Chunked torch path for the GEMM costs (cpu backend).
# ----------------------------------------------------------------------------------------------
def _gemm_cost_torch(a, b, lse, inv_temp, g, kind):
    dt = lse.dtype
    n, v = a.shape
    dot = torch.zeros((n, g), dtype=dt, device=a.device)
    na = torch.zeros(n, dtype=dt, device=a.device)
    nb = torch.zeros(n, dtype=dt, device=a.device)
    vc = _vocab_chunk(n, v)
    for v0 in range(0, v, vc):
        za = a[:, v0:v0 + vc].to(dt) * inv_temp - lse[0, :, None]
        zb = b[:, v0:v0 + vc].to(dt) * inv_temp - lse[1, :, None]
        pa, pb = za.exp(), zb.exp()
        if kind == Cost.SQEUCLIDEAN:
            na += (pa * pa).sum(1)
            nb += (pb * pb).sum(1)
            dot += _band_matmul_t(pa, pb, g)
        else:
            na += pa.sum(1)
            nb += pb.sum(1)
            dot += _band_matmul_t((0.5 * za).exp(), (0.5 * zb).exp(), g)
    nbj = _band_matmul_t(torch.ones_like(nb)[:, None], nb[:, None], g)  # banded n_b[j]
    valid = _band_matmul_t(torch.ones_like(nb)[:, None], torch.ones_like(nb)[:, None], g)
    nai = na[:, None] * valid
    c = nai + nbj - 2.0 * dot
    if kind == Cost.SQEUCLIDEAN:
        return torch.stack([c, 2.0 * (nai - dot), 2.0 * (nbj - dot)])
    return torch.stack([c, -dot, -dot])


def _gemm_grad_torch(x, y, lse_x, lse_y, gm, sx, rsx, inv_temp, g, kind):
    dt = lse_x.dtype
    n, v = x.shape
    out = torch.empty_like(x)
    vc = _vocab_chunk(n, v)
    for v0 in range(0, v, vc):
        zx = x[:, v0:v0 + vc].to(dt) * inv_temp - lse_x[:, None]
        zy = y[:, v0:v0 + vc].to(dt) * inv_temp - lse_y[:, None]
        px = zx.exp()
        if kind == Cost.SQEUCLIDEAN:
            w = 2.0 * px * (rsx[:, None] * px - _band_apply(gm, zy.exp(), g))
        else:
            w = -(0.5 * zx).exp() * _band_apply(gm, (0.5 * zy).exp(), g)
        out[:, v0:v0 + vc] = (w - px * sx[:, None]) * inv_temp
    return out


# ----------------------------------------------------------------------------------------------
# Entry points (signatures in onepass._ops.sinkhorn).
# ----------------------------------------------------------------------------------------------
def sinkhorn_cost(a, b, lse_a, lse_b, inv_temp, group_size, kind):
    g = int(group_size)
    lse = torch.stack([lse_a, lse_b])
    if kind != Cost.L1:
        return _gemm_cost_torch(a, b, lse, inv_temp, g, kind)
    n, v = a.shape
    out = torch.empty((3, n, g), dtype=lse.dtype, device=a.device)
    compiled_module().sinkhorn_l1_cost(ptr(a), ptr(b), ptr(lse_a), ptr(lse_b), ptr(out), n, v, g, float(inv_temp),
                                       dtype_code(a))
    return out


def sinkhorn_grads(a, b, lse_a, lse_b, gm, gm_t, sa, sb, inv_temp, group_size, kind, need_a, need_b):
    g = int(group_size)
    if kind != Cost.L1:
        ga = _gemm_grad_torch(a, b, lse_a, lse_b, gm, sa, gm.sum(1), inv_temp, g, kind) if need_a else a.new_empty(0)
        gb = (_gemm_grad_torch(b, a, lse_b, lse_a, gm_t, sb, gm_t.sum(1), inv_temp, g, kind) if need_b
              else b.new_empty(0))
        return ga, gb
    n, v = a.shape
    ga = torch.empty_like(a) if need_a else a.new_empty(0)
    gb = torch.empty_like(b) if need_b else b.new_empty(0)
    compiled_module().sinkhorn_l1_grads(ptr(a), ptr(b), ptr(lse_a), ptr(lse_b), ptr(gm), ptr(sa), ptr(sb),
                                        ptr(ga) if need_a else 0, ptr(gb) if need_b else 0, n, v, g, float(inv_temp),
                                        dtype_code(a))
    return ga, gb
