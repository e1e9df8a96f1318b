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

import functools

import torch
from torch import Tensor

from . import _dispatch, _validate
from ._contract import DIVERGENCES, Kind, VocabStats, kernel_kind
from ._ops.fused_loss import linear_token_loss
from .kl import check_estimator, kl_estimate

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LOG_CLAMP = 20.0
OPD_SAMPLED = "sampled_reverse_kl"
#: The ignore_index given to masked positions of a loss's targets.
MASKED_TARGET = -100


def aggregation_weights(mask: Tensor, loss_agg: str) -> Tensor:
    """w [B, T] float32 with loss = Σ w·ℓ for the given verl aggregation mode."""
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    m = mask.to(torch.float32)
    if loss_agg == "token-mean":
        return m / m.sum().clamp_min(1.0)
    per_seq = m.sum(-1, keepdim=True)
    n_seq = (per_seq > 0).sum().clamp_min(1).to(torch.float32)
    if loss_agg == "seq-mean-token-sum":
        return m / n_seq
    if loss_agg == "seq-mean-token-sum-norm":
        return m / (n_seq * m.shape[-1])
    return m / (per_seq.clamp_min(1.0) * n_seq)


def _weighted_sum(w: Tensor, x: Tensor) -> Tensor:
    """Σ w·x over the positions with w ≠ 0 (whatever x holds elsewhere, even NaN)."""
    return torch.where(w != 0, w * x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (_weighted_sum(m, x) / m.sum().clamp_min(1.0)).detach()


def _expand_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.to(torch.float32).expand_as(like)


def _constants(mask: Tensor, **tensors):
    """The per-token inputs as constants: detached, 0 where mask is 0 (None stays None)."""
    keep = mask != 0
    return {k: None if x is None else torch.where(keep, x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))
            for k, x in tensors.items()}


def policy_token_terms(logp, advantages, old_logp=None, kl=None, entropy=None, *, beta=0.0, epsilon_low=0.2,
                       epsilon_high=0.2, dual_clip=None, entropy_coef=0.0):
    """Per-token PPO-clip terms (any shape, elementwise): returns (ℓ, pg, parts for the metrics).

    ratio r = exp(clamp(logp − old_logp, ±20)) (old_logp=None: r = 1 with the gradient of logp);
    pg = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), with ``dual_clip`` c: min(pg, −A·c) where A < 0;
    ℓ = pg + β·kl − entropy_coef·entropy."""
    adv = advantages
    if old_logp is None:
        log_ratio = logp - logp.detach()
    else:
        log_ratio = (logp - old_logp.to(logp.dtype)).clamp(-RATIO_LOG_CLAMP, RATIO_LOG_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = torch.maximum(pg1, pg2)
    dual = None
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual = (pg > pg3) & (adv < 0)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    per_token = pg
    if kl is not None and beta != 0.0:
        per_token = per_token + beta * kl
    if entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy
    return per_token, pg, dict(log_ratio=log_ratio, ratio=ratio, clipped=pg2 > pg1, dual=dual)


def policy_loss(logp, advantages, *, mask, old_logp=None, kl=None, entropy=None, beta=0.0, epsilon_low=0.2,
                epsilon_high=0.2, dual_clip=None, loss_agg="token-mean", entropy_coef=0.0):
    """Clipped policy-gradient loss from per-token quantities [B, T] (the part of ``grpo_loss`` after the
    vocabulary sweep; use it to combine one sweep's outputs with other terms, e.g. KDRL's teacher KL).

    ratio r = exp(clamp(logp − old_logp, ±20)) (old_logp=None: on-policy, r = 1 with the gradient of
    logp); ℓ = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), with ``dual_clip`` c: ℓ = min(ℓ, −A·c) where
    A < 0; plus β·kl − entropy_coef·entropy.  Returns (loss, metrics) with detached scalar metrics.
    ``advantages`` and ``old_logp`` are constants (no gradient; ignored where mask is 0).
    """
    _check_mask(mask, logp.shape, "logp")
    consts = _constants(mask, advantages=_expand_advantages(advantages, logp), old_logp=old_logp)
    adv, old_logp = consts["advantages"], consts["old_logp"]
    per_token, pg, parts = policy_token_terms(logp, adv, old_logp, kl, entropy, beta=beta, epsilon_low=epsilon_low,
                                              epsilon_high=epsilon_high, dual_clip=dual_clip,
                                              entropy_coef=entropy_coef)
    w = aggregation_weights(mask, loss_agg)
    loss = _weighted_sum(w, per_token)
    ratio = parts["ratio"]
    metrics = {
        "pg_loss": _weighted_sum(w, pg).detach(),
        "clip_frac": _masked_mean(parts["clipped"].float(), mask),
        "clip_frac_low": _masked_mean(((ratio < 1.0 - epsilon_low) & (adv < 0)).float(), mask),
        "clip_frac_high": _masked_mean(((ratio > 1.0 + epsilon_high) & (adv > 0)).float(), mask),
        "ratio_mean": _masked_mean(ratio, mask),
        "ppo_kl": _masked_mean(-parts["log_ratio"], mask),
    }
    if parts["dual"] is not None:
        metrics["dual_clip_frac"] = _masked_mean(parts["dual"].float(), mask)
    if kl is not None:
        metrics["kl"] = _masked_mean(kl, mask)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask)
    return loss, metrics


