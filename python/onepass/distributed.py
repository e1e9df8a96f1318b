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

Each rank sweeps its shard with the single-device fused op (``_shard_stats``; no logits materialized)
and gets per-row statistics of its shard, with p^r = softmax of the rank's logits a = z/T:
lse^r, the logit of the target clamped into the shard, H^r = entropy of p^r, D^r = KL of the shard
distributions.  With e_r = exp(lse^r − M), M = max_r lse^r (one MAX all-reduce), s = Σ_r e_r and the
shard masses w_r = e_r / s (u_r likewise for the second model b), the global values are exactly

    lse   = M + log s
    logp  = a_y − lse                       (a_y from the rank that owns y, 0 from the others)
    H     = lse − Σ_r e_r (lse^r − H^r) / s                      (Σ_r w_r E_{p^r}[a] = E_p[a])
    KL(p‖q) = Σ_r e_r (D^r + lse_a^r − lse_b^r) / s_a − lse_a + lse_b      (E_p[a − b] − lse_a + lse_b)
    KL(q‖p) likewise with a ↔ b

so every sum travels in ONE SUM all-reduce of [N, k] fp32 columns.  Supported divergences: reverse_kl and
forward_kl (and jsd with β ∈ {0, 1}, alpha with α ∈ {0, 1}, which are KL).  jsd (0 < β < 1), tv,
hellinger, chi2 and alpha (α ∉ {0, 1}) raise ``ValueError``: their per-entry terms need the GLOBAL
normalizers inside the sweep (φ(a_v − lse_a, b_v − lse_b) does not split into per-shard statistics), and
the single-device op normalizes by its own shard; they need a sweep entry point that takes per-row
lse_a, lse_b (one more MAX + SUM round in the forward, S_a, S_b summed for the backward).

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
grpo_loss with a reference head 8 + 24, grpo_loss without 4 + 12, opd_loss 8 + 20 (sampled: 8 + 16);
backward D × (bytes of the hidden dtype) per model whose hidden states need a gradient (the dH
all-reduce: 4·D for fp32), nothing else.  Per call, not per row: an all-gather of 2 int64 per rank.

FSDP2 (``HeadLoss``): under ``fully_shard`` an LM-head weight is a sharded DTensor except inside the
forward (and backward) of the module FSDP2 wraps it in; ``HeadLoss`` runs a single-device fused loss in
its own forward, so wrapping it with ``fully_shard`` hands the loss the unsharded weight and FSDP2
reduce-scatters the weight's gradient to the shards as for any layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops, _public, _validate
from .divergence import KIND_CODES, kernel_kind
from .kl import kl_penalty
from .losses import (OPD_SAMPLED, _check_loss_inputs, _check_token_tensor, aggregation_weights, check_grpo_inputs,
                     policy_loss)

_KL_KINDS = (KIND_CODES["reverse_kl"], KIND_CODES["forward_kl"])
#: Backends of the single-device op each rank runs on its shard (the torch reference has no shard op).
SHARD_BACKENDS = ("triton", "cuda", "cpu")


# ------------------------------------------------------------------------------------------------
# The one adapter to the single-device op layer.
# ------------------------------------------------------------------------------------------------
def _shard_stats(ha, wa, bias_a, hb, wb, bias_b, local_targets, inv_temp, kind, need_entropy, backend):
    """This rank's per-row stats of its vocabulary shard, one fused sweep (``onepass._ops.linear_vocab_stats``).

    ha [N, D], wa [V_r, D], bias_a [V_r] | None (hb, wb, bias_b the second model or None);
    local_targets [N] int64 in [0, V_r) or −1 (ignored row: every stat 0).  kind: 0 (none), 1 (KL(p‖q)),
    2 (KL(q‖p)).  Returns dict of [N] fp32: lse_a, lse_b (values only: no gradient through them),
    logp_a = a[y] − lse_a, logp_b, entropy (of p), div (differentiable).
    """
    stats = _ops.linear_vocab_stats(ha, wa, bias_a, hb, wb, bias_b, local_targets, inv_temp, kind, 0.0, 0.0,
                                    need_entropy, backend)
    return {"lse_a": stats[:, 0].detach(), "lse_b": stats[:, 1].detach(), "logp_a": stats[:, _ops.STAT_LOGP_A],
            "logp_b": stats[:, _ops.STAT_LOGP_B], "entropy": stats[:, _ops.STAT_ENTROPY],
            "div": stats[:, _ops.STAT_DIV]}


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
        d = hidden.shape[-1]
        if detach:
            hidden, weight = hidden.detach(), weight.detach()
            bias = bias.detach() if bias is not None else None
        self.h = _shared(_public.rows(hidden, d), group)
        self.w = weight.contiguous()
        self.bias = bias.contiguous() if bias is not None else None

    def target_logit(self, local_targets: Tensor, inv_temp: float) -> Tensor:
        """a_{y'} = (h · W[y'] (+ bias[y'])) / T per row, fp32, differentiable (ignored rows: index 0);
        only its gradient is used, so a head that needs none gets zeros."""
        needs_grad = any(t is not None and t.requires_grad for t in (self.h, self.w, self.bias))
        if not (needs_grad and torch.is_grad_enabled()):
            return torch.zeros(local_targets.shape, dtype=torch.float32, device=local_targets.device)
        idx = local_targets.clamp_min(0)
        z = (self.h.float() * self.w[idx].float()).sum(-1)
        if self.bias is not None:
            z = z + self.bias[idx].float()
        return z * inv_temp


