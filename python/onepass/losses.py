"""Fused policy losses: GRPO-family and on-policy distillation, from hidden states and LM heads.

Each loss is one per-token function of the vocabulary sweep's stats (``grpo_token_loss``,
``opd_token_loss``) plus its public wrapper, which validates once, builds the per-token inputs and
calls ``onepass._ops.fused_loss.linear_token_loss``: one sweep over the vocabulary (policy, plus the
reference or teacher LM head in the same loop) whose per-token gradients come from autograd on the
per-token function; on every backend the same function gives the loss.  [B, T, V] is never materialized.

Per-token inputs (advantages, old_logp, ref_logp) are constants of the loss: they receive no gradient,
and at masked positions (mask 0) they are replaced by 0 before use, so anything there (even NaN) is
excluded.  The loss is float32 (float64 for float64 hidden states).

Aggregation (``loss_agg``) follows verl's ``agg_loss``; sequences with no unmasked token are left out
of the sequence means (as verl does), and an all-masked batch gives loss 0:
- "token-mean": Σ m·ℓ / Σ m
- "seq-mean-token-sum": mean over sequences of Σ_t m·ℓ
- "seq-mean-token-mean": mean over sequences of (Σ_t m·ℓ / Σ_t m)
- "seq-mean-token-sum-norm": Σ_b Σ_t m·ℓ / (number of sequences) / T
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _dispatch, _validate
from ._contract import DIVERGENCES, Kind, VocabStats, kernel_kind
from ._ops.fused_loss import linear_token_loss
from .kl import check_estimator
from .policy_terms import (Aggregation, PolicyTerms, default_generator, sequence_weights_per_token, term_weights,
                           token_contributions)

RATIO_LOG_CLAMP = 20.0
OPD_SAMPLED = "sampled_reverse_kl"
#: The ignore_index given to masked positions of a loss's targets.
MASKED_TARGET = -100
_TERM_OPTIONS = tuple(f.name for f in dataclasses.fields(PolicyTerms))
_AGG_OPTIONS = tuple(f.name for f in dataclasses.fields(Aggregation))
#: The keyword options of ``grpo_loss`` / ``policy_loss`` (docs/loss_variants.md §1).
LOSS_OPTIONS = _TERM_OPTIONS + _AGG_OPTIONS


def loss_options(where: str, options: dict) -> tuple[PolicyTerms, Aggregation]:
    """The validated (terms, aggregation) of a policy loss's keyword options."""
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}; the loss options are {LOSS_OPTIONS}")
    terms = PolicyTerms(**{k: options[k] for k in _TERM_OPTIONS if k in options})
    return default_generator(terms), Aggregation(**{k: options[k] for k in _AGG_OPTIONS if k in options})


def aggregation_weights(mask: Tensor, loss_agg: str, **normalizers) -> Tensor:
    """w [B, T] float32 with loss = Σ w·ℓ for the given verl aggregation mode (``Aggregation``'s
    normalizers as keywords: num_tokens, num_sequences, horizon, empty_sequences, loss_scale)."""
    return Aggregation(loss_agg, **normalizers).weights(mask, loss_agg)


def _weighted_sum(w: Tensor, x: Tensor) -> Tensor:
    """Σ w·x over the positions with w ≠ 0 (whatever x holds elsewhere, even NaN)."""
    return torch.where(w != 0, w * x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    x = x.expand(mask.shape) if x.dim() == mask.dim() else x
    m = mask.to(x.dtype)
    return (_weighted_sum(m, x) / m.sum().clamp_min(1.0)).detach()


def _expand_per_sequence(x: Tensor, like: Tensor) -> Tensor:
    """[B] or [B, 1] per-sequence values (or [B, T] per-token ones) as [B, T]."""
    if x.dim() == 1:
        x = x[:, None]
    return x.expand(like.shape)


def _constants(mask: Tensor, **tensors):
    """The per-token inputs as constants: detached, 0 where mask is 0 (None stays None)."""
    keep = mask != 0
    return {k: None if x is None else torch.where(keep, x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))
            for k, x in tensors.items()}


class SequenceLayout:
    """Where the loss's rows sit in a padded [B, T] grid: the identity for padded [B, T] inputs; for packed
    sequences ([N] tokens, from ``cu_seqlens`` [S+1] or ``seq_ids`` [N]) the flat position s·T + t of each
    token (T = the longest sequence).  Sequence means, sequence ratios and selections are computed in the
    padded grid, the sweep on the rows; masked (padding) cells hold 0."""

    def __init__(self, flat_index: Optional[Tensor] = None, num_sequences: int = 0, length: int = 0):
        self.flat_index, self.shape = flat_index, (num_sequences, length)

    @property
    def packed(self) -> bool:
        return self.flat_index is not None

    def grid(self, x: Optional[Tensor]) -> Optional[Tensor]:
        """Rows [N, ...] → grid [S, T, ...] (0 in empty cells; differentiable)."""
        if x is None or not self.packed:
            return x
        out = x.new_zeros((self.shape[0] * self.shape[1],) + x.shape[1:])
        return out.index_put((self.flat_index,), x).view(*self.shape, *x.shape[1:])

    def rows(self, x: Optional[Tensor]) -> Optional[Tensor]:
        """Grid [S, T, ...] → rows [N, ...]."""
        if x is None or not self.packed:
            return x
        return x.reshape(-1, *x.shape[2:])[self.flat_index]


