"""Vocabulary-parallel ops: the LM head(s) sharded over the vocabulary across a process group.

Layout (Megatron ``ColumnParallelLinear``): rank r holds rows [s_r, s_r + V_r) of the [V, D] weight (and
of the bias); the shards are contiguous, non-overlapping and cover [0, V).  ``vocab_start=None`` means
the shards lie in rank order, s_r = Σ_{r' < r} V_r' — rank × shard size for equal shards, and any
sizes ≥ 1 otherwise (e.g. the last shard smaller when V is not divisible by the world size).  An
explicit ``vocab_start`` may put the shards in any order.  Every call all-gathers (s_r, V_r) (2 int64
per rank) and raises ``ValueError`` on every rank unless the shards tile [0, V) exactly.  Hidden states,
targets (global ids), masks and advantages are the same on every rank; so are the outputs (the full
per-token results).  The backward assumes every rank back-propagates the same upstream gradient (a loss
computed identically on every rank, as with Megatron's vocab-parallel cross-entropy).

Each rank sweeps its shard with the single-device fused op (``onepass._ops.vocab_stats.linear_vocab_stats``;
no logits materialized) and gets per-row statistics of its shard (a ``VocabStats``), with p^r = softmax of the rank's logits a = z/T:
lse^r, the logit of the target clamped into the shard, H^r = entropy of p^r, D^r = KL of the shard
distributions.  With e_r = exp(lse^r − M), M = max_r lse^r (one MAX all-reduce), s = Σ_r e_r and the
shard masses w_r = e_r / s (u_r likewise for the second model b), the global values are exactly

    lse   = M + log s
    logp  = a_y − lse                       (a_y from the rank that owns y, 0 from the others)
    H     = lse − Σ_r e_r (lse^r − H^r) / s                      (Σ_r w_r E_{p^r}[a] = E_p[a])
    KL(p‖q) = Σ_r e_r (D^r + lse_a^r − lse_b^r) / s_a − lse_a + lse_b      (E_p[a − b] − lse_a + lse_b)
    KL(q‖p) likewise with a ↔ b

so every sum travels in ONE SUM all-reduce of [N, k] fp32 columns.  These are the KL kinds (reverse_kl,
forward_kl, and jsd with β ∈ {0, 1}, alpha with α ∈ {0, 1}): one sweep.

Every other divergence (jsd with 0 < β < 1, tv, hellinger, chi2, alpha with α ∉ {0, 1}) takes a SECOND
sweep: its per-entry term φ(a_v − lse_a, b_v − lse_b) (docs/vocab_stats.md) needs the GLOBAL normalizers,
which the single-device op, normalizing by its own shard, does not have.  The first sweep (above, without a
divergence column) gives the global lse_a, lse_b; then each rank sums φ over its shard, and, for each model
whose gradient is needed, S = Σ_v ∂φ/∂(a_v − lse) (resp. b), and ONE SUM all-reduce of [N', 1 + #S]
(N' = the rows not ignored) gives D = Σ_r Σ_{v in shard r} φ and the global S_a, S_b.  Backward, with no
communication: dL/da_v = g·∂φ/∂a_v at fixed lse on the rank's own shard, and dL/dlse_a = −g·S_a (all the
vocabulary's terms), the same on every rank, which the lse's straight-through sums below route to each
rank's shard as −g·S_a·p_v: together the exact g·(∂φ/∂a_v − p_v Σ_u ∂φ/∂a_u).

The second sweep is plain torch on row chunks (``_GlobalDivergence``, with the φ of
``onepass.reference.vocab.divergence_from_logprobs``), not a fused kernel.  Cost: in the forward the chunk's
[rows, V_r] logits of both heads are recomputed (one more matrix product per model) and the φ terms are
evaluated and differentiated w.r.t. the normalizers by autograd on the chunk; the backward recomputes them
(again one product per model) and differentiates w.r.t. the logits, then applies dL/dlogits to the hidden
states, the weight and bias shards (two products per model needing a gradient) — on top of the first sweep's
own forward and backward.  Memory: a chunk holds about ``_SWEEP2_BUFFERS`` [rows, V_r] temporaries of the
compute dtype, and its rows are chosen so that together they stay within the op layer's ``CHUNK_BYTES``
(16 MiB on the CPU, 256 MiB on GPUs); nothing of size [N, V_r] is allocated.  Numerics are the reference's
(fp32, alpha's sum in fp64), not the kernels' guarded forms (no expm1 forms for p ≈ q; chi2 where q
underflows to 0 but p does not is +inf).  Follow-up: a vocab-stats kernel entry point that takes given
per-row lse_a, lse_b and returns the shard's D, S_a, S_b (and its backward from them) would make it one fused
sweep each way.

Backward: the sums are straight-through (value: the all-reduced sum; gradient: to this rank's own term),
so each rank's autograd computes, with no communication, the exact gradient of the (replicated) loss with
respect to its own shard statistics, hence its weight and bias shards; the hidden states are shared,
so their gradient is the sum of the ranks' partial gradients: one SUM all-reduce of [N, D] per model
that requires it.  The lse statistic is not differentiable through the single-device op, so its gradient
is taken through the identity lse^r = a_{y'} − logp^r with a_{y'} = h·W[y']/T (+ bias) computed for
each row's clamped local target y' (values always come from the op).  Cost, only when the head needs a
gradient: an [N, D] gather in the forward and, in the backward, autograd's dense [V_r, D] gradient of that
gather, added to the op's weight gradient.

Communication per row (fp32, payload of the collectives; a ring all-reduce moves 2(R−1)/R of it):
forward 4 bytes per MAX column (1 for one model, 2 for two) + 4 bytes per SUM column:
linear_token_logprobs 4 + 8 (12 with entropy), linear_divergence 8 + 12, linear_policy_ref_stats and
grpo_loss with a reference head and kl_estimator='full' 8 + 24 (other estimators 8 + 20), grpo_loss
without a reference head 4 + 12, opd_loss 8 + 20 (sampled: 8 + 16).  The second-sweep kinds send one
column less in the first SUM and then a second SUM of 4 bytes (D) + 4 per model needing a gradient
(S_a, S_b), over the rows not ignored: linear_divergence 8 + 8 + 12 (teacher with a gradient; 8 without,
4 under no_grad), opd_loss 8 + 16 + 8, grpo_loss with kl_estimator='full' 8 + 20 + 8 (3 collectives, not 2);
backward D × (bytes of the hidden dtype) per model whose hidden states need a gradient (the dH
all-reduce: 4·D for fp32), nothing else.  Per call, not per row: an all-gather of 2 int64 per rank.

FSDP2 (``HeadLoss``): under ``fully_shard`` an LM-head weight is a sharded DTensor except inside the
forward (and backward) of the module FSDP2 wraps it in; ``HeadLoss`` runs a single-device fused loss in
its own forward, so wrapping it with ``fully_shard`` hands the loss the unsharded weight and FSDP2
reduce-scatters the weight's gradient to the shards as for any layer.
"""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _dispatch, _validate, losses
from ._contract import Kind, LogitMap, Stat, VocabStats, kernel_kind, stats_dtype
from ._ops.vocab_stats import LinearGradAccumulator, _chunk_logits_pair, _rows_per_chunk, linear_vocab_stats, rows
from .kl import policy_ref_outputs
from .losses import (MASKED_TARGET, OPD_SAMPLED, _constants, _weighted_sum, aggregation_weights, check_opd_inputs,
                     masked_targets, opd_metrics, opd_token_loss)
