"""Fused linear losses: Σ_rows w · token_loss(stats of the row) from hidden states and LM heads.

A loss is one per-token function ``token_loss(stats: VocabStats, **token_inputs) -> ℓ`` of the stats' shape.
When it is row-elementwise (row r of ℓ depends only on row r of the stats and inputs), ``linear_token_loss``
may stream chunks of rows; a loss declared not row-elementwise (sequence means, batch selections) gets all
the rows at once, in the leading shape of ``hidden``.  The path is chosen by capability and that property:

- ``Cap.ONE_PASS_LOSS`` with eager gradients: each chunk of rows has its logits computed once, streamed
  through the forward kernel, then - with the per-row gradients of ``token_loss`` (autograd on the
  chunk's stats) - through the backward kernel and applied to hidden/weight by matrix products: three
  matrix products per chunk instead of the four of a separate forward and recompute backward.
- otherwise: ``linear_vocab_stats`` (an autograd op: stats [N], no logits kept) then ℓ on all rows,
  differentiated by autograd back through the sweep's backward.

The second model (reference / teacher) never receives gradient.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .._contract import NUM_STATS, Kind, LogitMap, VocabStats, stats_dtype
from .._dispatch import Cap, has
from .vocab_stats import (FAMILY, LinearGradAccumulator, _chunk_logits_pair, _launcher, _rows_per_chunk, _upstream,
                          linear_vocab_stats, rows)

TokenLoss = Callable[..., Tensor]


def _one_pass(backend, ha, wa, bias_a, hb, wb, bias_b, targets, logit_map, kind, beta, alpha, need_entropy,
              token_loss, weights, token_inputs, needs):
    """(loss, stats [N, NUM_STATS], the 6 gradients (dha, dwa, dbias_a, dhb, dwb, dbias_b)) in one chunked
    pass; the loss accumulates in the stats dtype."""
    mod = _launcher(backend)
    n, v = ha.shape[0], wa.shape[0]
    sd = stats_dtype(ha)
    stats = ha.new_zeros((n, NUM_STATS), dtype=sd)
    acc_a = LinearGradAccumulator(ha, wa, bias_a, *needs[0:3])
    need_a = any(needs[0:3])
    total = torch.zeros((), dtype=sd, device=ha.device)
    step = _rows_per_chunk(ha, v)
    logits_a, logits_b = _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, step)
    for s in range(0, n, step):
        e = min(n, s + step)
        a = logits_a(s, e)
        b = logits_b(s, e) if logits_b is not None else None
        t = targets[s:e] if targets is not None else None
        st = mod.vocab_stats_fwd(a, b, t, logit_map, kind, beta, alpha, need_entropy)
        stats[s:e] = st
        leaf = st.detach().requires_grad_()
        with torch.enable_grad():
            part = (weights[s:e] * token_loss(VocabStats(leaf), **{k: x[s:e] for k, x in token_inputs.items()})).sum()
        total += part.detach()
        if not need_a:
            continue
        (g,) = torch.autograd.grad(part, leaf, allow_unused=True, materialize_grads=True)
        dza, _ = mod.vocab_stats_bwd(a, b, t, st, _upstream(g), logit_map, kind, beta, alpha, True, False)
        acc_a.add(s, e, dza)
    return total, stats, acc_a.result(wa, bias_a)


class _FusedLinearLoss(torch.autograd.Function):
    """Autograd wrapper of ``_one_pass``: the gradients are computed in the forward and scaled by the
    upstream gradient of the loss in the backward (in place: a copy would double the weight-gradient
    memory).  A second backward through the same graph (``retain_graph``, ``gradcheck``) reruns the pass;
    ``create_graph=True`` raises, since these gradients carry no graph."""

    @staticmethod
    def forward(ctx, ha, wa, bias_a, run):
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        loss, stats, grads = run(needs)
        ctx.grads, ctx.run, ctx.needs = grads, run, needs
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        if torch.is_grad_enabled():
            raise RuntimeError("onepass fused loss: double backward (create_graph=True) is not supported on the "
                               "one-pass path of the cpu/cuda backends; use backend='torch' for higher-order "
                               "gradients")
        grads = ctx.grads if ctx.grads is not None else ctx.run(ctx.needs)[2]
        ctx.grads = None
        return (*(None if g is None else g.mul_(g_loss.to(g.dtype)) for g in grads), None)


def _eager_gradients(*tensors) -> bool:
    """Whether the loss computes its gradients in the forward (eager autograd, something requires grad)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in tensors))


def linear_token_loss(token_loss: TokenLoss, weights: Tensor, token_inputs: dict[str, Tensor], hidden: Tensor,
                      weight: Tensor, bias: Optional[Tensor] = None, hidden_b: Optional[Tensor] = None,
                      weight_b: Optional[Tensor] = None, bias_b: Optional[Tensor] = None, *,
                      targets: Tensor, logit_map: LogitMap, backend: str, kind: Kind = Kind.NONE, beta: float = 0.0,
                      alpha: float = 0.0, need_entropy: bool = False,
                      row_elementwise: bool = True) -> tuple[Tensor, VocabStats]:
    """loss = Σ_r weights[r] · token_loss(stats[r], **token_inputs[r]) and the detached stats.

    ``hidden`` [..., D], ``weight`` [V, D], ``bias`` [V]: the trained model (a); ``hidden_b``,
    ``weight_b``, ``bias_b``: the frozen second model (b), or None.  ``targets`` [...] in kernel form,
    ``weights`` [...] and every ``token_inputs`` tensor [...] with the leading shape of ``hidden``.
    ``row_elementwise`` False: ``token_loss`` needs all rows at once (no chunked one-pass path).
    The loss has the stats dtype (float32; float64 for float64 inputs)."""
    lead = hidden.shape[:-1]
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    hidden_b, weight_b, bias_b = detach(hidden_b), detach(weight_b), detach(bias_b)
    sweep = dict(logit_map=logit_map, kind=kind, beta=beta, alpha=alpha, need_entropy=need_entropy)
    if row_elementwise and has(FAMILY, backend, Cap.ONE_PASS_LOSS) and _eager_gradients(hidden, weight, bias):
        contig = lambda x: None if x is None else x.contiguous()  # noqa: E731
        models = (rows(hidden), weight.contiguous(), contig(bias), rows(hidden_b), contig(weight_b), contig(bias_b))
        t = targets.reshape(-1).contiguous()
        flat = {k: x.reshape(-1) for k, x in token_inputs.items()}
        w = weights.reshape(-1)

        def run(needs):
            return _one_pass(backend, *models, t, logit_map, int(kind), beta, alpha, need_entropy, token_loss, w, flat,
                             needs)

        loss, stats = _FusedLinearLoss.apply(*models[:3], run)
        return loss, VocabStats(stats).view(*lead)
    stats = linear_vocab_stats(hidden, weight, bias, hidden_b, weight_b, bias_b, targets=targets, backend=backend,
                               **sweep)
    loss = (weights.to(stats.tensor.dtype) * token_loss(stats, **token_inputs)).sum()
    return loss, stats.detach()