def _check_mask(mask, shape, against: str) -> None:
    if mask is None:
        raise ValueError("mask [B, T] is required (1 for response tokens, 0 for prompt and padding)")
    _validate.check_tensor("mask", mask)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {against} has shape {tuple(shape)}")


def _check_token_tensor(name, t, shape):
    if t is None:
        return
    _validate.check_float(name, t, min_dim=0)
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but targets have shape {tuple(shape)}")


def _check_loss_inputs(hidden, weight, targets, mask, bias, prefix=""):
    """Validate one model's [B, T, D] hidden states, its head, targets [B, T] and mask [B, T]; returns V."""
    _, v = _validate.check_linear(prefix, hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"{prefix}hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if targets is None:  # opd_loss's full-vocabulary divergences
        _check_mask(mask, hidden.shape[:2], f"{prefix}hidden")
        return v
    _validate.check_tensor("targets", targets)
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but {prefix}hidden is {tuple(hidden.shape)}: "
                         "targets must be [B, T]")
    _check_mask(mask, targets.shape, "targets")
    return v


def masked_targets(targets, mask):
    """targets [B, T] with the masked positions (mask 0) set to ``MASKED_TARGET``."""
    return torch.where(mask != 0, targets, torch.full_like(targets, MASKED_TARGET))


def _loss_targets(targets, mask, v):
    """Kernel-form targets [B, T]: masked positions ignored (−1), the others validated in [0, V)."""
    return _validate.check_targets(masked_targets(targets, mask), targets.shape, v, MASKED_TARGET).view(targets.shape)


def token_kl(stats: VocabStats, ref_logp, kl_estimator: str, reference_in_sweep: bool):
    """Per-token KL to the reference: the sweep's exact KL ("full"), or an estimator on the sampled token
    with the reference log-probs of the sweep or given; None without a reference."""
    if kl_estimator == "full":
        return stats.div
    ref = stats.logp_b if reference_in_sweep else ref_logp
    return None if ref is None else kl_estimate(stats.logp_a, ref, kl_estimator)


def grpo_token_loss(stats: VocabStats, advantages: Tensor, old_logp=None, ref_logp=None, *, kl_estimator="k3",
                    reference_in_sweep=False, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=None,
                    entropy_coef=0.0) -> Tensor:
    """Per-token GRPO loss ℓ [n] from the sweep's stats (policy = a, reference = b when
    ``reference_in_sweep``) and per-token advantages / old_logp / ref_logp [n]: ``policy_token_terms``
    with the KL of ``kl_estimator``."""
    kl = token_kl(stats, ref_logp, kl_estimator, reference_in_sweep)
    return policy_token_terms(stats.logp_a, advantages, old_logp, kl, stats.entropy, beta=beta,
                              epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip,
                              entropy_coef=entropy_coef)[0]


def check_grpo_inputs(hidden, weight, targets, advantages, *, mask, bias, old_logp, ref_logp, ref_hidden,
                      ref_weight, ref_bias, kl_estimator, beta, ref_divergence="reverse_kl") -> int:
    """The argument checks of ``grpo_loss`` (shared with ``onepass.distributed.grpo_loss``); returns the V of
    ``weight`` (the shard's rows for a vocabulary-parallel head; targets are range-checked by the caller)."""
    v = _check_loss_inputs(hidden, weight, targets, mask, bias)
    b_, t_ = targets.shape
    _validate.check_float("advantages", advantages)
    if advantages.shape not in ((b_,), (b_, t_)):
        raise ValueError(f"advantages must be [B]=[{b_}] or [B, T]=[{b_}, {t_}], got {tuple(advantages.shape)}")
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