from .reference.vocab import divergence_from_logprobs

#: Divergence kinds whose sums split over vocabulary shards (see the module docstring); the others take
#: the second sweep (``_GlobalDivergence``).
_KL_KINDS = (Kind.REVERSE_KL, Kind.FORWARD_KL)
#: [rows, V_r] temporaries of one chunk of the second sweep alive at once: the two logit blocks, the ones
#: autograd saves for the φ terms (3 for tv up to 9 fp32-equivalents for jsd and alpha, counted with
#: saved_tensors_hooks) and the gradient.  A chunk has CHUNK_BYTES / this many bytes of logits, so that all
#: of them together stay within the op layer's CHUNK_BYTES.
_SWEEP2_BUFFERS = 12


# ------------------------------------------------------------------------------------------------
# Collectives.
# ------------------------------------------------------------------------------------------------
class _SharedInput(torch.autograd.Function):
    """Identity forward; the backward all-reduces (sums) the gradient: each rank's partial dH."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _shared(x: Tensor | None, group) -> Tensor | None:
    return _SharedInput.apply(x, group) if x is not None and x.requires_grad else x


def _sum_over_ranks(x: Tensor, group) -> Tensor:
    """Σ_ranks x, straight-through: the value is the all-reduced sum, the gradient goes to this rank's x
    only (exact under a replicated upstream gradient: ∂Σ/∂x_r = 1)."""
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total + (x - x.detach())


def _max_over_ranks(x: Tensor, group) -> Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


# ------------------------------------------------------------------------------------------------
# Shards, targets, validation.
# ------------------------------------------------------------------------------------------------
def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("onepass.distributed needs torch.distributed initialized "
                           "(torch.distributed.init_process_group) before the first call")
    return dist.group.WORLD if group is None else group


def _shard_range(v_shard: int, vocab_start, device, group) -> tuple[int, int]:
    """(vocab_start, V) of this rank's shard; checks on every rank that the shards tile [0, V)."""
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}")
    mine = torch.tensor([-1 if vocab_start is None else vocab_start, v_shard], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    starts_sizes = [tuple(int(x) for x in p.tolist()) for p in parts]
    given = [s >= 0 for s, _ in starts_sizes]
    if any(given) and not all(given):
        raise ValueError("vocab_start must be given on every rank of the group or on none")
    if not all(given):
        offset, filled = 0, []
        for _, size in starts_sizes:
            filled.append((offset, size))
            offset += size
        starts_sizes = filled
    layout = sorted(starts_sizes)
    vocab = sum(size for _, size in layout)
    expected = 0
    for start, size in layout:
        if start != expected:
            raise ValueError(f"the vocabulary shards (vocab_start, rows) = {starts_sizes} by rank do not tile "
                             f"[0, {vocab}): a shard starts at {start}, expected {expected}")
        expected += size
    return starts_sizes[dist.get_rank(group)][0], vocab


def _local_targets(global_targets: Tensor | None, n: int, start: int, v_shard: int, device):
    """(local targets [N] for the shard op, owned [N] bool, valid [N] bool) from the kernel-form global
    targets (−1 = ignored; None = no targets, every row valid).  A row whose target another rank owns
    gets local target 0 (any id of the shard: only its lse gradient identity uses it)."""
    if global_targets is None:
        zeros = torch.zeros(n, dtype=torch.int64, device=device)
        return zeros, torch.zeros(n, dtype=torch.bool, device=device), torch.ones(n, dtype=torch.bool, device=device)
    valid = global_targets >= 0
    owned = valid & (global_targets >= start) & (global_targets < start + v_shard)
    local = torch.where(owned, global_targets - start, torch.zeros_like(global_targets))
    return torch.where(valid, local, torch.full_like(local, -1)).contiguous(), owned, valid


def _with_grad_of(value: Tensor, path: Tensor) -> Tensor:
    """``value``'s value with ``path``'s gradient (the two are equal in exact arithmetic)."""
    return value.detach() + (path - path.detach())


class _Head:
    """One model's rows: hidden [N, D] (gradient all-reduced over the group), its weight and bias shards."""

    def __init__(self, hidden, weight, bias, group, detach=False):
        if detach:
            hidden, weight = hidden.detach(), weight.detach()
            bias = bias.detach() if bias is not None else None
        self.h = _shared(rows(hidden), group)
        self.w = weight.contiguous()
        self.bias = bias.contiguous() if bias is not None else None

    @property
    def needs_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.h, self.w, self.bias))

    def target_logit(self, local_targets: Tensor, logit_map: LogitMap, model: int) -> Tensor:
        """a_{y'} = the ``logit_map`` of model ``model`` on h · W[y'] (+ bias[y']) per row, fp32 (fp64 for fp64
        inputs), differentiable (ignored rows: index 0); only its gradient is used, so a head that needs none
        gets zeros."""
        dtype = stats_dtype(self.h)
        if not (self.needs_grad and torch.is_grad_enabled()):
            return torch.zeros(local_targets.shape, dtype=dtype, device=local_targets.device)
        idx = local_targets.clamp_min(0)
        z = (self.h.to(dtype) * self.w[idx].to(dtype)).sum(-1)
        if self.bias is not None:
            z = z + self.bias[idx].to(dtype)
        return logit_map.apply(z, model)


