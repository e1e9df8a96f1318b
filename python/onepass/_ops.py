"""The vocab-stats custom ops: one registration serves every vocabulary op (docs/vocab_stats.md).

- ``onepass::vocab_stats`` (logits [N, V] in) and ``onepass::linear_vocab_stats`` (hidden [N, D] and
  an LM-head weight [V, D] in): per-row stats [N, 8]; their ``*_backward`` ops map the upstream
  gradients of the differentiable columns (logp_a, logp_b, entropy, divergence) to the inputs.
- Each is a ``torch.library.custom_op`` with a fake (meta) implementation and ``register_autograd``,
  so ``torch.compile(fullgraph=True)`` traces through them.

The fused-linear path of the ``cpu`` and ``cuda`` backends is chunked over rows: a chunk's logits are
computed by a matrix product and streamed through the logits kernel; the ``triton`` backend computes
them tile by tile inside its kernel.  In the backward every backend turns a chunk of rows into
dL/dlogits (the only [rows, V] buffer, bounded by ``CHUNK_BYTES``) and applies it to the hidden states
and the weight with matrix products: deterministic, no atomics.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

#: Differentiable stats columns and their positions in the [N, 4] upstream-gradient array.
STAT_LOGP_A, STAT_LOGP_B, STAT_ENTROPY, STAT_DIV = 2, 3, 4, 5
GRAD_COLUMNS = (STAT_LOGP_A, STAT_LOGP_B, STAT_ENTROPY, STAT_DIV)

#: Bound of the [rows, V] buffers of the chunked fused-linear path (logits and their gradient), per
#: device type.  CPU, measured 2026-11-23 on 2 cores with the reused logits buffer: 16 MiB keeps
#: linear_token_logprobs fwd+bwd at N=4096, D=1024, V=32000 at 8.1% of naive's peak memory and 0.61× its
#: time (8 MiB: 7.1%, 0.68×; smaller chunks re-read the fp32 dW accumulator more often).  GPU: larger
#: chunks keep the dW GEMM (K = rows) efficient; not yet tuned on a GPU.
CHUNK_BYTES = {"cpu": 16 * 1024 * 1024, "cuda": 256 * 1024 * 1024}

_LAUNCHERS = {
    "triton": "onepass.triton_kernels.vocab_stats",
    "cpu": "onepass.backends.cpu",
    "cuda": "onepass.backends.cuda",
}


def launcher(backend: str):
    return importlib.import_module(_LAUNCHERS[backend])


def stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows_per_chunk(x: Tensor, v: int) -> int:
    budget = CHUNK_BYTES.get(x.device.type, CHUNK_BYTES["cuda"])
    return max(16, budget // max(1, v * max(x.element_size(), 4)))


def _upstream(g_stats: Tensor) -> Tensor:
    return g_stats[:, list(GRAD_COLUMNS)].contiguous()


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


# ------------------------------------------------------------------------------------------------
# Logits input.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("onepass::vocab_stats", mutates_args=())
def vocab_stats(a: Tensor, b: Optional[Tensor], targets: Optional[Tensor], inv_temp: float, kind: int,
                beta: float, alpha: float, need_entropy: bool, backend: str) -> Tensor:
    """Per-row stats [N, 8] of logits a [N, V] (and b [N, V]); columns as in docs/vocab_stats.md."""
    return launcher(backend).vocab_stats_fwd(a, b, targets, inv_temp, kind, beta, alpha, need_entropy)


@vocab_stats.register_fake
def _(a, b, targets, inv_temp, kind, beta, alpha, need_entropy, backend):
    return a.new_empty((a.shape[0], 8), dtype=stats_dtype(a))


@torch.library.custom_op("onepass::vocab_stats_backward", mutates_args=())
def vocab_stats_backward(a: Tensor, b: Optional[Tensor], targets: Optional[Tensor], stats: Tensor, grads: Tensor,
                         inv_temp: float, kind: int, beta: float, alpha: float, need_a: bool, need_b: bool,
                         backend: str) -> tuple[Tensor, Tensor]:
    """(dL/da, dL/db) from stats [N, 8] and upstream grads [N, 4]; an absent gradient is an empty tensor."""
    ga, gb = launcher(backend).vocab_stats_bwd(a, b, targets, stats, grads, inv_temp, kind, beta, alpha,
                                               need_a, need_b and b is not None)
    return (ga if ga is not None else _empty(a)), (gb if gb is not None else _empty(a))


@vocab_stats_backward.register_fake
def _(a, b, targets, stats, grads, inv_temp, kind, beta, alpha, need_a, need_b, backend):
    ga = torch.empty_like(a) if need_a else _empty(a)
    gb = torch.empty_like(b) if (need_b and b is not None) else _empty(a)
    return ga, gb


def _vocab_stats_setup(ctx, inputs, output):
    a, b, targets, inv_temp, kind, beta, alpha, _need_entropy, backend = inputs
    ctx.save_for_backward(a, b, targets, output)
    ctx.params = (inv_temp, kind, beta, alpha, backend)


def _vocab_stats_bwd(ctx, g_stats):
    a, b, targets, stats = ctx.saved_tensors
    inv_temp, kind, beta, alpha, backend = ctx.params
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ga, gb = vocab_stats_backward(a, b, targets, stats, _upstream(g_stats), inv_temp, kind, beta, alpha,
                                  need_a, need_b, backend)
    return (ga if need_a else None), (gb if need_b else None), None, None, None, None, None, None, None


vocab_stats.register_autograd(_vocab_stats_bwd, setup_context=_vocab_stats_setup)


# ------------------------------------------------------------------------------------------------
# Fused linear (hidden @ weight.T + bias).
# ------------------------------------------------------------------------------------------------
class ChunkLogits:
    """Logits h[s:e] @ w.T (+ bias) of successive row chunks of one model, written into one reused
    [rows, V] buffer (a fresh allocation per chunk costs page faults and raises the peak memory).

    On CUDA, bf16/fp16 operands produce fp32 logits (cuBLAS accumulates in fp32 anyway; rounding the
    logits to bf16 would cost the kernels precision); on the CPU the chunk stays in the input dtype, as
    the same-dtype naive computation does."""

    def __init__(self, h: Tensor, w: Tensor, bias: Optional[Tensor], rows: int):
        self.h, self.w, self.bias = h, w, bias
        self.fp32_out = h.is_cuda and h.dtype in (torch.bfloat16, torch.float16)
        self.buf = None if self.fp32_out else h.new_empty((min(rows, h.shape[0]), w.shape[0]))

    def __call__(self, s: int, e: int) -> Tensor:
        h = self.h[s:e]
        if self.fp32_out:
            z = torch.mm(h, self.w.T, out_dtype=torch.float32)
            return z if self.bias is None else z.add_(self.bias)
        out = self.buf[: e - s]
        if self.bias is None:
            return torch.mm(h, self.w.T, out=out)
        return torch.addmm(self.bias, h, self.w.T, out=out)


def _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, rows):
    return ChunkLogits(ha, wa, bias_a, rows), (ChunkLogits(hb, wb, bias_b, rows) if hb is not None else None)


def linear_stats_forward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, inv_temp, kind, beta, alpha,
                         need_entropy) -> Tensor:
    """Stats [N, 8] of the logits ha @ wa.T (+ bias_a), with hb/wb/bias_b the second model."""
    mod = launcher(backend)
    if backend == "triton":
        return mod.linear_vocab_stats_fwd(ha, wa, bias_a, hb, wb, bias_b, targets, inv_temp, kind, beta, alpha,
                                          need_entropy)
    n, v = ha.shape[0], wa.shape[0]
    stats = ha.new_zeros((n, 8), dtype=stats_dtype(ha))
    step = _rows_per_chunk(ha, v)
    logits_a, logits_b = _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, step)
    for s in range(0, n, step):
        e = min(n, s + step)
        b = logits_b(s, e) if logits_b is not None else None
        t = targets[s:e] if targets is not None else None
        stats[s:e] = mod.vocab_stats_fwd(logits_a(s, e), b, t, inv_temp, kind, beta, alpha, need_entropy)
    return stats


class LinearGradAccumulator:
    """Accumulates d(hidden), d(weight), d(bias) of one model from chunks of dL/dlogits.

    d(weight) and d(bias) are summed in fp32 (the weight's dtype for fp64) and cast at the end."""

    def __init__(self, h: Tensor, w: Tensor, bias: Optional[Tensor], need_h: bool, need_w: bool, need_bias: bool):
        acc = stats_dtype(w)
        self.h, self.w = h, w
        self.dh = torch.empty_like(h) if need_h else None
        self.dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        self.dbias = torch.zeros(bias.shape, dtype=acc, device=w.device) if (need_bias and bias is not None) else None

    def add(self, s: int, e: int, dz: Optional[Tensor]) -> None:
        if dz is None:
            return
        dz = dz.to(self.w.dtype)  # fp32 chunk gradients of fp32 logits (cuda backend, bf16 weights)
        if self.dh is not None:
            torch.mm(dz, self.w, out=self.dh[s:e])
        if self.dw is not None:
            self.dw.addmm_(dz.T.to(self.dw.dtype), self.h[s:e].to(self.dw.dtype))
        if self.dbias is not None:
            self.dbias += dz.sum(0, dtype=self.dbias.dtype)

    def result(self, w: Tensor, bias: Optional[Tensor]):
        dw = self.dw.to(w.dtype) if self.dw is not None else None
        db = self.dbias.to(bias.dtype) if self.dbias is not None else None
        return self.dh, dw, db


def linear_stats_backward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, inv_temp, kind, beta,
                          alpha, needs):
    """Gradients (dha, dwa, dbias_a, dhb, dwb, dbias_b) from upstream grads [N, 4]; ``needs`` is the
    6-tuple of which are wanted (absent ones are None)."""
    mod = launcher(backend)
    if backend == "triton":  # row and vocab passes over one bounded dL/dlogits slab, no fp32 dW accumulator
        return mod.linear_vocab_stats_bwd(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, inv_temp, kind,
                                          beta, alpha, needs)
    n, v = ha.shape[0], wa.shape[0]
    acc_a = LinearGradAccumulator(ha, wa, bias_a, *needs[0:3])
    acc_b = LinearGradAccumulator(hb, wb, bias_b, *needs[3:6]) if hb is not None else None
    need_a = any(needs[0:3])
    need_b = hb is not None and any(needs[3:6])
    step = _rows_per_chunk(ha, v)
    logits_a, logits_b = _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, step)
    for s in range(0, n, step):
        e = min(n, s + step)
        t = targets[s:e] if targets is not None else None
        dza, dzb = mod.vocab_stats_bwd(logits_a(s, e), logits_b(s, e) if logits_b is not None else None, t,
                                       stats[s:e], grads[s:e], inv_temp, kind, beta, alpha, need_a, need_b)
        acc_a.add(s, e, dza)
        if acc_b is not None:
            acc_b.add(s, e, dzb)
    out_a = acc_a.result(wa, bias_a)
    out_b = acc_b.result(wb, bias_b) if acc_b is not None else (None, None, None)
    return (*out_a, *out_b)