def _vocab_parallel_stats(a: _Head, b: _Head | None, targets, lead, ignore_index, inv_temp, kind, need_logp,
                          need_entropy, backend, group, vocab_start):
    """Global per-row stats [N] (dict: logp_a, logp_b, entropy, div as requested) from the shards, for
    ``targets`` [lead] global ids (or None).  Rows with an ignored target are 0 (and get no gradient)."""
    n, v_shard = a.h.shape[0], a.w.shape[0]
    if b is not None and b.w.shape[0] != v_shard:
        raise ValueError(f"the second head's shard has {b.w.shape[0]} rows but the first's has {v_shard}: both "
                         "heads must be sharded alike")
    start, vocab = _shard_range(v_shard, vocab_start, a.h.device, group)
    global_targets = _public.kernel_targets(targets, lead, vocab, ignore_index)
    local_t, owned, valid = _local_targets(global_targets, n, start, v_shard, a.h.device)
    st = _shard_stats(a.h, a.w, a.bias, b.h if b else None, b.w if b else None, b.bias if b else None, local_t,
                      inv_temp, kind, need_entropy, backend)
    heads = [("a", a)] + ([("b", b)] if b is not None else [])
    lse, logit = {}, {}
    for key, head in heads:
        path = head.target_logit(local_t, inv_temp)
        logit[key] = _with_grad_of(st[f"logp_{key}"] + st[f"lse_{key}"], path)
        lse[key] = _with_grad_of(st[f"lse_{key}"], path - st[f"logp_{key}"])
    m = _max_over_ranks(torch.stack([lse[k] for k, _ in heads], -1), group)
    e = {k: torch.exp(lse[k] - m[:, i]) for i, (k, _) in enumerate(heads)}
    cols = {f"s_{k}": e[k] for k, _ in heads}
    if need_logp:
        cols.update({f"y_{k}": torch.where(owned, logit[k], 0.0) for k, _ in heads})
    if need_entropy:
        cols["ent"] = e["a"] * (lse["a"] - st["entropy"])
    if kind == KIND_CODES["reverse_kl"]:
        cols["div"] = e["a"] * (st["div"] + lse["a"] - lse["b"])
    elif kind == KIND_CODES["forward_kl"]:
        cols["div"] = e["b"] * (st["div"] + lse["b"] - lse["a"])
    total = _sum_over_ranks(torch.stack(list(cols.values()), -1), group)
    tot = {name: total[:, i] for i, name in enumerate(cols)}
    glse = {k: m[:, i] + torch.log(tot[f"s_{k}"]) for i, (k, _) in enumerate(heads)}
    out = {}
    if need_logp:
        out.update({f"logp_{k}": tot[f"y_{k}"] - glse[k] for k, _ in heads})
    if need_entropy:
        out["entropy"] = glse["a"] - tot["ent"] / tot["s_a"]
    if kind == KIND_CODES["reverse_kl"]:
        out["div"] = tot["div"] / tot["s_a"] - glse["a"] + glse["b"]
    elif kind == KIND_CODES["forward_kl"]:
        out["div"] = tot["div"] / tot["s_b"] - glse["b"] + glse["a"]
    return {k: torch.where(valid, x, 0.0) for k, x in out.items()}


def _prepare(op, backend, hidden, group, temperature):
    group = _resolve_group(group)
    T = _validate.check_temperature(temperature)
    return group, 1.0 / T, _public.pick_backend(backend, hidden, f"distributed.{op}", SHARD_BACKENDS)