def _phi_sum(za: Tensor, zb: Tensor, lse_a: Tensor, lse_b: Tensor, logit_map: LogitMap, divergence) -> Tensor:
    """Σ_v φ(a_v − lse_a, b_v − lse_b) [rows] over the columns of the raw logit blocks za, zb [rows, V_r]
    (a, b: their ``logit_map``, e.g. za/T), given the rows' normalizers lse_a, lse_b [rows]; φ of ``divergence`` = (kind, β, α) as in
    ``onepass.reference.vocab.divergence_from_logprobs`` (the sum of per-entry terms, so shards add up)."""
    kind, beta, alpha = divergence
    return divergence_from_logprobs(logit_map.apply(za, 0) - lse_a[:, None], logit_map.apply(zb, 1) - lse_b[:, None],
                                    kind.name.lower(), beta, alpha)


class _GlobalDivergence(torch.autograd.Function):
    """The second sweep: D [n] = Σ_{v < V} φ(a_v − lse_a, b_v − lse_b) from this rank's shards of both heads
    and the GLOBAL normalizers lse_a, lse_b [n] (the first sweep's, all-reduced).

    Forward: the shard's partial sum in row chunks (a [chunk, V_r] logits block per model, recomputed, never
    [n, V_r]), and, for each normalizer that needs a gradient, S = Σ_{v in shard} ∂φ/∂(a_v − lse) (autograd
    on the chunk); [D, S_a, S_b] travel in ONE SUM all-reduce.  Backward, no communication: per chunk,
    dL/dz_v = g·∂φ/∂z_v at fixed lse (autograd on the recomputed chunk) applied to this rank's hidden and
    weight and bias shards, and dL/dlse = −g·S with the summed S (∂D/∂lse = −Σ over every rank's entries),
    the same on every rank, so lse's straight-through sums route it exactly to each rank's own shard.
    Plain torch on chunks, not a fused kernel (see the module docstring)."""

    @staticmethod
    def forward(ctx, ha, wa, bias_a, hb, wb, bias_b, lse_a, lse_b, logit_map, divergence, group):
        n, v_shard = ha.shape[0], wa.shape[0]
        dtype = stats_dtype(ha)
        need_lse = [i for i in (0, 1) if ctx.needs_input_grad[6 + i]]
        step = _rows_per_chunk(ha, v_shard * _SWEEP2_BUFFERS)
        logits_a, logits_b = _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, step)
        cols = torch.zeros(n, 1 + len(need_lse), dtype=dtype, device=ha.device)
        for s in range(0, n, step):
            e = min(n, s + step)
            za, zb = logits_a(s, e).to(dtype), logits_b(s, e).to(dtype)
            lse = [lse_a[s:e].detach(), lse_b[s:e].detach()]
            with torch.enable_grad():
                for i in need_lse:
                    lse[i] = lse[i].clone().requires_grad_()
                div = _phi_sum(za, zb, lse[0], lse[1], logit_map, divergence)
                if need_lse:
                    cols[s:e, 1:] = -torch.stack(torch.autograd.grad(div.sum(), [lse[i] for i in need_lse]), -1)
            cols[s:e, 0] = div.detach()
        dist.all_reduce(cols, op=dist.ReduceOp.SUM, group=group)
        sums = {i: cols[:, 1 + k] for k, i in enumerate(need_lse)}
        ctx.save_for_backward(ha, wa, bias_a, hb, wb, bias_b, lse_a.detach(), lse_b.detach(), sums.get(0), sums.get(1))
        ctx.params = (logit_map, divergence, step)
        return cols[:, 0].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        ha, wa, bias_a, hb, wb, bias_b, lse_a, lse_b, sum_a, sum_b = ctx.saved_tensors
        logit_map, divergence, step = ctx.params
        needs = ctx.needs_input_grad[:6]
        need_z = (any(needs[0:3]), any(needs[3:6]))
        dtype = stats_dtype(ha)
        acc = (LinearGradAccumulator(ha, wa, bias_a, *needs[0:3]), LinearGradAccumulator(hb, wb, bias_b, *needs[3:6]))
        logits_a, logits_b = _chunk_logits_pair(ha, wa, bias_a, hb, wb, bias_b, step)
        g = g.to(dtype)
        if any(need_z):
            for s in range(0, ha.shape[0], step):
                e = min(ha.shape[0], s + step)
                z = [logits_a(s, e).to(dtype).detach().requires_grad_(need_z[0]),
                     logits_b(s, e).to(dtype).detach().requires_grad_(need_z[1])]
                with torch.enable_grad():
                    div = _phi_sum(z[0], z[1], lse_a[s:e], lse_b[s:e], logit_map, divergence)
                    dz = iter(torch.autograd.grad(div, [x for x in z if x.requires_grad], grad_outputs=g[s:e]))
                for model, need in enumerate(need_z):
                    if need:
                        acc[model].add(s, e, next(dz))
        out_a, out_b = acc[0].result(wa, bias_a), acc[1].result(wb, bias_b)
        d_lse = [-g * x if x is not None else None for x in (sum_a, sum_b)]
        return (*out_a, *out_b, *d_lse, None, None, None)