@torch.library.custom_op("onepass::linear_vocab_stats", mutates_args=())
def linear_vocab_stats(ha: Tensor, wa: Tensor, bias_a: Optional[Tensor], hb: Optional[Tensor], wb: Optional[Tensor],
                       bias_b: Optional[Tensor], targets: Optional[Tensor], inv_temp: float, kind: int, beta: float,
                       alpha: float, need_entropy: bool, backend: str) -> Tensor:
    """Per-row stats [N, 8] of logits ha @ wa.T (+ bias_a) (and the second model), never materialized
    beyond one tile (triton) or one chunk of rows (cpu, cuda)."""
    return linear_stats_forward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, inv_temp, kind, beta, alpha,
                                need_entropy)


@linear_vocab_stats.register_fake
def _(ha, wa, bias_a, hb, wb, bias_b, targets, inv_temp, kind, beta, alpha, need_entropy, backend):
    return ha.new_empty((ha.shape[0], 8), dtype=stats_dtype(ha))


@torch.library.custom_op("onepass::linear_vocab_stats_backward", mutates_args=())
def linear_vocab_stats_backward(ha: Tensor, wa: Tensor, bias_a: Optional[Tensor], hb: Optional[Tensor],
                                wb: Optional[Tensor], bias_b: Optional[Tensor], targets: Optional[Tensor],
                                stats: Tensor, grads: Tensor, inv_temp: float, kind: int, beta: float, alpha: float,
                                needs: list[bool], backend: str) -> list[Tensor]:
    """[dha, dwa, dbias_a, dhb, dwb, dbias_b]; an absent gradient is an empty tensor."""
    outs = linear_stats_backward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, inv_temp, kind,
                                 beta, alpha, tuple(needs))
    return [o if o is not None else _empty(ha) for o in outs]