def _check_pair(a_hidden, a_weight, a_bias, b_hidden, b_weight, b_bias, b_prefix, a_prefix=""):
    _public.check_linear(a_prefix, a_hidden, a_weight, a_bias)
    _public.check_linear(b_prefix, b_hidden, b_weight, b_bias)
    if b_hidden.shape[:-1] != a_hidden.shape[:-1]:
        raise ValueError(f"{b_prefix}hidden has leading shape {tuple(b_hidden.shape[:-1])} but {a_prefix}hidden "
                         f"has {tuple(a_hidden.shape[:-1])}")
    _validate.check_same_dtype(**{f"{a_prefix}hidden": a_hidden, f"{b_prefix}hidden": b_hidden})
    _validate.check_same_device(**{f"{a_prefix}hidden": a_hidden, f"{a_prefix}weight": a_weight,
                                   f"{b_prefix}hidden": b_hidden, f"{b_prefix}weight": b_weight,
                                   f"{a_prefix}bias": a_bias, f"{b_prefix}bias": b_bias})


# ------------------------------------------------------------------------------------------------
# Public ops.
# ------------------------------------------------------------------------------------------------
def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, backend="auto", group=None, vocab_start=None):
    """``onepass.linear_token_logprobs`` with ``weight`` [V_r, D] (and ``bias`` [V_r]) this rank's vocabulary
    shard; ``targets`` [...] global ids.  Returns logp [...] (and entropy [...]) over the full vocabulary,
    fp32, the same on every rank; differentiable w.r.t. hidden, the weight shard and the bias shard."""
    _public.check_linear("", hidden, weight, bias)
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    group, inv_temp, be = _prepare("linear_token_logprobs", backend, hidden, group, temperature)
    lead = hidden.shape[:-1]
    out = _vocab_parallel_stats(_Head(hidden, weight, bias, group), None, targets, lead, ignore_index,
                                inv_temp, 0, True, bool(return_entropy), be, group, vocab_start)
    logp = out["logp_a"].reshape(lead)
    return (logp, out["entropy"].reshape(lead)) if return_entropy else logp


def linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                            temperature=1.0, ignore_index=-100, backend="auto", group=None, vocab_start=None):
    """``onepass.linear_policy_ref_stats`` on vocabulary shards of both heads (the same rows of each).
    Returns dict(logp, ref_logp, entropy, kl_full) [...] fp32; no gradient to the reference."""
    _check_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, "ref_")
    group, inv_temp, be = _prepare("linear_policy_ref_stats", backend, hidden, group, temperature)
    lead = hidden.shape[:-1]
    out = _vocab_parallel_stats(_Head(hidden, weight, bias, group), _Head(ref_hidden, ref_weight, ref_bias, group,
                                                                          detach=True),
                                targets, lead, ignore_index, inv_temp, KIND_CODES["reverse_kl"],
                                True, True, be, group, vocab_start)
    names = {"logp": "logp_a", "ref_logp": "logp_b", "entropy": "entropy", "kl_full": "div"}
    return {k: out[c].reshape(lead) for k, c in names.items()}


def _kl_kind(kind, beta, alpha, name="kind"):
    code, beta, alpha = kernel_kind(kind, beta, alpha)
    if code not in _KL_KINDS:
        raise ValueError(f"onepass.distributed supports {name}='reverse_kl' and 'forward_kl' (and jsd with beta in "
                         f"{{0, 1}}, alpha with alpha in {{0, 1}}); {kind!r} with beta={beta}, alpha={alpha} needs the "
                         "global normalizers inside a second vocabulary sweep, not implemented")
    return code


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                      teacher_bias=None, kind="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0, targets=None,
                      ignore_index=-100, backend="auto", group=None, vocab_start=None):
    """``onepass.linear_divergence`` on vocabulary shards of both heads; ``kind`` reverse_kl or forward_kl
    (see the module docstring).  Gradients to the student, and to the teacher when it requires grad."""
    _check_pair(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                "teacher_", "student_")
    code = _kl_kind(kind, beta, alpha)
    group, inv_temp, be = _prepare("linear_divergence", backend, student_hidden, group, temperature)
    lead = student_hidden.shape[:-1]
    out = _vocab_parallel_stats(_Head(student_hidden, student_weight, student_bias, group),
                                _Head(teacher_hidden, teacher_weight, teacher_bias, group),
                                targets, lead, ignore_index, inv_temp, code, False, False, be, group,
                                vocab_start)
    return out["div"].reshape(lead)