def sequence_layout(n_tokens: int, cu_seqlens=None, seq_ids=None) -> SequenceLayout:
    """The ``SequenceLayout`` of packed sequences of ``n_tokens`` tokens: ``cu_seqlens`` [S+1] int
    (0 = c_0 ≤ c_1 ≤ … ≤ c_S = N, sequence s is tokens c_s..c_{s+1}) or ``seq_ids`` [N] int ≥ 0 (the
    sequence of each token, in order within each sequence; S = max + 1); identity when both are None."""
    if cu_seqlens is not None and seq_ids is not None:
        raise ValueError("give packed sequences as cu_seqlens or as seq_ids, not both")
    if cu_seqlens is None and seq_ids is None:
        return SequenceLayout()
    name, ids = ("cu_seqlens", cu_seqlens) if cu_seqlens is not None else ("seq_ids", seq_ids)
    _validate.check_tensor(name, ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if cu_seqlens is not None:
        if ids.numel() < 2 or ids[0].item() != 0 or ids[-1].item() != n_tokens or bool((ids.diff() < 0).any()):
            raise ValueError(f"cu_seqlens must be [S+1] non-decreasing from 0 to the number of tokens {n_tokens}, "
                             f"got {ids.tolist() if ids.numel() <= 16 else tuple(ids.shape)}")
        lengths = ids.diff()
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths)
        position = torch.arange(n_tokens, device=ids.device) - ids[:-1][seq]
    else:
        if ids.numel() != n_tokens:
            raise ValueError(f"seq_ids must be [N] = [{n_tokens}] (one sequence id per token), got {tuple(ids.shape)}")
        if n_tokens and ids.min().item() < 0:
            raise ValueError("seq_ids must be ≥ 0")
        lengths = torch.bincount(ids, minlength=1)
        order = torch.argsort(ids, stable=True)
        starts = lengths.cumsum(0) - lengths
        position = torch.empty_like(ids)
        position[order] = torch.arange(n_tokens, device=ids.device) - starts[ids[order]]
        seq = ids
    length = max(int(lengths.max().item()) if lengths.numel() else 0, 1)
    return SequenceLayout(seq * length + position, lengths.numel(), length)


def _policy_loss(terms: PolicyTerms, aggregation: Aggregation, logp, advantages, mask, *, old_logp=None, kl=None,
                 ref_logp=None, entropy=None, token_weights=None, sampling_logp=None):
    """``policy_loss`` on validated [B, T] inputs (the constants already zeroed where mask is 0)."""
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    keep = mask != 0
    zero = torch.zeros((), dtype=dt, device=logp.device)
    logp, kl, entropy = (None if x is None else torch.where(keep, x.to(dt), zero) for x in (logp, kl, entropy))
    w_pg, w_kl, w_entropy = term_weights(terms, aggregation, mask, dt)
    c = token_contributions(terms, logp, entropy, advantages, w_pg=w_pg, w_kl=w_kl, w_entropy=w_entropy,
                            old_logp=old_logp, kl=kl, ref_logp=ref_logp, token_weights=token_weights,
                            sampling_logp=sampling_logp, mask=mask, aggregation=aggregation)
    old = logp.detach() if old_logp is None else old_logp.to(dt)
    metrics = {"pg_loss": c.pg.sum().detach(), "ppo_kl": _masked_mean(old - logp.detach(), mask),
               "ratio_mean": _masked_mean(torch.exp(c.log_ratio.detach()), mask)}
    metrics.update({k: _masked_mean(v.to(dt), mask) for k, v in c.indicators.items()})
    if c.kl is not None:
        metrics["kl"] = _masked_mean(c.kl.detach(), mask)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach(), mask)
    return c.per_token.sum(), metrics


def _check_per_sequence_or_token(name, x, n_seq, token_shape, *, required=False):
    if x is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    _validate.check_float(name, x)
    allowed = ((n_seq,), (n_seq, 1), tuple(token_shape))
    if tuple(x.shape) not in allowed:
        raise ValueError(f"{name} must be per sequence [{n_seq}] or per token {list(token_shape)}, "
                         f"got {tuple(x.shape)}")