def _global_divergence(a: _Head, b: _Head, lse_a: Tensor, lse_b: Tensor, valid: Tensor, logit_map: LogitMap, divergence,
                       group) -> Tensor:
    """D [N] of ``divergence`` (kind, β, α) over the full vocabulary from the shards and the global normalizers
    [N]; 0 on the rows that are not ``valid`` (left out of the sweep: no cost, no gradient).  A normalizer
    enters as a constant when its head needs no gradient (the stats column may still carry autograd
    history from the other head), so its S is neither computed nor sent."""
    idx = valid.nonzero()[:, 0]
    rows_a, rows_b = (lse[idx] if head.needs_grad else lse[idx].detach() for head, lse in ((a, lse_a), (b, lse_b)))
    div = _GlobalDivergence.apply(a.h[idx], a.w, a.bias, b.h[idx], b.w, b.bias, rows_a, rows_b, logit_map, divergence,
                                  group)
    return lse_a.new_zeros(lse_a.shape).index_put((idx,), div)


def _vocab_parallel_stats(a: _Head, b: _Head | None, targets, lead, ignore_index, logit_map, kind: Kind,
                          need_logp: bool, need_entropy: bool, backend, group, vocab_start, beta=0.0,
                          alpha=0.0) -> VocabStats:
    """Global per-row stats [lead] over the full vocabulary from the shards, for ``targets`` [lead] global ids
    (or None): lse_a, lse_b, and as requested logp_a, logp_b, entropy, div (of the kernel kind ``kind`` with
    ``beta``, ``alpha``; NONE: none); the other columns are 0.  Rows with an ignored target are 0 (and get no
    gradient)."""
    n, v_shard = a.h.shape[0], a.w.shape[0]
    start, vocab = _shard_range(v_shard, vocab_start, a.h.device, group)
    global_targets = _validate.kernel_targets(targets, lead, vocab, ignore_index)
    local_t, owned, valid = _local_targets(global_targets, n, start, v_shard, a.h.device)
    second = (b.h, b.w, b.bias) if b is not None else (None, None, None)
    shard_kind = kind if kind in _KL_KINDS else Kind.NONE  # the other kinds: a second sweep, below
    shard = linear_vocab_stats(a.h, a.w, a.bias, *second, targets=local_t, logit_map=logit_map, backend=backend,
                               kind=shard_kind, need_entropy=need_entropy)
    # Per model (a, then b): its shard's lse and target logit, values from the op, gradients through a_{y'}.
    models = [(a, shard.lse_a, shard.logp_a)] + ([(b, shard.lse_b, shard.logp_b)] if b is not None else [])
    lse, logit = [], []
    for model, (head, shard_lse, shard_logp) in enumerate(models):
        path = head.target_logit(local_t, logit_map, model)
        logit.append(_with_grad_of(shard_logp + shard_lse, path))
        lse.append(_with_grad_of(shard_lse, path - shard_logp))
    m = _max_over_ranks(torch.stack(lse, -1), group)
    e = [torch.exp(x - m[:, i]) for i, x in enumerate(lse)]
    cols = list(e)
    if need_logp:
        cols += [torch.where(owned, y, 0.0) for y in logit]
    if need_entropy:
        cols.append(e[0] * (lse[0] - shard.entropy))
    p, q = (0, 1) if kind == Kind.REVERSE_KL else (1, 0)  # KL(p‖q): a‖b or b‖a
    if shard_kind != Kind.NONE:
        cols.append(e[p] * (shard.div + lse[p] - lse[q]))
    sums = iter(_sum_over_ranks(torch.stack(cols, -1), group).unbind(-1))
    mass = [next(sums) for _ in models]
    glse = [m[:, i] + torch.log(s) for i, s in enumerate(mass)]
    out = {Stat.LSE_A: glse[0]}
    if b is not None:
        out[Stat.LSE_B] = glse[1]
    if need_logp:
        for stat, g in zip((Stat.LOGP_A, Stat.LOGP_B), glse):
            out[stat] = next(sums) - g
    if need_entropy:
        out[Stat.ENTROPY] = glse[0] - next(sums) / mass[0]
    if shard_kind != Kind.NONE:
        out[Stat.DIV] = next(sums) / mass[p] - glse[p] + glse[q]
    elif kind != Kind.NONE:
        out[Stat.DIV] = _global_divergence(a, b, glse[0], glse[1], valid, logit_map, (kind, beta, alpha), group)
    zero = torch.zeros_like(glse[0])
    columns = [torch.where(valid, out[stat], 0.0) if stat in out else zero for stat in Stat]
    return VocabStats(torch.stack(columns, -1)).view(*lead)