@linear_vocab_stats_backward.register_fake
def _(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, inv_temp, kind, beta, alpha, needs, backend):
    like = (ha, wa, bias_a, hb, wb, bias_b)
    return [torch.empty_like(t) if (need and t is not None) else _empty(ha) for need, t in zip(needs, like)]


def _linear_setup(ctx, inputs, output):
    ha, wa, bias_a, hb, wb, bias_b, targets, inv_temp, kind, beta, alpha, _need_entropy, backend = inputs
    ctx.save_for_backward(ha, wa, bias_a, hb, wb, bias_b, targets, output)
    ctx.params = (inv_temp, kind, beta, alpha, backend)


def _linear_bwd(ctx, g_stats):
    ha, wa, bias_a, hb, wb, bias_b, targets, stats = ctx.saved_tensors
    inv_temp, kind, beta, alpha, backend = ctx.params
    needs = [bool(ctx.needs_input_grad[i]) for i in range(6)]
    outs = linear_vocab_stats_backward(ha, wa, bias_a, hb, wb, bias_b, targets, stats, _upstream(g_stats), inv_temp,
                                       kind, beta, alpha, needs, backend)
    grads = [o if need else None for o, need in zip(outs, needs)]
    return (*grads, None, None, None, None, None, None, None)


linear_vocab_stats.register_autograd(_linear_bwd, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------
# Fused losses on the chunked backends: forward and backward in the same pass.
# ------------------------------------------------------------------------------------------------
def linear_fused_loss_chunked(backend, ha, wa, bias_a, hb, wb, bias_b, targets, inv_temp, kind, beta, alpha,
                              need_entropy, token_loss, needs):
    """A scalar loss Σ_rows token_loss(stats rows) and its gradients, in one chunked pass (cpu, cuda).

    Each chunk's logits are computed once: streamed through the forward kernel, then - with the per-row
    gradients of ``token_loss`` (autograd on the chunk's [rows, 8] stats, which must only couple a row to
    itself) - through the backward kernel, and applied to hidden/weight by matrix products.  Three
    matrix products per chunk instead of the four of a separate forward and recompute backward.
    Returns (loss fp32 scalar, stats [N, 8] detached, the 6 gradients as ``linear_stats_backward``).
    """
    mod = launcher(backend)
    n, v = ha.shape[0], wa.shape[0]
    stats = ha.new_zeros((n, 8), dtype=stats_dtype(ha))
    acc_a = LinearGradAccumulator(ha, wa, bias_a, *needs[0:3])
    acc_b = LinearGradAccumulator(hb, wb, bias_b, *needs[3:6]) if hb is not None else None
    need_a, need_b = any(needs[0:3]), hb is not None and any(needs[3:6])
    total = torch.zeros((), dtype=torch.float32, device=ha.device)
    step = _rows_per_chunk(ha, v)
    logits_a, logits_b = _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, step)
    for s in range(0, n, step):
        e = min(n, s + step)
        a = logits_a(s, e)
        b = logits_b(s, e) if logits_b is not None else None
        t = targets[s:e] if targets is not None else None
        st = mod.vocab_stats_fwd(a, b, t, inv_temp, kind, beta, alpha, need_entropy)
        stats[s:e] = st
        leaf = st.detach().requires_grad_()
        with torch.enable_grad():
            part = token_loss(leaf, s, e)
        total += part.detach().to(torch.float32)
        if not (need_a or need_b):
            continue
        (g,) = torch.autograd.grad(part, leaf, allow_unused=True, materialize_grads=True)
        dza, dzb = mod.vocab_stats_bwd(a, b, t, st, _upstream(g), inv_temp, kind, beta, alpha, need_a, need_b)
        acc_a.add(s, e, dza)
        if acc_b is not None:
            acc_b.add(s, e, dzb)
    out_a = acc_a.result(wa, bias_a)
    out_b = acc_b.result(wb, bias_b) if acc_b is not None else (None, None, None)
    return total, stats, (*out_a, *out_b)


class FusedLinearLoss(torch.autograd.Function):
    """Autograd wrapper of ``linear_fused_loss_chunked``: the gradients are computed in the forward and
    scaled by the upstream gradient of the loss in the backward."""

    @staticmethod
    def forward(ctx, ha, wa, bias_a, hb, wb, bias_b, run):
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:6])
        loss, stats, grads = run(needs)
        ctx.grads = grads
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        # in place: the buffers are ours, and a copy would double the weight-gradient memory
        grads = tuple(None if g is None else g.mul_(g_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None)