def policy_loss(logp, advantages, *, mask, old_logp=None, ref_logp=None, kl=None, entropy=None, token_weights=None,
                sampling_logp=None, **options):
    """A policy loss from per-token quantities [B, T] (the part of ``grpo_loss`` after the vocabulary sweep;
    use it to combine one sweep's outputs with other terms, e.g. KDRL's teacher KL).

    loss = loss_scale · [ agg(ℓ_t · c_t) + β · agg_kl(kl_t · ρ_t) − entropy_coef · agg_H(H_t) ]

    ``logp`` [B, T] (differentiable), ``advantages`` [B] or [B, T], ``mask`` [B, T]; ``old_logp`` (None:
    on-policy), ``ref_logp`` (the KL is estimated from it) or ``kl`` (a given per-token KL, e.g. the exact
    one), ``entropy`` (needed by ``entropy_coef`` and ``top_entropy_quantile``), ``token_weights`` [B, T]
    or [B] (off-policy correction weights, e.g. ``onepass.corrections.rollout_is_weights``, multiplied
    onto the policy term only), ``sampling_logp`` [B, T] (TRL's off-policy mask; default old_logp).
    The options (``LOSS_OPTIONS``; docs/loss_variants.md, docs/api.md) are those of ``grpo_loss``:
    objective, ratio_level, log_ratio_clamp, epsilon_low/high, dual_clip, ratio_cap, sapo_tau_pos/neg,
    dro_beta, cov_fraction, cov_bounds, kl_cov_coef, vespo_params, generator, off_policy_threshold,
    top_entropy_quantile, beta, kl_estimator, kl_log_ratio_clamp, kl_value_clamp, kl_gradient,
    kl_ratio_weight, entropy_coef; loss_agg, kl_agg, entropy_agg, num_tokens, num_sequences, horizon,
    empty_sequences, loss_scale.  ``advantages``, ``old_logp`` etc. are constants (no gradient; ignored
    where mask is 0).  Returns (loss, metrics) with detached scalar metrics.
    """
    terms, aggregation = loss_options("policy_loss", options)
    _validate.check_float("logp", logp, min_dim=2)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    _check_mask(mask, logp.shape, "logp")
    b_ = logp.shape[0]
    _check_per_sequence_or_token("advantages", advantages, b_, logp.shape, required=True)
    _check_per_sequence_or_token("token_weights", token_weights, b_, logp.shape)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("kl", kl), ("entropy", entropy),
                    ("sampling_logp", sampling_logp)):
        _check_token_tensor(name, x, logp.shape, "logp")
    _check_policy_inputs(terms, kl is not None or ref_logp is not None, entropy is not None, sampling_logp,
                         old_logp)
    if kl is not None and ref_logp is not None:
        raise ValueError("give the KL either as kl or as ref_logp, not both")
    _validate.check_same_device(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                                kl=kl, entropy=entropy, token_weights=token_weights, sampling_logp=sampling_logp)
    on_grid = functools.partial(_per_sequence_or_token_on_grid, SequenceLayout(), logp.shape, mask)
    consts = _constants(mask, advantages=on_grid(advantages), old_logp=old_logp, ref_logp=ref_logp,
                        token_weights=on_grid(token_weights, terms), sampling_logp=sampling_logp)
    return _policy_loss(terms, aggregation, logp, consts["advantages"], mask, kl=kl, entropy=entropy,
                        **{k: consts[k] for k in ("old_logp", "ref_logp", "token_weights", "sampling_logp")})


def _check_policy_inputs(terms: PolicyTerms, has_kl: bool, has_entropy: bool, sampling_logp, old_logp) -> None:
    if terms.beta != 0.0 and not has_kl:
        raise ValueError(f"beta={terms.beta} needs a reference: ref_logp (or ref_hidden + ref_weight, or kl)")
    if terms.top_entropy_quantile < 1.0 and not has_entropy:
        raise ValueError("top_entropy_quantile < 1 needs the per-token entropy")
    if sampling_logp is not None and terms.off_policy_threshold is None:
        raise ValueError("sampling_logp is used by the off-policy mask only: give off_policy_threshold too")
    if terms.objective in ("dppo_tv", "dppo_kl", "dro", "vespo") and old_logp is None:
        raise ValueError(f"objective={terms.objective!r} needs old_logp")


def _check_mask(mask, shape, against: str) -> None:
    if mask is None:
        raise ValueError("mask [B, T] is required (1 for response tokens, 0 for prompt and padding)")
    _validate.check_tensor("mask", mask)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {against} has shape {tuple(shape)}")


def _check_token_tensor(name, t, shape, against="targets"):
    if t is None:
        return
    _validate.check_float(name, t, min_dim=0)
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {against} have shape {tuple(shape)}")


def _check_loss_inputs(hidden, weight, targets, mask, bias, prefix="", packed=False):
    """Validate one model's hidden states ([B, T, D]; packed: [N, D]), its head, targets and mask (the
    hidden's leading shape); returns V."""
    _, v = _validate.check_linear(prefix, hidden, weight, bias)
    want = "[N, D] (packed sequences)" if packed else "[B, T, D]"
    if hidden.dim() != (2 if packed else 3):
        raise ValueError(f"{prefix}hidden must be {want}, got shape {tuple(hidden.shape)}")
    if targets is None:  # opd_loss's full-vocabulary divergences
        _check_mask(mask, hidden.shape[:-1], f"{prefix}hidden")
        return v
    _validate.check_tensor("targets", targets)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but {prefix}hidden is {tuple(hidden.shape)}: "
                         f"targets must be {'[N]' if packed else '[B, T]'}")
    _check_mask(mask, targets.shape, "targets")
    return v