def _prepare(op, backend, hidden, group, temperature, *logit_keywords, second_prefix=""):
    """(group, ``LogitMap`` of temperature and the soft-cap/scale keywords, backend)."""
    group = _resolve_group(group)
    logit_map = _validate.logit_map(temperature, *logit_keywords, second_prefix=second_prefix)
    return group, logit_map, _dispatch.resolve_backend(backend, hidden, "vocab_stats", f"distributed.{op}")


def _check_pair(a_hidden, a_weight, a_bias, b_hidden, b_weight, b_bias, b_prefix, a_prefix=""):
    """Both heads' shards: each model valid, the same shard rows (both heads sharded alike), one device."""
    _, v_shard = _validate.check_linear(a_prefix, a_hidden, a_weight, a_bias)
    _validate.check_second_model(b_prefix, b_hidden, b_weight, b_bias, a_prefix, a_hidden, v_shard)
    _validate.check_same_device(**{f"{a_prefix}hidden": a_hidden, f"{a_prefix}weight": a_weight,
                                   f"{b_prefix}hidden": b_hidden, f"{b_prefix}weight": b_weight,
                                   f"{a_prefix}bias": a_bias, f"{b_prefix}bias": b_bias})


# ------------------------------------------------------------------------------------------------
# Public ops.
# ------------------------------------------------------------------------------------------------
def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, logit_softcap=None, logit_scale=1.0, backend="auto", group=None,
                          vocab_start=None):
    """``onepass.linear_token_logprobs`` with ``weight`` [V_r, D] (and ``bias`` [V_r]) this rank's vocabulary
    shard; ``targets`` [...] global ids.  Returns logp [...] (and entropy [...]) over the full vocabulary,
    fp32, the same on every rank; differentiable w.r.t. hidden, the weight shard and the bias shard."""
    _validate.check_linear("", hidden, weight, bias)
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    group, logit_map, be = _prepare("linear_token_logprobs", backend, hidden, group, temperature, logit_softcap,
                                    logit_scale)
    stats = _vocab_parallel_stats(_Head(hidden, weight, bias, group), None, targets, hidden.shape[:-1], ignore_index,
                                  logit_map, Kind.NONE, True, bool(return_entropy), be, group, vocab_start)
    return (stats.logp_a, stats.entropy) if return_entropy else stats.logp_a


def linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                            temperature=1.0, ignore_index=-100, logit_softcap=None, logit_scale=1.0,
                            ref_logit_softcap=None, ref_logit_scale=1.0, backend="auto", group=None, vocab_start=None):
    """``onepass.linear_policy_ref_stats`` on vocabulary shards of both heads (the same rows of each).
    Returns dict(logp, ref_logp, entropy, kl_full) [...] fp32; no gradient to the reference."""
    _check_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, "ref_")
    group, logit_map, be = _prepare("linear_policy_ref_stats", backend, hidden, group, temperature, logit_softcap,
                                    logit_scale, ref_logit_softcap, ref_logit_scale, second_prefix="ref_")
    stats = _vocab_parallel_stats(_Head(hidden, weight, bias, group),
                                  _Head(ref_hidden, ref_weight, ref_bias, group, detach=True), targets,
                                  hidden.shape[:-1], ignore_index, logit_map, Kind.REVERSE_KL, True, True, be, group,
                                  vocab_start)
    return policy_ref_outputs(stats)


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                      teacher_bias=None, kind="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0, targets=None,
                      ignore_index=-100, logit_softcap=None, logit_scale=1.0, teacher_logit_softcap=None,
                      teacher_logit_scale=1.0, backend="auto", group=None, vocab_start=None):
    """``onepass.linear_divergence`` on vocabulary shards of both heads, every ``kind`` (reverse_kl and
    forward_kl in one sweep, the others in two: see the module docstring).  Gradients to the student, and
    to the teacher when it requires grad."""
    _check_pair(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                "teacher_", "student_")
    code, beta, alpha = kernel_kind(kind, beta, alpha)
    group, logit_map, be = _prepare("linear_divergence", backend, student_hidden, group, temperature, logit_softcap,
                                    logit_scale, teacher_logit_softcap, teacher_logit_scale, second_prefix="teacher_")
    stats = _vocab_parallel_stats(_Head(student_hidden, student_weight, student_bias, group),
                                  _Head(teacher_hidden, teacher_weight, teacher_bias, group), targets,
                                  student_hidden.shape[:-1], ignore_index, logit_map, code, False, False, be, group,
                                  vocab_start, beta, alpha)
    return stats.div