def grpo_loss(hidden, weight, targets, advantages, *, mask, old_logp=None, ref_logp=None, ref_hidden=None,
              ref_weight=None, bias=None, ref_bias=None, temperature=1.0, beta=0.0, kl_estimator="k3",
              ref_divergence="reverse_kl", ref_divergence_beta=0.5, ref_divergence_alpha=0.5,
              epsilon_low=0.2, epsilon_high=0.2, dual_clip=None, loss_agg="token-mean", entropy_coef=0.0,
              logit_softcap=None, logit_scale=1.0, ref_logit_softcap=None, ref_logit_scale=1.0, backend="auto"):
    """Fused GRPO / PPO-clip loss from hidden states [B, T, D] and the LM-head weight [V, D].

    One sweep over the vocabulary gives per-token policy logp and entropy (and, with ``ref_hidden`` +
    ``ref_weight``, the reference logp and the exact KL(policy‖reference) from the same sweep); the
    backward recomputes the tiles once.  ``advantages`` is [B] (per sequence) or [B, T]; ``mask`` [B, T];
    ``kl_estimator`` is one of k1, k2, k3, abs (with "+" variants) on sampled tokens, or "full" for the
    exact full-vocabulary KL (needs the reference as hidden + weight).  With "full", ``ref_divergence``
    names the penalty D(policy, reference): any ``onepass.divergence`` kind with the policy as the
    student p and the reference as q (reverse_kl KL(p‖q) by default; forward_kl, jsd with
    ``ref_divergence_beta``, tv, hellinger, chi2, alpha with ``ref_divergence_alpha``), computed in the
    same sweep as the policy's log-probs.  Masked positions (mask 0) are excluded; targets there may be
    anything in [0, V) or −100.  ``logit_softcap``/``logit_scale`` (policy) and ``ref_logit_softcap``/
    ``ref_logit_scale`` (reference) map each model's logits to c·tanh(s·ℓ/c) before the temperature.

    Returns (loss scalar (float32; float64 for float64 inputs), metrics dict of detached scalars: pg_loss, clip_frac, clip_frac_low,
    clip_frac_high, ratio_mean, ppo_kl, entropy, and kl when β ≠ 0 or a reference is given).
    """
    v = check_grpo_inputs(hidden, weight, targets, advantages, mask=mask, bias=bias, old_logp=old_logp,
                          ref_logp=ref_logp, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                          kl_estimator=kl_estimator, beta=beta, ref_divergence=ref_divergence)
    kind, div_beta, div_alpha = (kernel_kind(ref_divergence, ref_divergence_beta, ref_divergence_alpha)
                                 if kl_estimator == "full" else (Kind.NONE, 0.0, 0.0))
    two = ref_hidden is not None
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale, ref_logit_softcap, ref_logit_scale, "ref_")
    w = aggregation_weights(mask, loss_agg)
    be = _dispatch.resolve_backend(backend, hidden, "vocab_stats", "grpo_loss")
    inputs = _constants(mask, advantages=_expand_advantages(advantages, w), old_logp=old_logp, ref_logp=ref_logp)
    inputs = {k: x for k, x in inputs.items() if x is not None}
    terms = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip,
                 entropy_coef=entropy_coef)
    token_loss = functools.partial(grpo_token_loss, kl_estimator=kl_estimator, reference_in_sweep=two, **terms)
    loss, stats = linear_token_loss(token_loss, w, inputs, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                    targets=_loss_targets(targets, mask, v), logit_map=logit_map, backend=be,
                                    kind=kind, beta=div_beta, alpha=div_alpha, need_entropy=True)
    with torch.no_grad():
        kl = token_kl(stats, inputs.get("ref_logp"), kl_estimator, two)
        _, metrics = policy_loss(stats.logp_a, inputs["advantages"], mask=mask, old_logp=inputs.get("old_logp"),
                                 kl=kl, entropy=stats.entropy, loss_agg=loss_agg, **terms)
    return loss, metrics


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
                     beta, alpha, reward_scale, ref_logp, student_bias, teacher_bias) -> tuple[int, Kind, float, float]:
    """The argument checks of ``opd_loss`` (shared with ``onepass.distributed.opd_loss``); returns (V of
    ``student_weight``, the kernel's (kind, β, α): ``Kind.NONE`` for ``OPD_SAMPLED``)."""
    v = _check_loss_inputs(student_hidden, student_weight, targets, mask, student_bias, prefix="student_")
    _validate.check_second_model("teacher_", teacher_hidden, teacher_weight, teacher_bias, "student_", student_hidden,
                                 v)
    _check_token_tensor("ref_logp", ref_logp, student_hidden.shape[:2])
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
             teacher_bias=None, temperature=1.0, loss_agg="token-mean", logit_softcap=None, logit_scale=1.0,
             teacher_logit_softcap=None, teacher_logit_scale=1.0, backend="auto"):
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
    ``logit_softcap``/``logit_scale`` (student) and ``teacher_logit_softcap``/``teacher_logit_scale`` map
    each model's logits to c·tanh(s·ℓ/c) before the temperature.  Returns (loss, metrics).
    """
    v, kind, beta, alpha = check_opd_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                            mask=mask, divergence=divergence, beta=beta, alpha=alpha,
                                            reward_scale=reward_scale, ref_logp=ref_logp, student_bias=student_bias,
                                            teacher_bias=teacher_bias)
    sampled = divergence == OPD_SAMPLED
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale, teacher_logit_softcap,
                                    teacher_logit_scale, "teacher_")
    w = aggregation_weights(mask, loss_agg)
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