def grpo_loss(hidden, weight, targets, advantages, *, mask, old_logp=None, ref_logp=None, ref_hidden=None,
              ref_weight=None, bias=None, ref_bias=None, temperature=1.0, beta=0.0, kl_estimator="k3",
              epsilon_low=0.2, epsilon_high=0.2, dual_clip=None, loss_agg="token-mean", entropy_coef=0.0,
              backend="auto", group=None, vocab_start=None):
    """``onepass.grpo_loss`` with vocabulary shards of the policy (and reference) heads: the distributed
    stats, then ``kl_penalty`` and ``policy_loss`` (replicated on every rank).  Returns (loss, metrics)."""
    check_grpo_inputs(hidden, weight, targets, advantages, mask, bias, old_logp, ref_logp, ref_hidden, ref_weight,
                      kl_estimator, beta)
    masked = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    if ref_hidden is not None:
        st = linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, masked, bias=bias, ref_bias=ref_bias,
                                     temperature=temperature, backend=backend, group=group, vocab_start=vocab_start)
        logp, entropy, ref_lp = st["logp"], st["entropy"], st["ref_logp"]
    else:
        logp, entropy = linear_token_logprobs(hidden, weight, masked, bias=bias, temperature=temperature,
                                              return_entropy=True, backend=backend, group=group,
                                              vocab_start=vocab_start)
        ref_lp = ref_logp
    if kl_estimator == "full":
        kl = st["kl_full"]
    else:
        kl = kl_penalty(logp, ref_lp, estimator=kl_estimator) if ref_lp is not None else None
    return policy_loss(logp, advantages, mask=mask, old_logp=old_logp, kl=kl, entropy=entropy, beta=beta,
                       epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip, loss_agg=loss_agg,
                       entropy_coef=entropy_coef)


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


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.float32)
    return ((x.detach() * m).sum() / m.sum().clamp_min(1.0))


def opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, *, mask,
             divergence="reverse_kl", beta=0.5, alpha=0.5, reward_scale=1.0, ref_logp=None, student_bias=None,
             teacher_bias=None, temperature=1.0, loss_agg="token-mean", backend="auto", group=None,
             vocab_start=None):
    """``onepass.opd_loss`` with vocabulary shards of the student and teacher heads; ``divergence`` is
    reverse_kl, forward_kl or sampled_reverse_kl (whose per-token loss −r·ratio is ``policy_loss`` with the
    detached reward r as per-token advantage and old_logp=None).  Gradients to the student only."""
    _check_loss_inputs(student_hidden, student_weight, targets, mask, student_bias, prefix="student_")
    if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != targets.shape:
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}; [B, T, D] with [B, T] = "
                         f"{tuple(targets.shape)} expected")
    _check_token_tensor("ref_logp", ref_logp, targets.shape)
    sampled = divergence == OPD_SAMPLED
    if sampled:
        if ref_logp is None and reward_scale != 1.0:
            raise ValueError("reward_scale != 1 (G-OPD / ExOPD) needs ref_logp, the reference log-probs")
        code = 0
    else:
        if divergence not in KIND_CODES:
            raise ValueError(f"divergence must be one of {tuple(KIND_CODES) + (OPD_SAMPLED,)}, got {divergence!r}")
        if reward_scale != 1.0 or ref_logp is not None:
            raise ValueError("reward_scale and ref_logp apply to divergence='sampled_reverse_kl' only")
        code = _kl_kind(divergence, beta, alpha, name="divergence")
    _check_pair(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                "teacher_", "student_")
    group, inv_temp, be = _prepare("opd_loss", backend, student_hidden, group, temperature)
    shape = targets.shape
    masked = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    out = _vocab_parallel_stats(_Head(student_hidden, student_weight, student_bias, group),
                                _Head(teacher_hidden, teacher_weight, teacher_bias, group, detach=True),
                                masked, shape, -100, inv_temp, code, True, False, be, group,
                                vocab_start)
    logp, q_logp = out["logp_a"].reshape(shape), out["logp_b"].reshape(shape)
    metrics = {"student_logp": _masked_mean(logp, mask), "teacher_logp": _masked_mean(q_logp, mask)}
    if sampled:
        if ref_logp is None:
            reward = q_logp - logp
        else:
            ref = ref_logp.to(logp.dtype)
            reward = float(reward_scale) * (q_logp - ref) - (logp - ref)
        loss, _ = policy_loss(logp, reward.detach(), mask=mask, loss_agg=loss_agg)
        metrics["reward"] = _masked_mean(reward, mask)
        metrics["reverse_kl_sampled"] = _masked_mean(logp - q_logp, mask)
    else:
        div = out["div"].reshape(shape)
        loss = (aggregation_weights(mask, loss_agg) * div).sum()
        metrics["divergence"] = _masked_mean(div, mask)
    return loss, metrics