def grpo_loss(hidden, weight, targets, advantages, *, group=None, vocab_start=None, **kwargs):
    """``onepass.grpo_loss`` with vocabulary shards of the policy (and reference) heads: every argument and loss
    option of ``onepass.grpo_loss`` (bound against its signature: same names, defaults and checks; packed
    sequences too), ``weight`` / ``bias`` / ``ref_weight`` / ``ref_bias`` this rank's rows, targets global ids.
    The distributed stats [rows] (policy logp and entropy, the reference's logp or, with
    ``kl_estimator="full"``, the ``ref_divergence`` penalty of any kind), then the single-device loss's
    per-token function on them (replicated on every rank) and its metrics.  Returns (loss, metrics);
    gradients to the policy only.  A random objective (clip_cov) draws from ``generator`` on every rank:
    give each rank a generator in the same state (the default is seeded alike on every rank)."""
    bound = losses.GRPO_SIGNATURE.bind(hidden, weight, targets, advantages, **kwargs)
    bound.apply_defaults()
    args = bound.arguments
    setup = losses.grpo_setup("distributed.grpo_loss", **args)
    group = _resolve_group(group)
    two = setup.ref_hidden is not None
    ref_head = _Head(setup.ref_hidden, args["ref_weight"], args["ref_bias"], group, detach=True) if two else None
    sweep = setup.sweep
    stats = _vocab_parallel_stats(_Head(setup.hidden, weight, args["bias"], group), ref_head,
                                  masked_targets(targets, args["mask"]), targets.shape, MASKED_TARGET,
                                  sweep["logit_map"], sweep["kind"], True, True, sweep["backend"], group, vocab_start,
                                  sweep["beta"], sweep["alpha"])
    return setup.token_loss(stats, **setup.inputs).sum(), setup.metrics(stats.detach())


