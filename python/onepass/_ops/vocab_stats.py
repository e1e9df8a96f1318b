"""The vocab-stats op layer: one registration serves every vocabulary op (docs/vocab_stats.md).

Call sites use the keyword wrappers ``vocab_stats`` (logits in) and ``linear_vocab_stats`` (hidden
states and LM heads in); both return a ``VocabStats`` named view, so no stats column or kind integer
appears outside ``onepass._contract``.  Behind them:

- ``onepass::vocab_stats`` / ``onepass::linear_vocab_stats``: ``torch.library.custom_op``s with a fake
  (meta) implementation and ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through;
  their ``*_backward`` ops map the upstream gradients of the differentiable columns to the inputs.
- A launcher with ``Cap.AUTOGRAD`` (the plain-PyTorch backend) is called directly instead.

The fused-linear path of launchers without ``Cap.LINEAR_KERNEL`` (cpu, cuda) is chunked over rows: a
chunk's logits are computed by a matrix product and streamed through the logits kernel; with
``Cap.LINEAR_KERNEL`` (triton) the kernel computes them tile by tile.  In the backward a launcher with
``Cap.LINEAR_BACKWARD`` (triton: row and vocab passes over one bounded dL/dlogits slab, no fp32 dW
accumulator) computes all six gradients itself; the others turn a chunk of rows into dL/dlogits (the
only [rows, V] buffer, bounded by ``CHUNK_BYTES``) and apply it to the hidden states and the weight
with matrix products here.  Both are deterministic, without atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._contract import GRAD_STATS, NUM_STATS, Kind, LogitMap, VocabStats, hyperparameters, stats_dtype
from .._dispatch import Cap, has, launcher

#: Bound of the [rows, V] buffers of the chunked fused-linear path (logits and their gradient), per
#: device type.  CPU, measured 2026-11-23 on 2 cores with the reused logits buffer: 16 MiB keeps
#: linear_token_logprobs fwd+bwd at N=4096, D=1024, V=32000 at 8.1% of naive's peak memory and 0.61× its
#: time (8 MiB: 7.1%, 0.68×; smaller chunks re-read the fp32 dW accumulator more often).  GPU: larger
#: chunks keep the dW GEMM (K = rows) efficient; not yet tuned on a GPU.
CHUNK_BYTES = {"cpu": 16 * 1024 * 1024, "cuda": 256 * 1024 * 1024}

FAMILY = "vocab_stats"


def _launcher(backend: str):
    return launcher(FAMILY, backend)


def _rows_per_chunk(x: Tensor, v: int) -> int:
    budget = CHUNK_BYTES.get(x.device.type, CHUNK_BYTES["cuda"])
    return max(16, budget // max(1, v * max(x.element_size(), 4)))


def _upstream(g_stats: Tensor) -> Tensor:
    return g_stats[:, list(GRAD_STATS)].contiguous()


def _unpack(hyper: Tensor) -> tuple[LogitMap, float, float]:
    """(logit map, β, α) of the hyperparameter tensor ``hyperparameters(*logit_map, beta, alpha)``."""
    values = hyper.tolist()
    return LogitMap(*values[:4]), values[4], values[5]


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


# ------------------------------------------------------------------------------------------------
# Logits input.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("onepass::vocab_stats", mutates_args=())
def _vocab_stats_op(a: Tensor, b: Optional[Tensor], targets: Optional[Tensor], kind: int, hyper: Tensor,
                    need_entropy: bool, backend: str) -> Tensor:
    """Per-row stats [N, NUM_STATS] of logits a [N, V] (and b [N, V]); columns as in docs/vocab_stats.md."""
    logit_map, beta, alpha = _unpack(hyper)
    return _launcher(backend).vocab_stats_fwd(a, b, targets, logit_map, kind, beta, alpha, need_entropy)


@_vocab_stats_op.register_fake
def _(a, b, targets, kind, hyper, need_entropy, backend):
    return a.new_empty((a.shape[0], NUM_STATS), dtype=stats_dtype(a))


@torch.library.custom_op("onepass::vocab_stats_backward", mutates_args=())
def _vocab_stats_backward_op(a: Tensor, b: Optional[Tensor], targets: Optional[Tensor], stats: Tensor,
                             grads: Tensor, kind: int, hyper: Tensor, need_a: bool, need_b: bool,
                             backend: str) -> tuple[Tensor, Tensor]:
    """(dL/da, dL/db) from stats [N, NUM_STATS] and upstream grads [N, NUM_GRADS]; an absent gradient is an
    empty tensor."""
    logit_map, beta, alpha = _unpack(hyper)
    ga, gb = _launcher(backend).vocab_stats_bwd(a, b, targets, stats, grads, logit_map, kind, beta, alpha,
                                               need_a, need_b and b is not None)
    return (ga if ga is not None else _empty(a)), (gb if gb is not None else _empty(a))


@_vocab_stats_backward_op.register_fake
def _(a, b, targets, stats, grads, kind, hyper, need_a, need_b, backend):
    ga = torch.empty_like(a) if need_a else _empty(a)
    gb = torch.empty_like(b) if (need_b and b is not None) else _empty(a)
    return ga, gb


def _vocab_stats_setup(ctx, inputs, output):
    a, b, targets, kind, hyper, _need_entropy, backend = inputs
    ctx.save_for_backward(a, b, targets, hyper, output)
    ctx.params = (kind, backend)


def _vocab_stats_bwd(ctx, g_stats):
    a, b, targets, hyper, stats = ctx.saved_tensors
    kind, backend = ctx.params
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ga, gb = _vocab_stats_backward_op(a, b, targets, stats, _upstream(g_stats), kind, hyper, need_a, need_b, backend)
    return (ga if need_a else None), (gb if need_b else None), None, None, None, None, None


_vocab_stats_op.register_autograd(_vocab_stats_bwd, setup_context=_vocab_stats_setup)


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


def linear_stats_forward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, logit_map, kind, beta, alpha,
                         need_entropy) -> Tensor:
    """Stats [N, NUM_STATS] of the logits ha @ wa.T (+ bias_a), with hb/wb/bias_b the second model."""
    mod = _launcher(backend)
    if has(FAMILY, backend, Cap.LINEAR_KERNEL):
        return mod.linear_vocab_stats_fwd(ha, wa, bias_a, hb, wb, bias_b, targets, logit_map, kind, beta, alpha,
                                          need_entropy)
    n, v = ha.shape[0], wa.shape[0]
    stats = ha.new_zeros((n, NUM_STATS), dtype=stats_dtype(ha))
    step = _rows_per_chunk(ha, v)
    logits_a, logits_b = _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, step)
    for s in range(0, n, step):
        e = min(n, s + step)
        b = logits_b(s, e) if logits_b is not None else None
        t = targets[s:e] if targets is not None else None
        stats[s:e] = mod.vocab_stats_fwd(logits_a(s, e), b, t, logit_map, kind, beta, alpha, need_entropy)
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


def linear_stats_backward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, logit_map, kind, beta,
                          alpha, needs):
    """Gradients (dha, dwa, dbias_a, dhb, dwb, dbias_b) from upstream grads [N, NUM_GRADS]; ``needs`` is the
    6-tuple of which are wanted (absent ones are None)."""
    mod = _launcher(backend)
    if has(FAMILY, backend, Cap.LINEAR_BACKWARD):
        return mod.linear_vocab_stats_bwd(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, logit_map, kind,
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
                                       stats[s:e], grads[s:e], logit_map, kind, beta, alpha, need_a, need_b)
        acc_a.add(s, e, dza)
        if acc_b is not None:
            acc_b.add(s, e, dzb)
    out_a = acc_a.result(wa, bias_a)
    out_b = acc_b.result(wb, bias_b) if acc_b is not None else (None, None, None)
    return (*out_a, *out_b)


@torch.library.custom_op("onepass::linear_vocab_stats", mutates_args=())
def _linear_vocab_stats_op(ha: Tensor, wa: Tensor, bias_a: Optional[Tensor], hb: Optional[Tensor],
                           wb: Optional[Tensor], bias_b: Optional[Tensor], targets: Optional[Tensor], kind: int,
                           hyper: Tensor, need_entropy: bool, backend: str) -> Tensor:
    """Per-row stats [N, NUM_STATS] of logits ha @ wa.T (+ bias_a) (and the second model), never materialized
    beyond one tile (triton) or one chunk of rows (cpu, cuda)."""
    logit_map, beta, alpha = _unpack(hyper)
    return linear_stats_forward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, logit_map, kind, beta, alpha,
                                need_entropy)


@_linear_vocab_stats_op.register_fake
def _(ha, wa, bias_a, hb, wb, bias_b, targets, kind, hyper, need_entropy, backend):
    return ha.new_empty((ha.shape[0], NUM_STATS), dtype=stats_dtype(ha))


@torch.library.custom_op("onepass::linear_vocab_stats_backward", mutates_args=())
def _linear_vocab_stats_backward_op(ha: Tensor, wa: Tensor, bias_a: Optional[Tensor], hb: Optional[Tensor],
                                    wb: Optional[Tensor], bias_b: Optional[Tensor], targets: Optional[Tensor],
                                    stats: Tensor, grads: Tensor, kind: int, hyper: Tensor, needs: list[bool],
                                    backend: str) -> list[Tensor]:
    """[dha, dwa, dbias_a, dhb, dwb, dbias_b]; an absent gradient is an empty tensor."""
    logit_map, beta, alpha = _unpack(hyper)
    outs = linear_stats_backward(backend, ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, logit_map, kind,
                                 beta, alpha, tuple(needs))
    return [o if o is not None else _empty(ha) for o in outs]


@_linear_vocab_stats_backward_op.register_fake
def _(ha, wa, bias_a, hb, wb, bias_b, targets, stats, grads, kind, hyper, needs, backend):
    like = (ha, wa, bias_a, hb, wb, bias_b)
    return [torch.empty_like(t) if (need and t is not None) else _empty(ha) for need, t in zip(needs, like)]


def _linear_setup(ctx, inputs, output):
    ha, wa, bias_a, hb, wb, bias_b, targets, kind, hyper, _need_entropy, backend = inputs
    ctx.save_for_backward(ha, wa, bias_a, hb, wb, bias_b, targets, hyper, output)
    ctx.params = (kind, backend)


def _linear_bwd(ctx, g_stats):
    ha, wa, bias_a, hb, wb, bias_b, targets, hyper, stats = ctx.saved_tensors
    kind, backend = ctx.params
    needs = [bool(ctx.needs_input_grad[i]) for i in range(6)]
    outs = _linear_vocab_stats_backward_op(ha, wa, bias_a, hb, wb, bias_b, targets, stats, _upstream(g_stats), kind,
                                           hyper, needs, backend)
    grads = [o if need else None for o, need in zip(outs, needs)]
    return (*grads, None, None, None, None, None)


_linear_vocab_stats_op.register_autograd(_linear_bwd, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------
# Keyword wrappers: the only entry points of the public functions and the losses.
# ------------------------------------------------------------------------------------------------
def rows(x: Optional[Tensor]) -> Optional[Tensor]:
    """[..., K] -> contiguous [N, K] (None stays None)."""
    return None if x is None else x.reshape(-1, x.shape[-1]).contiguous()


def _flat(targets: Optional[Tensor]) -> Optional[Tensor]:
    return None if targets is None else targets.reshape(-1).contiguous()


def vocab_stats(a: Tensor, b: Optional[Tensor] = None, *, targets: Optional[Tensor], logit_map: LogitMap, backend: str,
                kind: Kind = Kind.NONE, beta: float = 0.0, alpha: float = 0.0,
                need_entropy: bool = False) -> VocabStats:
    """Per-row stats of logits ``a`` [..., V] (and ``b`` [..., V]), viewed with the leading shape.

    ``targets`` [...] int64 in kernel form (−1 = ignored row) or None; ``kind`` the divergence of
    ``Stat.DIV`` (validated: ``_contract.kernel_kind``); differentiable w.r.t. ``a`` and ``b``."""
    lead = a.shape[:-1]
    a, b, targets = rows(a), rows(b), _flat(targets)
    if has(FAMILY, backend, Cap.AUTOGRAD):
        stats = _launcher(backend).vocab_stats_fwd(a, b, targets, logit_map, int(kind), beta, alpha, need_entropy)
    else:
        stats = _vocab_stats_op(a, b, targets, int(kind), hyperparameters(*logit_map, beta, alpha),
                                bool(need_entropy), backend)
    return VocabStats(stats).view(*lead)


def linear_vocab_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       hidden_b: Optional[Tensor] = None, weight_b: Optional[Tensor] = None,
                       bias_b: Optional[Tensor] = None, *, targets: Optional[Tensor], logit_map: LogitMap, backend: str,
                       kind: Kind = Kind.NONE, beta: float = 0.0, alpha: float = 0.0,
                       need_entropy: bool = False) -> VocabStats:
    """``vocab_stats`` of logits a = hidden @ weight.T (+ bias) and b = hidden_b @ weight_b.T (+ bias_b),
    never materialized beyond one tile (triton) or one chunk of rows (cpu, cuda).

    hidden [..., D], weight [V, D], bias [V]; hidden_b [..., Db], weight_b [V, Db] (optional second
    model, same leading shape).  Differentiable w.r.t. every floating input."""
    lead = hidden.shape[:-1]
    contig = lambda x: None if x is None else x.contiguous()  # noqa: E731
    models = (rows(hidden), weight.contiguous(), contig(bias), rows(hidden_b), contig(weight_b), contig(bias_b))
    if has(FAMILY, backend, Cap.AUTOGRAD):
        stats = _launcher(backend).linear_vocab_stats_fwd(*models, _flat(targets), logit_map, int(kind), beta, alpha,
                                                          need_entropy)
    else:
        stats = _linear_vocab_stats_op(*models, _flat(targets), int(kind), hyperparameters(*logit_map, beta, alpha),
                                       bool(need_entropy), backend)
    return VocabStats(stats).view(*lead)
