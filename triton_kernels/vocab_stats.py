"""Triton vocab-stats kernels: the one streaming mechanism of onepass (docs/vocab_stats.md).

One tile producer (`_logit_tile`) yields a [BLOCK_N, BLOCK_V] tile of scaled logits either loaded
from a logits tensor or computed as hidden @ weight.T (+ bias) with `tl.dot` over D (the logits then
exist only as that tile).  On top of it:

- `_vocab_stats_fwd_kernel`: per block of rows, an online (running-max) sweep over the vocabulary of
  one or two models -> lse, target log-probs, entropy, the KL accumulators; a second sweep only for
  the divergence kinds that need both normalizers first (jsd, tv, hellinger, chi2, alpha).
- `_vocab_stats_split_kernel` + `_vocab_stats_merge_kernel`: the same sweeps (same helpers) with the
  vocabulary split across programs when the rows alone cannot fill the GPU (fused-linear path;
  docs/gpu.md): partial accumulators per (row block, vocab range), merged in a fixed order.
- `_vocab_grad_kernel`: a 2-D grid over (row block, vocab block) that recomputes the tile and writes
  dL/dlogits from the per-row stats and upstream gradients.

Continuous hyperparameters (inverse temperature, beta, alpha) are runtime arguments; only structural
switches are `tl.constexpr`.  No autotuning: block sizes are picked by the launchers.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from onepass._contract import NUM_GRADS, NUM_STATS, Grad, Kind, Stat
from onepass._dispatch import triton_interpreting as _interpreting

NEG_INF = float("-inf")

# The kernel contract (onepass._contract) as compile-time constants of the kernels.
STATS_STRIDE = tl.constexpr(NUM_STATS)
GRADS_STRIDE = tl.constexpr(NUM_GRADS)
LSE_A, LSE_B, LOGP_A, LOGP_B, ENTROPY, DIV, SUM_A, SUM_B = (
    tl.constexpr(int(c)) for c in (Stat.LSE_A, Stat.LSE_B, Stat.LOGP_A, Stat.LOGP_B, Stat.ENTROPY, Stat.DIV,
                                   Stat.SUM_A, Stat.SUM_B))
G_LOGP_A, G_LOGP_B, G_ENTROPY, G_DIV = (tl.constexpr(int(c)) for c in (Grad.LOGP_A, Grad.LOGP_B, Grad.ENTROPY, Grad.DIV))
NONE, REVERSE_KL, FORWARD_KL, JSD, TV, HELLINGER, CHI2, ALPHA = (tl.constexpr(int(k)) for k in Kind)


# ----------------------------------------------------------------------------------------------
# Accurate elementary functions (no libdevice: it is unavailable under the interpreter).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _expm1(x):
    # Kahan: exact at 0, a few ulps elsewhere; expm1(-inf) = -1, expm1(inf) = inf.
    u = tl.exp(x)
    um1 = u - 1.0
    r = um1 * x / tl.log(u)
    r = tl.where(um1 == -1.0, -1.0, r)
    r = tl.where(u == float("inf"), float("inf"), r)
    return tl.where(u == 1.0, x, r)


@triton.jit
def _tanh(x):
    # |x| < 0.1: x - x³/3 + 2x⁵/15 (next term 17x⁷/315: < 1e-8 relative); else (1 - u) / (1 + u) with
    # u = exp(-2|x|) <= 0.82 (no cancellation, never inf / inf).  Sign restored.  No IEEE division: its
    # slow-path subroutine costs a stack frame on sm_90 (aot_check).
    a = tl.abs(x)
    a2 = a * a
    u = tl.exp(-2.0 * a)
    t = tl.where(a < 0.1, a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0))),
                 tl.fdiv(1.0 - u, 1.0 + u, ieee_rounding=False))
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _log1p(x):
    u = 1.0 + x
    r = tl.log(u) * x / (u - 1.0)
    r = tl.where(u == float("inf"), float("inf"), r)
    return tl.where(u == 1.0, x, r)


@triton.jit
def _g(base, lbase, x, c):
    """base·(exp(c x) − 1)/c with base = exp(lbase); = base·x at c = 0, = 0 where lbase = −inf (not
    where base merely underflows: exp(lbase + c x) may still be large).  For c·x > 1
    it is (exp(lbase + c x) − base)/c: no cancellation there, and no inf·tiny where exp(c x) overflows."""
    t = c * x
    safe_c = tl.where(c == 0.0, 1.0, c)
    r = tl.where(t > 1.0, tl.exp(lbase + t) - base, base * _expm1(t)) / safe_c
    r = tl.where(c == 0.0, base * x, r)
    return tl.where(lbase == float("-inf"), 0.0, r)


@triton.jit
def _j(x, w):
    """log(w exp(x) + 1 - w) for 0 < w < 1, exact 0 at x = 0, no overflow for large x."""
    # x <= 0: log1p(w expm1(x));  x > 0: x + log w + log1p((1 - w)/w exp(-x)).  The branch is chosen
    # before the one log1p (fewer live temporaries in the jsd epilogue).
    neg = x <= 0.0
    xp = tl.maximum(x, 0.0)
    arg = tl.where(neg, w * _expm1(tl.minimum(x, 0.0)), (1.0 - w) / w * tl.exp(-xp))
    return _log1p(arg) + tl.where(neg, 0.0, xp + tl.log(w))


@triton.jit
def _phi(la, lb, p, q, beta, alpha, KIND: tl.constexpr):
    """(phi, phi_a, phi_b) of docs/vocab_stats.md for one tile; 0 where p = q = 0."""
    zero = tl.zeros_like(p)
    if KIND == REVERSE_KL:  # reverse KL
        d = tl.where(p > 0.0, p * (la - lb), zero)
        phi = d
        phi_a = d
        phi_b = q - p
    elif KIND == FORWARD_KL:  # forward KL
        d = tl.where(q > 0.0, q * (lb - la), zero)
        phi = d
        phi_a = p - q
        phi_b = d
    elif KIND == JSD:  # generalized JSD
        d_a = -_j(lb - la, beta)
        d_b = -_j(la - lb, 1.0 - beta)
        phi_a = tl.where(p > 0.0, (1.0 - beta) * p * d_a, zero)
        phi_b = tl.where(q > 0.0, beta * q * d_b, zero)
        phi = phi_a + phi_b
    elif KIND == TV:  # total variation
        sgn = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        phi = 0.5 * tl.abs(p - q)
        phi_a = 0.5 * sgn * p
        phi_b = -0.5 * sgn * q
    elif KIND == HELLINGER:  # squared Hellinger
        ea = _expm1(0.5 * (lb - la))
        eb = _expm1(0.5 * (la - lb))
        sq = tl.exp(0.5 * (la + lb))  # √(pq)
        phi = tl.where(p >= q, p * ea * ea, q * eb * eb)
        phi = tl.where((p == 0.0) & (q == 0.0), zero, phi)
        phi_a = tl.where(lb - la > 1.0, p - sq, -p * ea)
        phi_a = tl.where(p > 0.0, phi_a, zero)
        phi_b = tl.where(la - lb > 1.0, q - sq, -q * eb)
        phi_b = tl.where(q > 0.0, phi_b, zero)
    elif KIND == CHI2:  # Pearson chi^2
        e = _expm1(la - lb)
        r = tl.exp(2.0 * la - lb)  # p²/q, used where la − lb > 1 (no cancellation, no inf·tiny)
        big = la - lb > 1.0
        inf = float("inf")
        phi = tl.where(big, r - 2.0 * p + q, q * e * e)
        phi_a = tl.where(big, 2.0 * (r - p), 2.0 * p * e)
        phi_b = tl.where(big, q - r, -(p + q) * e)
        q_zero = lb == float("-inf")  # exactly 0, not an underflowed q (p²/q may still be finite)
        p_zero = la == float("-inf")
        phi = tl.where(q_zero, tl.where(p_zero, zero, inf), phi)
        phi_a = tl.where(q_zero, tl.where(p_zero, zero, inf), phi_a)
        phi_b = tl.where(q_zero, tl.where(p_zero, zero, -inf), phi_b)
    else:  # KIND == ALPHA: Amari alpha
        ga = _g(p, la, lb - la, 1.0 - alpha)
        gb = _g(q, lb, la - lb, alpha)
        hi = -(ga + p - q) / alpha
        lo = (gb - p + q) / (alpha - 1.0)
        phi = tl.where(alpha >= 0.5, hi, lo)
        phi = tl.where((p == 0.0) & (q == 0.0), zero, phi)
        phi_a = -ga
        phi_b = -gb
    return phi, phi_a, phi_b


# ----------------------------------------------------------------------------------------------
# The tile producer.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logit_tile(X, H, W, BIAS, rows, cols, row_mask, col_mask, stride_x, D, inv_temp, softcap,
                LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mapped logits of z[rows, cols] as fp32 [BLOCK_N, BLOCK_V]: z * inv_temp, or with a soft-cap
    c = softcap > 0 (a runtime value) inv_temp * c * tanh(z / c); -inf outside the vocab."""
    if LINEAR:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            ks = k + tl.arange(0, BLOCK_D)
            kmask = ks < D
            h = tl.load(H + rows[:, None] * D + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(W + cols[None, :] * D + ks[:, None], mask=col_mask[None, :] & kmask[:, None], other=0.0)
            if DOT_F32:
                # 3xTF32 (hi·hi + hi·lo + lo·hi on the tensor cores): fp32-level accuracy; the "ieee"
                # FMA dot spilled in the K-loop on sm_90 (aot_check)
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32x3")
            else:
                acc = tl.dot(h, w, acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                      mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    if softcap > 0.0:
        acc = (inv_temp * softcap) * _tanh(acc * tl.fdiv(1.0, softcap, ieee_rounding=False))
    else:
        acc = acc * inv_temp
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def _map_slope(x, inv_temp, softcap):
    """dx/dz of mapped logits x (``_logit_tile``): inv_temp, or inv_temp * (1 - tanh²) with
    tanh = x / (inv_temp * c) under a soft-cap c > 0."""
    if softcap > 0.0:
        t = x * tl.fdiv(1.0, inv_temp * softcap, ieee_rounding=False)
        slope = inv_temp * (1.0 - t * t)
    else:
        slope = tl.zeros_like(x) + inv_temp  # not x * 0: x = -inf (a masked entry) would give NaN
    return slope


@triton.jit
def _online(m, s, x):
    """Fold tile x [BN, BV] into the running (max, sum-exp); returns new m, s, the rescale factor of
    old accumulators and exp(x - m_new) (0 at -inf entries, never NaN from -inf - -inf)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe[:, None])
    s = s * scale + tl.sum(e, 1)
    return m_new, s, scale, e


@triton.jit
def _lse(m, s):
    # m = -inf: no finite logit; s * 0 keeps a NaN logit there NaN (tl.max skips NaN, the sum does not)
    return tl.where(m == float("-inf"), m + s * 0.0, m + tl.log(s))


@triton.jit
def _row_block(TGT, N, block, HAS_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows of row block ``block`` (int64), their mask, targets (-1 when absent) and the live (not ignored) mask."""
    rows = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    if HAS_T:
        y = tl.load(TGT + rows, mask=row_mask, other=-1)
        live = row_mask & (y >= 0)
    else:
        y = tl.full((BLOCK_N,), -1, tl.int64)
        live = row_mask
    return rows, row_mask, y, live


# ----------------------------------------------------------------------------------------------
# Forward: per-row stats.  The two sweeps over a vocab range [v_lo, v_hi) are helpers shared by the
# whole-vocabulary kernel and the split-vocabulary kernels; so are the finishing math and the store.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fresh_accumulators(BLOCK_N: tl.constexpr):
    """The sweep-1 accumulators (m_a, s_a, t_a, y_a, m_b, s_b, y_b, k) of no column yet: maxima −inf, sums 0."""
    zeros = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return zeros + float("-inf"), zeros, zeros, zeros, zeros + float("-inf"), zeros, zeros, zeros


@triton.jit
def _online_sweep(A, B, HA, WA, BIAS_A, HB, WB, BIAS_B, rows, live, y, v_lo, v_hi, D, DB, stride_a, stride_b,
                  inv_temp_a, softcap_a, inv_temp_b, softcap_b,
                  LINEAR: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS_A: tl.constexpr, HAS_BIAS_B: tl.constexpr,
                  KIND: tl.constexpr, NEED_ENT: tl.constexpr, DOT_F32: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sweep 1 over the columns [v_lo, v_hi) (v_lo a multiple of BLOCK_V): the online accumulators
    (m_a, s_a, t_a, y_a, m_b, s_b, y_b, k), each [BLOCK_N] fp32.  s, t and k are relative to their max
    (t_a, and k of reverse KL, to m_a; k of forward KL to m_b); y_a, y_b are the target logits when the
    target lies in the range, else 0."""
    m_a, s_a, t_a, y_a, m_b, s_b, y_b, k = _fresh_accumulators(BLOCK_N)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_hi
        a = _logit_tile(A, HA, WA, BIAS_A, rows, cols, live, col_mask, stride_a, D, inv_temp_a, softcap_a,
                        LINEAR, HAS_BIAS_A, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D)
        m_a, s_a, scale_a, e_a = _online(m_a, s_a, a)
        hit = cols[None, :] == y[:, None]
        y_a += tl.sum(tl.where(hit, a, 0.0), 1)
        if NEED_ENT:
            t_a = t_a * scale_a + tl.sum(tl.where(e_a > 0.0, e_a * a, 0.0), 1)
        if HAS_B:
            b = _logit_tile(B, HB, WB, BIAS_B, rows, cols, live, col_mask, stride_b, DB, inv_temp_b, softcap_b,
                            LINEAR, HAS_BIAS_B, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D)
            m_b, s_b, scale_b, e_b = _online(m_b, s_b, b)
            y_b += tl.sum(tl.where(hit, b, 0.0), 1)
            if KIND == REVERSE_KL:
                k = k * scale_a + tl.sum(tl.where(e_a > 0.0, e_a * (a - b), 0.0), 1)
            if KIND == FORWARD_KL:
                k = k * scale_b + tl.sum(tl.where(e_b > 0.0, e_b * (b - a), 0.0), 1)
    return m_a, s_a, t_a, y_a, m_b, s_b, y_b, k


@triton.jit
def _finish_online(m_a, s_a, t_a, m_b, s_b, k, HAS_B: tl.constexpr, KIND: tl.constexpr, NEED_ENT: tl.constexpr):
    """(lse_a, lse_b, entropy, div, sum_a, sum_b) from the sweep-1 accumulators of the whole vocabulary;
    div, sum_a, sum_b are 0 for the kinds of the second sweep (kind >= JSD)."""
    zeros = tl.zeros_like(m_a)
    lse_a = _lse(m_a, s_a)
    if HAS_B:
        lse_b = _lse(m_b, s_b)
    else:
        lse_b = zeros  # the contract: every b-statistic is 0 without b
    if NEED_ENT:
        ent = lse_a - t_a / s_a
    else:
        ent = zeros
    div = zeros
    sum_a = zeros
    sum_b = zeros
    if KIND == REVERSE_KL:
        div = k / s_a - lse_a + lse_b
        sum_a = div
    if KIND == FORWARD_KL:
        div = k / s_b - lse_b + lse_a
        sum_b = div
    return lse_a, lse_b, ent, div, sum_a, sum_b


@triton.jit
def _phi_sweep(A, B, HA, WA, BIAS_A, HB, WB, BIAS_B, rows, live, lse_a, lse_b, v_lo, v_hi, D, DB, stride_a, stride_b,
               inv_temp_a, softcap_a, inv_temp_b, softcap_b, beta, alpha,
               LINEAR: tl.constexpr, HAS_BIAS_A: tl.constexpr, HAS_BIAS_B: tl.constexpr, KIND: tl.constexpr,
               DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sweep 2 (kinds >= JSD) over the columns [v_lo, v_hi) given both normalizers: Σφ, Σφ_a, Σφ_b [BLOCK_N]."""
    zeros = tl.zeros((BLOCK_N,), dtype=tl.float32)
    div = zeros
    sum_a = zeros
    sum_b = zeros
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_hi
        la = _logit_tile(A, HA, WA, BIAS_A, rows, cols, live, col_mask, stride_a, D, inv_temp_a, softcap_a,
                         LINEAR, HAS_BIAS_A, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D) - lse_a[:, None]
        lb = _logit_tile(B, HB, WB, BIAS_B, rows, cols, live, col_mask, stride_b, DB, inv_temp_b, softcap_b,
                         LINEAR, HAS_BIAS_B, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D) - lse_b[:, None]
        phi, phi_a, phi_b = _phi(la, lb, tl.exp(la), tl.exp(lb), beta, alpha, KIND)
        div += tl.sum(phi, 1)
        sum_a += tl.sum(phi_a, 1)
        sum_b += tl.sum(phi_b, 1)
    return div, sum_a, sum_b


@triton.jit
def _div_nan_policy(div, lse_a, lse_b):
    # NaN policy of the second-sweep kinds: a row with a NaN logit or no finite logit has a NaN
    # divergence (the φ terms guard p = q = 0 and would otherwise give 0 there)
    return tl.where((lse_a - lse_a == 0.0) & (lse_b - lse_b == 0.0), div, float("nan"))


@triton.jit
def _store_stats(STATS, rows, row_mask, live, y, V, lse_a, lse_b, y_a, y_b, ent, div, sum_a, sum_b,
                 HAS_T: tl.constexpr):
    """Write the 8 stats of the rows (0 on ignored rows); see docs/vocab_stats.md."""
    out = STATS + rows * STATS_STRIDE
    tl.store(out + LSE_A, tl.where(live, lse_a, 0.0), mask=row_mask)
    tl.store(out + LSE_B, tl.where(live, lse_b, 0.0), mask=row_mask)
    if HAS_T:
        # a target ≥ V (unchecked under torch.compile) gives NaN, never a wrong finite number
        in_range = y < V
        tl.store(out + LOGP_A, tl.where(live, tl.where(in_range, y_a - lse_a, float("nan")), 0.0), mask=row_mask)
        tl.store(out + LOGP_B, tl.where(live, tl.where(in_range, y_b - lse_b, float("nan")), 0.0), mask=row_mask)
    else:
        zeros = tl.zeros_like(lse_a)
        tl.store(out + LOGP_A, zeros, mask=row_mask)
        tl.store(out + LOGP_B, zeros, mask=row_mask)
    tl.store(out + ENTROPY, tl.where(live, ent, 0.0), mask=row_mask)
    tl.store(out + DIV, tl.where(live, div, 0.0), mask=row_mask)
    tl.store(out + SUM_A, tl.where(live, sum_a, 0.0), mask=row_mask)
    tl.store(out + SUM_B, tl.where(live, sum_b, 0.0), mask=row_mask)


@triton.jit
def _vocab_stats_fwd_kernel(
    A, B, HA, WA, BIAS_A, HB, WB, BIAS_B, TGT, STATS,
    N, V, D, DB, stride_a, stride_b, inv_temp_a, softcap_a, inv_temp_b, softcap_b, beta, alpha,
    LINEAR: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS_A: tl.constexpr, HAS_BIAS_B: tl.constexpr,
    HAS_T: tl.constexpr, KIND: tl.constexpr, NEED_ENT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row block, both sweeps over the whole vocabulary."""
    rows, row_mask, y, live = _row_block(TGT, N, tl.program_id(0), HAS_T, BLOCK_N)
    m_a, s_a, t_a, y_a, m_b, s_b, y_b, k = _online_sweep(
        A, B, HA, WA, BIAS_A, HB, WB, BIAS_B, rows, live, y, 0, V, D, DB, stride_a, stride_b,
        inv_temp_a, softcap_a, inv_temp_b, softcap_b, LINEAR, HAS_B, HAS_BIAS_A, HAS_BIAS_B, KIND, NEED_ENT, DOT_F32,
        BLOCK_N, BLOCK_V, BLOCK_D)
    lse_a, lse_b, ent, div, sum_a, sum_b = _finish_online(m_a, s_a, t_a, m_b, s_b, k, HAS_B, KIND, NEED_ENT)
    if KIND >= JSD:  # the kinds that need both normalizers first
        div, sum_a, sum_b = _phi_sweep(
            A, B, HA, WA, BIAS_A, HB, WB, BIAS_B, rows, live, lse_a, lse_b, 0, V, D, DB, stride_a, stride_b,
            inv_temp_a, softcap_a, inv_temp_b, softcap_b, beta, alpha, LINEAR, HAS_BIAS_A, HAS_BIAS_B, KIND, DOT_F32,
            BLOCK_N, BLOCK_V, BLOCK_D)
        div = _div_nan_policy(div, lse_a, lse_b)
    _store_stats(STATS, rows, row_mask, live, y, V, lse_a, lse_b, y_a, y_b, ent, div, sum_a, sum_b, HAS_T)


# ----------------------------------------------------------------------------------------------
# Forward split across the vocabulary (fused-linear path, few rows): partial accumulators per
# (row block, vocab split) into a fp32 workspace [S, N, PART_STRIDE], merged in split order.
# ----------------------------------------------------------------------------------------------
#: Columns of one partial-accumulator record; sweep 2 reuses the first three for (Σφ, Σφ_a, Σφ_b).
PART_COLS = 8
PART_STRIDE = tl.constexpr(PART_COLS)
P_M_A, P_S_A, P_T_A, P_Y_A, P_M_B, P_S_B, P_Y_B, P_K = (tl.constexpr(c) for c in range(8))
P_DIV, P_SUM_A, P_SUM_B = (tl.constexpr(c) for c in range(3))


@triton.jit
def _split_program(TGT, N, V, num_splits, tiles_per_split, HAS_T: tl.constexpr, GROUP_ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Map the 1-D program id to (rows..., split, v_lo, v_hi).  Programs come in groups of GROUP_ROWS
    row blocks x num_splits splits, split-major inside a group: consecutive programs (those resident
    together) take the same split of neighbouring row blocks, so they stream the same weight tiles
    (L2 reuse of W) while their few hidden rows stay in L2 too."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_ROWS * num_splits
    group = pid // per_group
    first = group * GROUP_ROWS
    rows_in_group = tl.minimum(row_blocks - first, GROUP_ROWS)
    local = pid - group * per_group
    split = local // rows_in_group
    rows, row_mask, y, live = _row_block(TGT, N, first + local % rows_in_group, HAS_T, BLOCK_N)
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    return rows, row_mask, y, live, split, v_lo, v_hi


@triton.jit
def _vocab_stats_split_kernel(
    HA, WA, BIAS_A, HB, WB, BIAS_B, TGT, STATS, PARTS,
    N, V, D, DB, num_splits, tiles_per_split, inv_temp_a, softcap_a, inv_temp_b, softcap_b, beta, alpha,
    HAS_B: tl.constexpr, HAS_BIAS_A: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_T: tl.constexpr,
    KIND: tl.constexpr, NEED_ENT: tl.constexpr, DOT_F32: tl.constexpr, SWEEP: tl.constexpr,
    GROUP_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (row block, vocab split).  SWEEP 1: the online accumulators of the split's
    columns -> PARTS[split, rows, 0:8].  SWEEP 2 (kinds >= JSD, after the sweep-1 merge has written
    lse_a, lse_b to STATS): the split's (Σφ, Σφ_a, Σφ_b) -> PARTS[split, rows, 0:3]."""
    rows, row_mask, y, live, split, v_lo, v_hi = _split_program(TGT, N, V, num_splits, tiles_per_split, HAS_T,
                                                                GROUP_ROWS, BLOCK_N, BLOCK_V)
    part = PARTS + (split * N + rows) * PART_STRIDE
    if SWEEP == 1:
        m_a, s_a, t_a, y_a, m_b, s_b, y_b, k = _online_sweep(
            HA, HB, HA, WA, BIAS_A, HB, WB, BIAS_B, rows, live, y, v_lo, v_hi, D, DB, 0, 0,
            inv_temp_a, softcap_a, inv_temp_b, softcap_b, True, HAS_B, HAS_BIAS_A, HAS_BIAS_B, KIND, NEED_ENT,
            DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D)
        tl.store(part + P_M_A, m_a, mask=row_mask)
        tl.store(part + P_S_A, s_a, mask=row_mask)
        tl.store(part + P_T_A, t_a, mask=row_mask)
        tl.store(part + P_Y_A, y_a, mask=row_mask)
        tl.store(part + P_M_B, m_b, mask=row_mask)
        tl.store(part + P_S_B, s_b, mask=row_mask)
        tl.store(part + P_Y_B, y_b, mask=row_mask)
        tl.store(part + P_K, k, mask=row_mask)
    else:
        st = STATS + rows * STATS_STRIDE
        lse_a = tl.load(st + LSE_A, mask=row_mask, other=0.0)
        lse_b = tl.load(st + LSE_B, mask=row_mask, other=0.0)
        div, sum_a, sum_b = _phi_sweep(
            HA, HB, HA, WA, BIAS_A, HB, WB, BIAS_B, rows, live, lse_a, lse_b, v_lo, v_hi, D, DB, 0, 0,
            inv_temp_a, softcap_a, inv_temp_b, softcap_b, beta, alpha, True, HAS_BIAS_A, HAS_BIAS_B, KIND, DOT_F32,
            BLOCK_N, BLOCK_V, BLOCK_D)
        tl.store(part + P_DIV, div, mask=row_mask)
        tl.store(part + P_SUM_A, sum_a, mask=row_mask)
        tl.store(part + P_SUM_B, sum_b, mask=row_mask)


@triton.jit
def _merge_max(m, s, m_i, s_i):
    """Merge two (max, Σexp(x − max)) pairs; also returns the rescale factors of each side's sums."""
    m_new = tl.maximum(m, m_i)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    c = tl.exp(m - m_safe)
    c_i = tl.exp(m_i - m_safe)
    return m_new, s * c + s_i * c_i, c, c_i


@triton.jit
def _vocab_stats_merge_kernel(
    TGT, STATS, PARTS, N, V, num_splits,
    HAS_B: tl.constexpr, HAS_T: tl.constexpr, KIND: tl.constexpr, NEED_ENT: tl.constexpr, SWEEP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Merge the partials of PARTS [num_splits, N, PART_STRIDE] in split order (deterministic) and write
    the stats contract.  SWEEP 1: rescale each split's sums by exp(m_i − m) and add; every stat (div,
    sum_a, sum_b are those of kinds < JSD, 0 otherwise).  SWEEP 2: add the φ sums; div, sum_a, sum_b."""
    rows, row_mask, y, live = _row_block(TGT, N, tl.program_id(0), HAS_T, BLOCK_N)
    zeros = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SWEEP == 1:
        m_a, s_a, t_a, y_a, m_b, s_b, y_b, k = _fresh_accumulators(BLOCK_N)
        for i in range(num_splits):
            part = PARTS + (i * N + rows) * PART_STRIDE
            m_a, s_a, c_a, c_ai = _merge_max(m_a, s_a, tl.load(part + P_M_A, mask=row_mask, other=float("-inf")),
                                             tl.load(part + P_S_A, mask=row_mask, other=0.0))
            y_a += tl.load(part + P_Y_A, mask=row_mask, other=0.0)
            if NEED_ENT:
                t_a = t_a * c_a + tl.load(part + P_T_A, mask=row_mask, other=0.0) * c_ai
            if HAS_B:
                m_b, s_b, c_b, c_bi = _merge_max(m_b, s_b,
                                                 tl.load(part + P_M_B, mask=row_mask, other=float("-inf")),
                                                 tl.load(part + P_S_B, mask=row_mask, other=0.0))
                y_b += tl.load(part + P_Y_B, mask=row_mask, other=0.0)
                if KIND == REVERSE_KL:
                    k = k * c_a + tl.load(part + P_K, mask=row_mask, other=0.0) * c_ai
                if KIND == FORWARD_KL:
                    k = k * c_b + tl.load(part + P_K, mask=row_mask, other=0.0) * c_bi
        lse_a, lse_b, ent, div, sum_a, sum_b = _finish_online(m_a, s_a, t_a, m_b, s_b, k, HAS_B, KIND, NEED_ENT)
        _store_stats(STATS, rows, row_mask, live, y, V, lse_a, lse_b, y_a, y_b, ent, div, sum_a, sum_b, HAS_T)
    else:
        div = zeros
        sum_a = zeros
        sum_b = zeros
        for i in range(num_splits):
            part = PARTS + (i * N + rows) * PART_STRIDE
            div += tl.load(part + P_DIV, mask=row_mask, other=0.0)
            sum_a += tl.load(part + P_SUM_A, mask=row_mask, other=0.0)
            sum_b += tl.load(part + P_SUM_B, mask=row_mask, other=0.0)
        st = STATS + rows * STATS_STRIDE
        div = _div_nan_policy(div, tl.load(st + LSE_A, mask=row_mask, other=0.0),
                              tl.load(st + LSE_B, mask=row_mask, other=0.0))
        tl.store(st + DIV, tl.where(live, div, 0.0), mask=row_mask)
        tl.store(st + SUM_A, tl.where(live, sum_a, 0.0), mask=row_mask)
        tl.store(st + SUM_B, tl.where(live, sum_b, 0.0), mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Backward: dL/dlogits, one recompute of each tile.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _vocab_grad_kernel(
    A, B, HA, WA, BIAS_A, HB, WB, BIAS_B, TGT, STATS, GRADS, GA, GB,
    N, V, D, DB, stride_a, stride_b, stride_ga, stride_gb, inv_temp_a, softcap_a, inv_temp_b, softcap_b, beta, alpha,
    LINEAR: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS_A: tl.constexpr, HAS_BIAS_B: tl.constexpr,
    HAS_T: tl.constexpr, KIND: tl.constexpr, WRITE_A: tl.constexpr, WRITE_B: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_mask, y, live = _row_block(TGT, N, tl.program_id(0), HAS_T, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols < V
    st = STATS + rows * STATS_STRIDE
    gr = GRADS + rows * GRADS_STRIDE
    lse_a = tl.load(st + LSE_A, mask=live, other=0.0)
    ent = tl.load(st + ENTROPY, mask=live, other=0.0)
    s_a = tl.load(st + SUM_A, mask=live, other=0.0)
    g_la = tl.load(gr + G_LOGP_A, mask=live, other=0.0)
    g_lb = tl.load(gr + G_LOGP_B, mask=live, other=0.0)
    g_h = tl.load(gr + G_ENTROPY, mask=live, other=0.0)
    g_d = tl.load(gr + G_DIV, mask=live, other=0.0)
    hit = cols[None, :] == y[:, None]
    xa = _logit_tile(A, HA, WA, BIAS_A, rows, cols, live, col_mask, stride_a, D, inv_temp_a, softcap_a,
                     LINEAR, HAS_BIAS_A, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D)
    la = xa - lse_a[:, None]
    p = tl.exp(la)
    p_la_h = tl.where(p > 0.0, p * (la + ent[:, None]), 0.0)
    d_a = g_la[:, None] * (tl.where(hit, 1.0, 0.0) - p) - g_h[:, None] * p_la_h
    if HAS_B:
        lse_b = tl.load(st + LSE_B, mask=live, other=0.0)
        s_b = tl.load(st + SUM_B, mask=live, other=0.0)
        xb = _logit_tile(B, HB, WB, BIAS_B, rows, cols, live, col_mask, stride_b, DB, inv_temp_b, softcap_b,
                         LINEAR, HAS_BIAS_B, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D)
        lb = xb - lse_b[:, None]
        q = tl.exp(lb)
        d_b = g_lb[:, None] * (tl.where(hit, 1.0, 0.0) - q)
        if KIND != NONE:
            phi, phi_a, phi_b = _phi(la, lb, p, q, beta, alpha, KIND)
            d_a += g_d[:, None] * (phi_a - p * s_a[:, None])
            d_b += g_d[:, None] * (phi_b - q * s_b[:, None])
        if WRITE_B:
            d_b = tl.where(live[:, None], d_b * _map_slope(xb, inv_temp_b, softcap_b), 0.0)
            tl.store(GB + rows[:, None] * stride_gb + cols[None, :], d_b.to(GB.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
    if WRITE_A:
        d_a = tl.where(live[:, None], d_a * _map_slope(xa, inv_temp_a, softcap_a), 0.0)
        tl.store(GA + rows[:, None] * stride_ga + cols[None, :], d_a.to(GA.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (docs/vocab_stats.md signatures).
# ----------------------------------------------------------------------------------------------
def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype == torch.float64:
        raise TypeError("the triton backend takes float32/float16/bfloat16 tensors; use backend='cpu' or "
                        "'torch' for float64")


def _blocks_logits(n: int, v: int) -> tuple[int, int]:
    cap = 1024 if _interpreting() else 4096
    block_v = min(triton.next_power_of_2(max(v, 1)), cap)
    block_n = max(1, min(16, cap // block_v))
    return block_n, block_v


def _blocks_linear(d: int, kind: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D) of the fused-linear kernels.  The divergences that need a second
    sweep (kind >= Kind.JSD) keep la, lb, p, q and their φ terms live at once: half as wide a vocab tile keeps
    them in registers on sm_90 (aot_check), at the cost of smaller GEMM tiles for those kinds."""
    if _interpreting():
        return 16, 128, min(64, max(16, triton.next_power_of_2(d)))
    return 64, (64 if kind >= Kind.JSD else 128), 64


def _num_warps(two_models: bool) -> int:
    """Warps per program: 8 when a second model's tiles (and the divergence epilogue on both) are live,
    so that each thread holds half as many tile elements; with 4, the two-model kernels spill on sm_90
    (``python -m onepass.triton_kernels.aot_check``)."""
    return 8 if two_models else 4


def _empty_stats(n: int, device) -> torch.Tensor:
    return torch.zeros((n, NUM_STATS), dtype=torch.float32, device=device)


def vocab_stats_fwd(a, b, targets, logit_map, kind, beta, alpha, need_entropy):
    """Per-row stats [N, NUM_STATS] fp32 of logits a [N, V] (and b [N, V]); see docs/vocab_stats.md."""
    _check_dtype(a)
    n, v = a.shape
    stats = _empty_stats(n, a.device)
    if n == 0:
        return stats
    block_n, block_v = _blocks_logits(n, v)
    dummy = a
    _vocab_stats_fwd_kernel[(triton.cdiv(n, block_n),)](
        a, b if b is not None else dummy, dummy, dummy, dummy, dummy, dummy, dummy,
        targets if targets is not None else dummy, stats,
        n, v, 0, 0, a.stride(0), b.stride(0) if b is not None else 0, *map(float, logit_map), float(beta),
        float(alpha),
        LINEAR=False, HAS_B=b is not None, HAS_BIAS_A=False, HAS_BIAS_B=False, HAS_T=targets is not None,
        KIND=int(kind), NEED_ENT=bool(need_entropy), DOT_F32=True,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=16, num_warps=_num_warps(b is not None),
    )
    return stats


def vocab_stats_bwd(a, b, targets, stats, grads, logit_map, kind, beta, alpha, need_grad_a, need_grad_b):
    """(dL/da, dL/db) [N, V] in the input dtype from stats [N, NUM_STATS] and upstream grads [N, NUM_GRADS]."""
    n, v = a.shape
    ga = torch.empty_like(a) if need_grad_a else None
    gb = torch.empty_like(b) if (need_grad_b and b is not None) else None
    if n == 0 or (ga is None and gb is None):
        return ga, gb
    block_n, block_v = _blocks_logits(n, v)
    dummy = a
    _vocab_grad_kernel[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
        a, b if b is not None else dummy, dummy, dummy, dummy, dummy, dummy, dummy,
        targets if targets is not None else dummy, stats, grads,
        ga if ga is not None else dummy, gb if gb is not None else dummy,
        n, v, 0, 0, a.stride(0), b.stride(0) if b is not None else 0,
        ga.stride(0) if ga is not None else 0, gb.stride(0) if gb is not None else 0,
        *map(float, logit_map), float(beta), float(alpha),
        LINEAR=False, HAS_B=b is not None, HAS_BIAS_A=False, HAS_BIAS_B=False, HAS_T=targets is not None,
        KIND=int(kind), WRITE_A=ga is not None, WRITE_B=gb is not None, DOT_F32=True,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=16, num_warps=_num_warps(b is not None),
    )
    return ga, gb


def _dot_f32(h: torch.Tensor) -> bool:
    # fp32 operands: 3xTF32 products (fp32-level accuracy; plain TF32 would lose 13 mantissa bits); in
    # the interpreter every dot runs in fp32 since bf16 tl.dot is broken there (DESIGN.md §4).
    return h.dtype == torch.float32 or _interpreting()


#: Split choice of the fused-linear forward (``choose_num_splits``): resident programs wanted per SM,
#: vocab tiles each split keeps at least, and row blocks per group of the split program order.
PROGRAMS_PER_SM = 2
MIN_TILES_PER_SPLIT = 8
SPLIT_GROUP_ROWS = 8
#: Rows per program of the merge kernel.
MERGE_BLOCK_N = 128


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (queried at the first call, cached per device)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(n: int, v: int, d: int, kind: int, sm_count: int | None) -> int:
    """Vocab splits S of the fused-linear forward of n rows, vocabulary v, hidden size d: 1 (the whole
    vocabulary per program) when there is no SM count (interpreter, meta tensors) or the row blocks
    alone give every SM a program; else enough splits for ``PROGRAMS_PER_SM`` programs per SM, each
    split at least ``MIN_TILES_PER_SPLIT`` vocab tiles."""
    block_n, block_v, _ = _blocks_linear(d, int(kind))
    row_blocks, tiles = triton.cdiv(n, block_n), triton.cdiv(v, block_v)
    if sm_count is None or row_blocks >= sm_count:
        return 1
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sm_count, row_blocks), tiles // MIN_TILES_PER_SPLIT))


def linear_vocab_stats_fwd(ha, wa, bias_a, hb, wb, bias_b, targets, logit_map, kind, beta, alpha, need_entropy,
                           num_splits=None):
    """Per-row stats [N, NUM_STATS] of logits ha @ wa.T (+ bias_a) (and hb @ wb.T (+ bias_b)), never stored.

    ``num_splits``: how many vocab ranges the rows' sweeps are split into (None: ``choose_num_splits``
    from N, V and the device's SM count).  Capped at the number of vocab tiles and lowered so that
    every range is a non-empty run of whole tiles.  1 runs ``_vocab_stats_fwd_kernel`` (each program
    sweeps the whole vocabulary).  S > 1 runs ``_vocab_stats_split_kernel`` on row blocks x S programs
    into a fp32 workspace [S, N, 8] and ``_vocab_stats_merge_kernel`` (and, for kinds >= JSD, both
    again for the second sweep); the result equals S = 1 up to fp32 round-off of the summation order.
    """
    _check_dtype(ha)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    n, d = ha.shape
    v = wa.shape[0]
    stats = _empty_stats(n, ha.device)
    if n == 0:
        return stats
    block_n, block_v, block_d = _blocks_linear(d, int(kind))
    row_blocks, tiles = triton.cdiv(n, block_n), triton.cdiv(v, block_v)
    if num_splits is None:
        sm_count = _sm_count(ha.device.index if ha.device.index is not None else torch.cuda.current_device()) \
            if ha.device.type == "cuda" else None
        num_splits = choose_num_splits(n, v, d, kind, sm_count)
    num_splits = min(num_splits, tiles)
    if num_splits > 1:
        tiles_per_split = triton.cdiv(tiles, num_splits)
        num_splits = triton.cdiv(tiles, tiles_per_split)  # no empty split
    dummy = ha
    two = hb is not None
    tgt = targets if targets is not None else dummy
    operands = (ha, wa, bias_a if bias_a is not None else dummy, hb if two else dummy, wb if two else dummy,
                bias_b if bias_b is not None else dummy, tgt, stats)
    floats = (*map(float, logit_map), float(beta), float(alpha))
    switches = dict(HAS_B=two, HAS_BIAS_A=bias_a is not None, HAS_BIAS_B=bias_b is not None,
                    HAS_T=targets is not None, KIND=int(kind), NEED_ENT=bool(need_entropy))
    blocks = dict(DOT_F32=_dot_f32(ha), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=_num_warps(two))
    db = hb.shape[1] if two else 0
    if num_splits <= 1:
        _vocab_stats_fwd_kernel[(row_blocks,)](dummy, dummy, *operands, n, v, d, db, 0, 0, *floats, LINEAR=True,
                                               **switches, **blocks)
        return stats
    parts = torch.empty((num_splits, n, PART_COLS), dtype=torch.float32, device=ha.device)
    merge_switches = {k: switches[k] for k in ("HAS_B", "HAS_T", "KIND", "NEED_ENT")}
    for sweep in ((1, 2) if int(kind) >= Kind.JSD else (1,)):
        _vocab_stats_split_kernel[(row_blocks * num_splits,)](
            *operands, parts, n, v, d, db, num_splits, tiles_per_split, *floats, **switches, SWEEP=sweep,
            GROUP_ROWS=SPLIT_GROUP_ROWS, **blocks)
        _vocab_stats_merge_kernel[(triton.cdiv(n, MERGE_BLOCK_N),)](
            tgt, stats, parts, n, v, num_splits, **merge_switches, SWEEP=sweep, BLOCK_N=MERGE_BLOCK_N)
    return stats


def linear_vocab_grad_logits(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, logit_map, kind, beta,
                             alpha, need_grad_a, need_grad_b):
    """dL/dlogits for a block of rows, recomputed tile by tile from hidden @ weight.T: the chunk-sized
    gradient buffers are the only [rows, V] memory (the logits are never stored)."""
    n = ha.shape[0]
    v = wa.shape[0]
    ga = torch.empty((n, v), dtype=ha.dtype, device=ha.device) if need_grad_a else None
    gb = torch.empty((n, v), dtype=hb.dtype, device=hb.device) if (need_grad_b and hb is not None) else None
    _launch_linear_grad(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, logit_map, kind, beta, alpha, ga, gb)
    return ga, gb


def _launch_linear_grad(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, logit_map, kind, beta, alpha, ga,
                        gb):
    """Write dL/dlogits [n, V] of model a into ``ga`` and of model b into ``gb`` (either may be None;
    each a row-major view with unit column stride)."""
    n, d = ha.shape
    v = wa.shape[0]
    two = hb is not None
    if n == 0 or v == 0 or (ga is None and gb is None):
        return
    block_n, block_v, block_d = _blocks_linear(d, int(kind))
    dummy = ha
    _vocab_grad_kernel[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
        dummy, dummy, ha, wa, bias_a if bias_a is not None else dummy,
        hb if two else dummy, wb if two else dummy, bias_b if bias_b is not None else dummy,
        targets if targets is not None else dummy, stats, grads,
        ga if ga is not None else dummy, gb if gb is not None else dummy,
        n, v, d, hb.shape[1] if two else 0, 0, 0, ga.stride(0) if ga is not None else 0, gb.stride(0) if gb is not None else 0,
        *map(float, logit_map), float(beta), float(alpha),
        LINEAR=True, HAS_B=two, HAS_BIAS_A=bias_a is not None, HAS_BIAS_B=bias_b is not None,
        HAS_T=targets is not None, KIND=int(kind), WRITE_A=ga is not None, WRITE_B=gb is not None,
        DOT_F32=_dot_f32(ha), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=_num_warps(two),
    )


# ----------------------------------------------------------------------------------------------
# Fused-linear backward within a fixed scratch bound (docs/gpu.md, "Fused-linear backward").
# ----------------------------------------------------------------------------------------------
#: Bytes of the one dL/dlogits slab of the fused-linear backward (reused by every chunk): with the
#: per-row and per-vocab scalars it keeps the backward's extra memory under 64 MiB at any shape.
DZ_SLAB_BYTES = 56 * 2 ** 20


def _vocab_chunk_targets(targets, c0: int, c1: int):
    """Targets relative to the vocab columns [c0, c1): ignored rows stay negative, a target outside
    the chunk becomes c1 - c0 (a column the chunk does not have, so it never matches)."""
    if targets is None:
        return None
    inside = (targets >= c0) & (targets < c1)
    return torch.where(targets < 0, targets, torch.where(inside, targets - c0, c1 - c0)).contiguous()


def linear_vocab_stats_bwd(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, logit_map, kind, beta, alpha,
                           needs):
    """(dha, dwa, dbias_a, dhb, dwb, dbias_b) of the fused-linear vocab stats; ``needs`` says which
    (absent ones are None).  Gradients are in their input's dtype; deterministic (no atomics).

    dz = dL/dlogits is recomputed tile by tile by ``_vocab_grad_kernel`` into one slab of at most
    ``DZ_SLAB_BYTES`` in the input dtype, in two passes:
      - row pass (for dh): chunks of R = slab / (V·size) rows, dh[rows] = dz[rows, :] @ w
        (a GEMM with K = V; one write of dh, in its dtype);
      - vocab pass (for dw, dbias): chunks of C = slab / (N·size) vocab columns over all N rows,
        dw[cols] = dz[:, cols]ᵀ @ h (K = N: the whole token reduction inside one GEMM, fp32
        accumulation, one write in the weight's dtype), dbias[cols] = Σ_rows dz (fp32).
    Cost: 5 GEMM-equivalents (2 recomputes, dh, dw) against 4 for a backward that keeps an fp32 dW
    accumulator of V·D·4 bytes; extra memory: the slab, targets per vocab chunk (N int64), the fp32
    bias-gradient chunk.
    """
    models = [(ha, wa, bias_a, needs[0:3])]
    if hb is not None:
        models.append((hb, wb, bias_b, needs[3:6]))
    n, v = ha.shape[0], wa.shape[0]
    size = ha.element_size()
    slab = torch.empty(max(DZ_SLAB_BYTES // size, n, v), dtype=ha.dtype, device=ha.device)  # >= 1 row/column
    out = []
    for side, (h, w, bias, (need_h, need_w, need_bias)) in enumerate(models):
        dh = torch.empty_like(h) if need_h else None
        dw = torch.empty_like(w) if need_w else None
        dbias = torch.empty_like(bias) if (need_bias and bias is not None) else None

        def grad_logits(rows: slice, cols: slice, t, dz):
            """dz of this side for rows x vocab columns (both models' weights cut to those columns)."""
            cut = lambda x: x[cols] if x is not None else None  # noqa: E731
            _launch_linear_grad(ha[rows], wa[cols], cut(bias_a), hb[rows] if hb is not None else None, cut(wb),
                                cut(bias_b), t, stats[rows], grads[rows], logit_map, kind, beta, alpha,
                                dz if side == 0 else None, dz if side == 1 else None)

        if dh is not None:
            step = max(1, DZ_SLAB_BYTES // (max(v, 1) * size))
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                dz = slab[: (r1 - r0) * v].view(r1 - r0, v)
                grad_logits(slice(r0, r1), slice(None), targets[r0:r1] if targets is not None else None, dz)
                torch.mm(dz, w, out=dh[r0:r1])
        if dw is not None or dbias is not None:
            step = max(1, DZ_SLAB_BYTES // (max(n, 1) * size))
            for c0 in range(0, v, step):
                c1 = min(v, c0 + step)
                dz = slab[: n * (c1 - c0)].view(n, c1 - c0)
                grad_logits(slice(None), slice(c0, c1), _vocab_chunk_targets(targets, c0, c1), dz)
                if dw is not None:
                    torch.mm(dz.T, h, out=dw[c0:c1])
                if dbias is not None:
                    dbias[c0:c1] = dz.sum(0, dtype=torch.float32)
        out += [dh, dw, dbias]
    if hb is None:
        out += [None, None, None]
    return tuple(out)