def masked_targets(targets, mask):
    """targets [B, T] with the masked positions (mask 0) set to ``MASKED_TARGET``."""
    return torch.where(mask != 0, targets, torch.full_like(targets, MASKED_TARGET))


def _loss_targets(targets, mask, v):
    """Kernel-form targets [B, T]: masked positions ignored (−1), the others validated in [0, V)."""
    return _validate.check_targets(masked_targets(targets, mask), targets.shape, v, MASKED_TARGET).view(targets.shape)


def grpo_token_loss(stats: VocabStats, advantages: Tensor, w_pg: Tensor, w_kl=None, w_entropy=None, old_logp=None,
                    ref_logp=None, token_weights=None, sampling_logp=None, *, terms: PolicyTerms,
                    aggregation: Aggregation, reference_in_sweep: bool, layout: SequenceLayout,
                    mask: Optional[Tensor] = None) -> Tensor:
    """Weighted per-token GRPO-family loss from the sweep's stats (policy = a, reference = b when
    ``reference_in_sweep``) and per-token inputs of the same leading shape: ``token_contributions``.  A
    loss that is not row-elementwise gets all the rows, which ``layout`` places in the padded grid with
    ``mask`` [B, T]."""
    grid = layout.grid
    stats = VocabStats(grid(stats.tensor))
    kl = stats.div if terms.kl_estimator == "full" else None
    ref = stats.logp_b if reference_in_sweep and kl is None else grid(ref_logp)
    c = token_contributions(terms, stats.logp_a, stats.entropy, grid(advantages), w_pg=grid(w_pg), w_kl=grid(w_kl),
                            w_entropy=grid(w_entropy), old_logp=grid(old_logp), kl=kl, ref_logp=ref,
                            token_weights=grid(token_weights), sampling_logp=grid(sampling_logp), mask=mask,
                            aggregation=aggregation)
    return layout.rows(c.per_token)


def check_grpo_inputs(hidden, weight, targets, advantages, *, mask, bias, old_logp, ref_logp, ref_hidden,
                      ref_weight, ref_bias, kl_estimator, beta, ref_divergence="reverse_kl", packed=False,
                      num_sequences=None) -> int:
    """The argument checks of ``grpo_loss`` (``grpo_setup``'s, so also ``onepass.distributed.grpo_loss``'s);
    returns the V of ``weight`` (the shard's rows for a vocabulary-parallel head; targets are range-checked by
    the caller).
    ``packed``: hidden [N, D], targets/mask [N], advantages [N] or [``num_sequences``]."""
    v = _check_loss_inputs(hidden, weight, targets, mask, bias, packed=packed)
    _validate.check_float("advantages", advantages)
    per_seq = num_sequences if packed else targets.shape[0]
    if advantages.shape not in ((per_seq,), tuple(targets.shape)):
        raise ValueError(f"advantages must be per sequence [{per_seq}] or per token {list(targets.shape)}, "
                         f"got {tuple(advantages.shape)}")
    _check_token_tensor("old_logp", old_logp, targets.shape)
    _check_token_tensor("ref_logp", ref_logp, targets.shape)
    two = ref_hidden is not None
    if two != (ref_weight is not None):
        raise ValueError("give the reference as both ref_hidden and ref_weight, or neither")
    if two:
        _validate.check_second_model("ref_", ref_hidden, ref_weight, ref_bias, "", hidden, v)
    if two and ref_logp is not None:
        raise ValueError("give the reference either as ref_logp or as ref_hidden + ref_weight, not both")
    if kl_estimator != "full":
        check_estimator(kl_estimator, "kl_estimator")
        if ref_divergence != "reverse_kl":
            raise ValueError(f"ref_divergence={ref_divergence!r} needs kl_estimator='full' (a full-vocabulary "
                             "penalty); the sampled estimators estimate the reverse KL")
    elif not two:
        raise ValueError("kl_estimator='full' needs the reference as ref_hidden + ref_weight")
    if beta != 0.0 and not two and ref_logp is None:
        raise ValueError(f"beta={beta} needs a reference: ref_logp or ref_hidden + ref_weight")
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask,
                                advantages=advantages, old_logp=old_logp, ref_logp=ref_logp, ref_hidden=ref_hidden,
                                ref_weight=ref_weight, ref_bias=ref_bias)
    return v


