"""Launchers of the Sinkhorn-distance cost kernels (``onepass.sinkhorn_distance``), per backend.

Banded layout: rows are cut into consecutive groups of ``group_size`` = G rows (the last may be
smaller); a G x G quantity of every group is stored as [N, G], entry (i, jj) pairing student row i with
teacher row gstart(i) + jj (entries past the end of a short last group are 0).

- ``sinkhorn_cost(a, b, inv_temp, group_size, kind, backend) -> (planes [3, N, G], lse [2, N])``:
  planes = (C, A, B) with A_ij = sum_v p_iv dC_ij/dp_iv and B_ij = sum_v q_jv dC_ij/dq_jv (they give
  the softmax-Jacobian means of the backward without another sweep); lse = per-row log-sum-exp of
  a/T and b/T.  fp32 (fp64 for fp64 inputs on the cpu backend).
- ``sinkhorn_grad(x, y, lse_x, lse_y, gm, sx, rsx, inv_temp, group_size, kind, backend) -> dL/dx``:
  one side of the backward; the teacher side passes (b, a) and the transposed upstream matrix.

Kinds: 0 l1, 1 sqeuclidean, 2 hellinger.  Backends: ``"triton"`` (triton_kernels/sinkhorn.py, every
cost), ``"cpu"`` (C++/OpenMP ``onepass._C.sinkhorn_l1_*`` for l1; a vocab-chunked torch GEMM path for
the GEMM costs).  Inputs are [N, V] contiguous; nothing validates here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from onepass.backends._common import dtype_code, ptr, stats_dtype

COST_KINDS = {"l1": 0, "sqeuclidean": 1, "hellinger": 2}

# Scratch budget of the chunked torch paths: elements of one [rows, vocab-chunk] temporary.
_CHUNK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------------------------
# Banded helpers (small [N, G] matrices; shared with python/onepass/sinkhorn.py).
# ----------------------------------------------------------------------------------------------
def band_transpose(m: torch.Tensor, group_size: int) -> torch.Tensor:
    """Banded [N, G] of the per-group transposes."""
    n, g = m.shape[0], int(group_size)
    nf = n // g
    r = n - nf * g
    parts = []
    if nf:
        parts.append(m[: nf * g].reshape(nf, g, g).transpose(1, 2).reshape(nf * g, g))
    if r:
        parts.append(F.pad(m[nf * g:, :r].T, (0, g - r)))
    return torch.cat(parts).contiguous() if parts else m.clone()


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
# Per-row log-sum-exps.
# ----------------------------------------------------------------------------------------------
def _lse_torch(a: torch.Tensor, b: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """Row-chunked torch.logsumexp of a/T and b/T -> [2, N] in the stats dtype."""
    dt = stats_dtype(a)
    n, v = a.shape
    out = torch.empty((2, n), dtype=dt, device=a.device)
    rows = max(1, _CHUNK_ELEMS // max(v, 1))
    for r0 in range(0, n, rows):
        out[0, r0:r0 + rows] = torch.logsumexp(a[r0:r0 + rows].to(dt) * inv_temp, dim=-1)
        out[1, r0:r0 + rows] = torch.logsumexp(b[r0:r0 + rows].to(dt) * inv_temp, dim=-1)
    return out


def _lse(a: torch.Tensor, b: torch.Tensor, inv_temp: float, backend: str) -> torch.Tensor:
    # Hook: the shared streaming vocab-stats forward of each backend gives lse_a, lse_b in columns 0, 1
    # (docs/vocab_stats.md); fall back to a chunked torch.logsumexp while it is not available.
    try:
        if backend == "triton":
            from onepass.triton_kernels.vocab_stats import vocab_stats_fwd
        else:
            from onepass.backends.cpu import vocab_stats_fwd
    except ImportError:
        return _lse_torch(a, b, inv_temp)
    stats = vocab_stats_fwd(a, b, None, float(inv_temp), 0, 0.0, 0.0, False)
    return stats[:, :2].T.contiguous()


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
        if kind == 1:
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
    if kind == 1:
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
        if kind == 1:
            w = 2.0 * px * (rsx[:, None] * px - _band_apply(gm, zy.exp(), g))
        else:
            w = -(0.5 * zx).exp() * _band_apply(gm, (0.5 * zy).exp(), g)
        out[:, v0:v0 + vc] = (w - px * sx[:, None]) * inv_temp
    return out


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------
def sinkhorn_cost(a: torch.Tensor, b: torch.Tensor, inv_temp: float, group_size: int, kind: int,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = int(group_size)
    lse = _lse(a, b, inv_temp, backend)
    if backend == "triton":
        from onepass.triton_kernels import sinkhorn as tk
        lse = lse.to(torch.float32)
        return tk.sinkhorn_cost(a, b, lse[0], lse[1], inv_temp, g, kind), lse
    if backend != "cpu":
        raise ValueError(f"sinkhorn_cost: unknown backend {backend!r}")
    if kind != 0:
        return _gemm_cost_torch(a, b, lse, inv_temp, g, kind), lse
    from onepass import _C
    n, v = a.shape
    out = torch.empty((3, n, g), dtype=lse.dtype, device=a.device)
    _C.sinkhorn_l1_cost(ptr(a), ptr(b), ptr(lse[0]), ptr(lse[1]), ptr(out), n, v, g, float(inv_temp),
                        dtype_code(a))
    return out, lse


def sinkhorn_grad(x: torch.Tensor, y: torch.Tensor, lse_x: torch.Tensor, lse_y: torch.Tensor,
                  gm: torch.Tensor, sx: torch.Tensor, rsx: torch.Tensor, inv_temp: float, group_size: int,
                  kind: int, backend: str) -> torch.Tensor:
    g = int(group_size)
    if backend == "triton":
        from onepass.triton_kernels import sinkhorn as tk
        f32 = torch.float32
        return tk.sinkhorn_grad(x, y, lse_x.to(f32).contiguous(), lse_y.to(f32).contiguous(),
                                gm.to(f32).contiguous(), sx.to(f32).contiguous(), rsx.to(f32).contiguous(),
                                inv_temp, g, kind)
    if backend != "cpu":
        raise ValueError(f"sinkhorn_grad: unknown backend {backend!r}")
    if kind != 0:
        return _gemm_grad_torch(x, y, lse_x, lse_y, gm, sx, rsx, inv_temp, g, kind)
    from onepass import _C
    n, v = x.shape
    dt = lse_x.dtype
    lse_x, lse_y = lse_x.to(dt).contiguous(), lse_y.to(dt).contiguous()
    gm, sx = gm.to(dt).contiguous(), sx.to(dt).contiguous()
    out = torch.empty_like(x)
    _C.sinkhorn_l1_grad(ptr(x), ptr(y), ptr(lse_x), ptr(lse_y), ptr(gm), ptr(sx), ptr(out), n, v, g,
                        float(inv_temp), dtype_code(x))
    return out