def _signature_with_group(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` with the keywords ``group=None, vocab_start=None`` before its ``**options``."""
    params = list(signature.parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("group", "vocab_start")]
    return signature.replace(parameters=params[:-1] + extra + params[-1:])


grpo_loss.__signature__ = _signature_with_group(losses.GRPO_SIGNATURE)


def opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None, *, mask,
             divergence="reverse_kl", beta=0.5, alpha=0.5, reward_scale=1.0, ref_logp=None, student_bias=None,
             teacher_bias=None, temperature=1.0, loss_agg="token-mean", logit_softcap=None, logit_scale=1.0,
             teacher_logit_softcap=None, teacher_logit_scale=1.0, backend="auto", group=None, vocab_start=None):
    """``onepass.opd_loss`` with vocabulary shards of the student and teacher heads, every ``divergence``:
    the distributed stats, then ``opd_token_loss`` aggregated (replicated on every rank).  Gradients to the
    student only."""
    _, kind, beta, alpha = check_opd_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                            mask=mask, divergence=divergence, beta=beta, alpha=alpha,
                                            reward_scale=reward_scale, ref_logp=ref_logp, student_bias=student_bias,
                                            teacher_bias=teacher_bias)
    sampled = divergence == OPD_SAMPLED
    group, logit_map, be = _prepare("opd_loss", backend, student_hidden, group, temperature, logit_softcap,
                                    logit_scale, teacher_logit_softcap, teacher_logit_scale, second_prefix="teacher_")
    stats = _vocab_parallel_stats(_Head(student_hidden, student_weight, student_bias, group),
                                  _Head(teacher_hidden, teacher_weight, teacher_bias, group, detach=True),
                                  masked_targets(targets, mask) if targets is not None else None, mask.shape,
                                  MASKED_TARGET, logit_map, kind, True, False, be, group, vocab_start, beta, alpha)
    ref_logp = _constants(mask, ref_logp=ref_logp)["ref_logp"]
    per_token = opd_token_loss(stats, ref_logp, sampled=sampled, reward_scale=float(reward_scale))
    loss = _weighted_sum(aggregation_weights(mask, loss_agg), per_token)
    return loss, opd_metrics(stats, mask, ref_logp, sampled=sampled, reward_scale=float(reward_scale),
                             with_logp=targets is not None)


class HeadLoss(torch.nn.Module):
    """A fused loss on an LM head, computed inside this module's forward.

    ``forward(hidden, *args, **kwargs)`` returns ``loss_fn(hidden, head.weight, *args, **kwargs)``, with
    ``head.bias`` (when the head has one) passed as the keyword ``bias_keyword``.  ``loss_fn`` is any
    onepass op taking (hidden, weight, ...): ``onepass.grpo_loss`` (bias keyword ``bias``),
    ``onepass.opd_loss`` (``student_bias``), ``onepass.linear_token_logprobs``.

    With FSDP2, ``fully_shard(head_loss)`` (before ``fully_shard`` of the model around it) makes the head's
    parameters their own FSDP group: all-gathered for this forward and its backward, so the loss sees the
    full [V, D] weight, and the gradient is reduce-scattered to the sharded parameters.  A head tied to the
    input embedding must stay in the embedding's FSDP group: then compute the loss inside the forward of
    the module that owns both.  Without FSDP it is a plain module around the op.
    """

    def __init__(self, head: torch.nn.Linear, loss_fn, bias_keyword: str = "bias"):
        super().__init__()
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"head must be a torch.nn.Linear (the LM head), got {type(head).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.head, self.loss_fn, self.bias_keyword = head, loss_fn, bias_keyword

    def forward(self, hidden, *args, **kwargs):
        if self.head.bias is not None:
            kwargs[self.bias_keyword] = self.head.bias
        return self.loss_fn(hidden, self.head.weight, *args, **kwargs)