def _layout_of(hidden, cu_seqlens, seq_ids) -> SequenceLayout:
    """The layout of a loss's rows: packed when ``cu_seqlens`` or ``seq_ids`` is given (hidden [N, D])."""
    if cu_seqlens is None and seq_ids is None:
        return SequenceLayout()
    if cu_seqlens is not None and seq_ids is not None:
        raise ValueError("give packed sequences as cu_seqlens or as seq_ids, not both")
    _validate.check_float("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D] or [1, N, D] with cu_seqlens / seq_ids (packed sequences), got shape "
                         f"{tuple(hidden.shape)}")
    return sequence_layout(hidden.shape[0], cu_seqlens, seq_ids)


def _packed_hidden(hidden, layout_given):
    """[1, N, D] packed hidden states as [N, D] (others unchanged)."""
    if layout_given and isinstance(hidden, Tensor) and hidden.dim() == 3 and hidden.shape[0] == 1:
        return hidden[0]
    return hidden


def _per_sequence_or_token_on_grid(layout: SequenceLayout, token_shape, grid_mask, x, terms=None):
    """A per-token input (``token_shape``) or a per-sequence one ([S] or [S, 1]) as [S, T] on the grid;
    with ``terms``, per-sequence correction weights as ``sequence_weights_per_token``."""
    if x is None:
        return None
    if x.shape == token_shape:
        return layout.grid(x)
    return _expand_per_sequence(x, grid_mask) if terms is None else sequence_weights_per_token(terms, x, grid_mask)


def grpo_loss(hidden, weight, targets, advantages, *, mask, old_logp=None, ref_logp=None, ref_hidden=None,
              ref_weight=None, bias=None, ref_bias=None, temperature=1.0, ref_divergence="reverse_kl",
              ref_divergence_beta=0.5, ref_divergence_alpha=0.5, token_weights=None, sampling_logp=None,
              cu_seqlens=None, seq_ids=None, logit_softcap=None, logit_scale=1.0, ref_logit_softcap=None,
              ref_logit_scale=1.0, backend="auto", **options):
    """Fused GRPO / PPO-family policy loss from hidden states [B, T, D] and the LM-head weight [V, D].

    One sweep over the vocabulary gives per-token policy logp and entropy (and, with ``ref_hidden`` +
    ``ref_weight``, the reference logp and the exact KL(policy‖reference) from the same sweep); the loss is
    ``policy_loss`` of those stats with the same keyword ``options`` (objective, ratio_level, clip range,
    corrections, KL, entropy, aggregation and normalizers: docs/loss_variants.md, docs/api.md).
    ``advantages`` is [B] (per sequence) or [B, T]; ``mask`` [B, T]; ``kl_estimator`` (an option) is one of
    k1/kl, k2/mse, k3/low_var_kl, abs (with "+" variants) on sampled tokens, or "full" for the exact
    full-vocabulary penalty (needs the reference as hidden + weight), whose kind ``ref_divergence`` is
    any ``onepass.divergence`` kind with the policy as p and the reference as q (``ref_divergence_beta``
    for jsd, ``ref_divergence_alpha`` for alpha).  ``token_weights`` [B, T] or [B]: off-policy correction
    weights on the policy term; ``sampling_logp`` [B, T]: TRL's off-policy mask.  Masked positions (mask
    0) are excluded; targets there may be anything in [0, V) or −100.  ``logit_softcap``/``logit_scale``
    (policy) and ``ref_logit_softcap``/``ref_logit_scale`` (reference) map each model's logits to
    c·tanh(s·ℓ/c) before the temperature.

    Packed sequences: hidden [N, D] (or [1, N, D]) with ``cu_seqlens`` [S+1] or ``seq_ids`` [N];
    targets, mask and the per-token inputs [N]; advantages / token_weights [N] or [S].  Equal to the
    padded call on the same data (padded to the longest sequence: the default ``horizon``).

    A loss whose rows are independent (token-level ratio, elementwise objective, no sequence mask or
    entropy quantile) streams chunks of rows in one pass; otherwise the sweep's stats (O(N)) feed the loss,
    whose gradient goes back through the sweep's backward.  Never [B, T, V].

    Returns (loss scalar (float32; float64 for float64 inputs), metrics dict of detached scalars: pg_loss,
    ppo_kl, ratio_mean, the objective's clip fractions, entropy, and kl when a reference is given).
    """
    setup = grpo_setup("grpo_loss", hidden=hidden, weight=weight, targets=targets, advantages=advantages, mask=mask,
                       old_logp=old_logp, ref_logp=ref_logp, ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias,
                       ref_bias=ref_bias, temperature=temperature, ref_divergence=ref_divergence,
                       ref_divergence_beta=ref_divergence_beta, ref_divergence_alpha=ref_divergence_alpha,
                       token_weights=token_weights, sampling_logp=sampling_logp, cu_seqlens=cu_seqlens, seq_ids=seq_ids,
                       logit_softcap=logit_softcap, logit_scale=logit_scale, ref_logit_softcap=ref_logit_softcap,
                       ref_logit_scale=ref_logit_scale, backend=backend, options=options)
    loss, stats = linear_token_loss(setup.token_loss, torch.ones_like(setup.inputs["w_pg"]), setup.inputs,
                                    setup.hidden, weight, bias, setup.ref_hidden, ref_weight, ref_bias,
                                    targets=_loss_targets(targets, mask, setup.v), need_entropy=True,
                                    row_elementwise=setup.terms.row_elementwise, **setup.sweep)
    return loss, setup.metrics(stats)


#: ``grpo_loss``'s signature: ``onepass.distributed.grpo_loss`` binds its arguments against it (same keywords,
#: same defaults) and gives them to ``grpo_setup``.
GRPO_SIGNATURE = inspect.signature(grpo_loss)


@dataclasses.dataclass(frozen=True)
class GrpoSetup:
    """A validated ``grpo_loss`` call up to the vocabulary sweep (shared with ``onepass.distributed.grpo_loss``):
    ``hidden`` / ``ref_hidden`` (packed [1, N, D] as [N, D]), the sweep's keywords ``sweep`` (logit_map,
    backend, kind, beta, alpha of the full-vocabulary penalty), V = ``v`` of ``weight`` (a shard's rows for a
    vocabulary-parallel head), the per-token inputs ``inputs`` [rows] (constants, aggregation weights) and
    ``token_loss`` (``grpo_token_loss`` with the options): loss = Σ_rows token_loss(stats, **inputs)."""
    hidden: Tensor
    ref_hidden: Optional[Tensor]
    v: int
    terms: PolicyTerms
    aggregation: Aggregation
    layout: SequenceLayout
    grid_mask: Tensor
    consts: dict  # the per-token constants on the grid (None where not given)
    inputs: dict
    token_loss: Callable
    sweep: dict
    generator_state: Optional[Tensor]  # the objective's generator before the loss's draw

    def metrics(self, stats: VocabStats) -> dict:
        """The metrics of ``grpo_loss`` from the sweep's stats [rows] (detached; a random objective sees the
        same draw as the loss)."""
        terms, layout, consts = self.terms, self.layout, self.consts
        with torch.no_grad():
            if self.generator_state is not None:
                after = terms.generator.get_state()
                terms.generator.set_state(self.generator_state)
            grid_stats = VocabStats(layout.grid(stats.tensor))
            kl = grid_stats.div if terms.kl_estimator == "full" else None
            ref = grid_stats.logp_b if self.ref_hidden is not None and kl is None else consts["ref_logp"]
            _, metrics = _policy_loss(terms, self.aggregation, grid_stats.logp_a, consts["advantages"], self.grid_mask,
                                      old_logp=consts["old_logp"], kl=kl, ref_logp=ref, entropy=grid_stats.entropy,
                                      token_weights=consts["token_weights"], sampling_logp=consts["sampling_logp"])
            if self.generator_state is not None:
                terms.generator.set_state(after)
        return metrics


def grpo_setup(where: str, *, hidden, weight, targets, advantages, mask, old_logp, ref_logp, ref_hidden, ref_weight,
               bias, ref_bias, temperature, ref_divergence, ref_divergence_beta, ref_divergence_alpha, token_weights,
               sampling_logp, cu_seqlens, seq_ids, logit_softcap, logit_scale, ref_logit_softcap, ref_logit_scale,
               backend, options: dict) -> GrpoSetup:
    """Validate a ``grpo_loss`` call of the public function ``where`` (every argument of ``GRPO_SIGNATURE``,
    the loss options as the dict ``options``) and build its ``GrpoSetup``.  Targets are not range-checked here
    (the caller knows the vocabulary size)."""
    terms, aggregation = loss_options(where, options)
    layout_given = cu_seqlens is not None or seq_ids is not None
    hidden, ref_hidden = _packed_hidden(hidden, layout_given), _packed_hidden(ref_hidden, layout_given)
    layout = _layout_of(hidden, cu_seqlens, seq_ids)
    v = check_grpo_inputs(hidden, weight, targets, advantages, mask=mask, bias=bias, old_logp=old_logp,
                          ref_logp=ref_logp, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                          kl_estimator=terms.kl_estimator, beta=terms.beta, ref_divergence=ref_divergence,
                          packed=layout.packed, num_sequences=layout.shape[0])
    n_seq = layout.shape[0] if layout.packed else targets.shape[0]
    _check_per_sequence_or_token("token_weights", token_weights, n_seq, targets.shape)
    _check_token_tensor("sampling_logp", sampling_logp, targets.shape)
    two = ref_hidden is not None
    _check_policy_inputs(terms, two or ref_logp is not None, True, sampling_logp, old_logp)
    _validate.check_same_device(hidden=hidden, token_weights=token_weights, sampling_logp=sampling_logp,
                                cu_seqlens=cu_seqlens, seq_ids=seq_ids)
    kind, div_beta, div_alpha = (kernel_kind(ref_divergence, ref_divergence_beta, ref_divergence_alpha)
                                 if terms.kl_estimator == "full" else (Kind.NONE, 0.0, 0.0))
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale, ref_logit_softcap, ref_logit_scale, "ref_")
    be = _dispatch.resolve_backend(backend, hidden, "vocab_stats", where)

    # per-token constants and aggregation weights in the padded grid, then as the sweep's rows
    grid_mask = layout.grid(mask)
    on_grid = functools.partial(_per_sequence_or_token_on_grid, layout, targets.shape, grid_mask)
    consts = _constants(grid_mask, advantages=on_grid(advantages), old_logp=layout.grid(old_logp),
                        ref_logp=layout.grid(ref_logp), token_weights=on_grid(token_weights, terms),
                        sampling_logp=layout.grid(sampling_logp))
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w_pg, w_kl, w_entropy = term_weights(terms, aggregation, grid_mask, dt)
    inputs = dict(consts, w_pg=w_pg, w_kl=w_kl, w_entropy=w_entropy)
    inputs = {k: layout.rows(x) for k, x in inputs.items() if x is not None}
    rows_apart = terms.row_elementwise  # chunks of rows; else all rows, placed in the grid
    token_loss = functools.partial(grpo_token_loss, terms=terms, aggregation=aggregation, reference_in_sweep=two,
                                   layout=SequenceLayout() if rows_apart else layout,
                                   mask=None if rows_apart else grid_mask)
    return GrpoSetup(hidden=hidden, ref_hidden=ref_hidden, v=v, terms=terms, aggregation=aggregation, layout=layout,
                     grid_mask=grid_mask, consts=consts, inputs=inputs, token_loss=token_loss,
                     sweep=dict(logit_map=logit_map, backend=be, kind=kind, beta=div_beta, alpha=div_alpha),
                     generator_state=terms.generator.get_state() if terms.needs_generator_state() else None)


def _opd_reward(logp, teacher_logp, ref_logp, reward_scale):
    """G-OPD per-token reward λ(log q − log π_ref) − (log p − log π_ref) (log q − log p without π_ref)."""
    if ref_logp is None:
        return teacher_logp - logp
    ref = ref_logp.to(logp.dtype)
    return reward_scale * (teacher_logp - ref) - (logp - ref)


def opd_token_loss(stats: VocabStats, ref_logp=None, *, sampled=False, reward_scale=1.0) -> Tensor:
    """Per-token on-policy distillation loss ℓ [n] from the student (a) / teacher (b) sweep: the full
    divergence ``stats.div``, or (``sampled``) −r·ratio with the detached G-OPD reward r and
    ratio = exp(logp − sg(logp)), whose value is −r and whose gradient is −r ∇log p."""
    if not sampled:
        return stats.div
    logp = stats.logp_a
    reward = _opd_reward(logp, stats.logp_b, ref_logp, reward_scale)
    return -reward.detach() * torch.exp(logp - logp.detach())


def check_opd_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, *, mask, divergence,
                     beta, alpha, reward_scale, ref_logp, student_bias, teacher_bias,
                     packed=False) -> tuple[int, Kind, float, float]:
    """The argument checks of ``opd_loss`` (shared with ``onepass.distributed.opd_loss``); returns (V of
    ``student_weight``, the kernel's (kind, β, α): ``Kind.NONE`` for ``OPD_SAMPLED``)."""
    v = _check_loss_inputs(student_hidden, student_weight, targets, mask, student_bias, prefix="student_",
                           packed=packed)
    _validate.check_second_model("teacher_", teacher_hidden, teacher_weight, teacher_bias, "student_", student_hidden,
                                 v)
    _check_token_tensor("ref_logp", ref_logp, student_hidden.shape[:-1])
    if divergence == OPD_SAMPLED and targets is None:
        raise ValueError("targets=None: divergence='sampled_reverse_kl' needs targets, the sampled tokens [B, T] "
                         "(only the full-vocabulary divergences run without them)")
    if divergence == OPD_SAMPLED:
        if ref_logp is None and reward_scale != 1.0:
            raise ValueError("reward_scale != 1 (G-OPD / ExOPD) needs ref_logp, the reference log-probs")
        kind = Kind.NONE
    else:
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {tuple(DIVERGENCES) + (OPD_SAMPLED,)}, got {divergence!r}")
        if reward_scale != 1.0 or ref_logp is not None:
            raise ValueError("reward_scale and ref_logp apply to divergence='sampled_reverse_kl' only")
        kind, beta, alpha = kernel_kind(divergence, beta, alpha)
    _validate.check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                                student_bias=student_bias, teacher_hidden=teacher_hidden,
                                teacher_weight=teacher_weight, teacher_bias=teacher_bias, targets=targets, mask=mask,
                                ref_logp=ref_logp)
    return v, kind, beta, alpha


def opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None, *, mask,
             divergence="reverse_kl", beta=0.5, alpha=0.5, reward_scale=1.0, ref_logp=None, student_bias=None,
             teacher_bias=None, temperature=1.0, loss_agg="token-mean", cu_seqlens=None, seq_ids=None,
             logit_softcap=None, logit_scale=1.0, teacher_logit_softcap=None, teacher_logit_scale=1.0,
             backend="auto"):
    """On-policy distillation loss; student and teacher LM heads in one sweep over the vocabulary.

    - ``divergence`` a kind of ``onepass.divergence`` (forward_kl, reverse_kl, jsd, tv, hellinger, chi2,
      alpha with ``beta``/``alpha``): the full-vocabulary divergence per token, aggregated by
      ``loss_agg``; gradients to the student only.
    - ``divergence="sampled_reverse_kl"``: the sampled-token reward of OPD / G-OPD,
      r = λ(log q − log π_ref) − (log p − log π_ref) with λ = ``reward_scale`` and π_ref = ``ref_logp``
      (λ = 1 is plain OPD, λ > 1 ExOPD; without ``ref_logp``, r = log q − log p and λ must be 1), used
      as a detached per-token advantage: loss = agg(−r·ratio), ratio = exp(logp − sg(logp)), whose value
      is the mean −r (the sampled reverse KL for λ = 1) and whose gradient is −agg(r ∇log p).

    Shapes: student_hidden [B, T, Ds], student_weight [V, Ds], teacher_hidden [B, T, Dt], teacher_weight
    [V, Dt], targets (the sampled tokens) and mask [B, T].  ``targets=None`` is allowed for the
    full-vocabulary divergences (no sampled token is needed; the metrics then omit the log-probs).
    Packed sequences: hiddens [N, D] (or [1, N, D]) with ``cu_seqlens`` [S+1] or ``seq_ids`` [N], targets /
    mask / ref_logp [N]: the sequence means of ``loss_agg`` use the segments (equal to the padded call).
    ``logit_softcap``/``logit_scale`` (student) and ``teacher_logit_softcap``/``teacher_logit_scale`` map
    each model's logits to c·tanh(s·ℓ/c) before the temperature.  Returns (loss, metrics).
    """
    layout_given = cu_seqlens is not None or seq_ids is not None
    student_hidden = _packed_hidden(student_hidden, layout_given)
    teacher_hidden = _packed_hidden(teacher_hidden, layout_given)
    layout = _layout_of(student_hidden, cu_seqlens, seq_ids)
    v, kind, beta, alpha = check_opd_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                            mask=mask, divergence=divergence, beta=beta, alpha=alpha,
                                            reward_scale=reward_scale, ref_logp=ref_logp, student_bias=student_bias,
                                            teacher_bias=teacher_bias, packed=layout.packed)
    sampled = divergence == OPD_SAMPLED
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale, teacher_logit_softcap,
                                    teacher_logit_scale, "teacher_")
    w = layout.rows(aggregation_weights(layout.grid(mask), loss_agg))
    be = _dispatch.resolve_backend(backend, student_hidden, "vocab_stats", "opd_loss")
    inputs = {k: x for k, x in _constants(mask, ref_logp=ref_logp).items() if x is not None}
    token_loss = functools.partial(opd_token_loss, sampled=sampled, reward_scale=float(reward_scale))
    loss, stats = linear_token_loss(token_loss, w, inputs, student_hidden, student_weight, student_bias,
                                    teacher_hidden, teacher_weight, teacher_bias,
                                    targets=opd_kernel_targets(targets, mask, v), logit_map=logit_map, backend=be,
                                    kind=kind, beta=beta, alpha=alpha)
    return loss, opd_metrics(stats, mask, inputs.get("ref_logp"), sampled=sampled, reward_scale=float(reward_scale),
                             with_logp=targets is not None)


def opd_kernel_targets(targets, mask, v):
    """Kernel-form targets [B, T] of ``opd_loss``: those of the sampled tokens, or without them (``None``)
    0 at the unmasked positions (a placeholder the full divergences do not use) and −1 at the masked ones,
    so that masked rows are still skipped."""
    if targets is None:
        return torch.where(mask != 0, 0, -1).to(torch.int64)
    return _loss_targets(targets, mask, v)


def opd_metrics(stats: VocabStats, mask, ref_logp=None, *, sampled, reward_scale, with_logp=True) -> dict:
    """``opd_loss``'s metrics (detached masked means) from the student (a) / teacher (b) stats [B, T];
    without targets (``with_logp=False``) no log-probs."""
    metrics = {}
    if with_logp:
        metrics = {"student_logp": _masked_mean(stats.logp_a, mask), "teacher_logp": _masked_mean(stats.logp_b, mask)}
    if sampled:
        reward = _opd_reward(stats.logp_a, stats.logp_b, ref_logp, reward_scale)
        metrics["reward"] = _masked_mean(reward, mask)
        metrics["reverse_kl_sampled"] = _masked_mean(stats.logp_a - stats.logp_b, mask)
    else:
        metrics["divergence"] = _masked_mean(stats.div, mask)
    return metrics
