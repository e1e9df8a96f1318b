"""Fused policy losses: GRPO-family and on-policy distillation, from hidden states and LM heads.

The vocabulary work is one ``onepass::linear_vocab_stats`` sweep (policy, plus the reference or teacher
LM head in the same loop) and, in the backward, one recompute sweep; everything else is per-token
arithmetic on [B, T] tensors, differentiated by autograd into the sweep's per-token gradients.
[B, T, V] is never materialized.

Aggregation (``loss_agg``) follows verl's ``agg_loss``; sequences with no unmasked token are left out
of the sequence means (as verl does), and an all-masked batch gives loss 0:
- "token-mean": Σ m·ℓ / Σ m
- "seq-mean-token-sum": mean over sequences of Σ_t m·ℓ
- "seq-mean-token-mean": mean over sequences of (Σ_t m·ℓ / Σ_t m)
- "seq-mean-token-sum-norm": Σ_b Σ_t m·ℓ / (number of sequences) / T
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ops, _public, _validate
from .divergence import KIND_CODES, kernel_kind
from .kl import kl_penalty, linear_policy_ref_stats
from .logprobs import linear_token_logprobs
from .reference import vocab as ref

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LOG_CLAMP = 20.0


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


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return ((x * m).sum() / m.sum().clamp_min(1.0)).detach()


def _policy_terms(logp, adv, old_logp, kl, entropy, beta, epsilon_low, epsilon_high, dual_clip, entropy_coef):
    """Per-token PPO-clip terms (any shape, elementwise): returns (ℓ, pg, parts for the metrics)."""
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


def _expand_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.to(torch.float32).expand_as(like)


def policy_loss(logp, advantages, *, mask, old_logp=None, kl=None, entropy=None, beta=0.0, epsilon_low=0.2,
                epsilon_high=0.2, dual_clip=None, loss_agg="token-mean", entropy_coef=0.0):
    """Clipped policy-gradient loss from per-token quantities [B, T] (the part of ``grpo_loss`` after the
    vocabulary sweep; use it to combine one sweep's outputs with other terms, e.g. KDRL's teacher KL).

    ratio r = exp(clamp(logp − old_logp, ±20)) (old_logp=None: on-policy, r = 1 with the gradient of
    logp); ℓ = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), with ``dual_clip`` c: ℓ = min(ℓ, −A·c) where
    A < 0; plus β·kl − entropy_coef·entropy.  Returns (loss, metrics) with detached scalar metrics.
    """
    adv = _expand_advantages(advantages, logp)
    per_token, pg, parts = _policy_terms(logp, adv, old_logp, kl, entropy, beta, epsilon_low, epsilon_high,
                                         dual_clip, entropy_coef)
    w = aggregation_weights(mask, loss_agg)
    loss = (w * per_token).sum()
    ratio = parts["ratio"]
    metrics = {
        "pg_loss": (w * pg).sum().detach(),
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


def _check_token_tensor(name, t, shape):
    if t is None:
        return
    _validate.check_float(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but targets have shape {tuple(shape)}")


def _check_loss_inputs(hidden, weight, targets, mask, bias, prefix=""):
    d, v = _public.check_linear(prefix, hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"{prefix}hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but {prefix}hidden is {tuple(hidden.shape)}: "
                         "targets must be [B, T]")
    if mask is None:
        raise ValueError("mask [B, T] is required (1 for response tokens, 0 for prompt and padding)")
    if mask.shape != targets.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but targets have shape {tuple(targets.shape)}")
    return d, v


def check_grpo_inputs(hidden, weight, targets, advantages, mask, bias, old_logp, ref_logp, ref_hidden, ref_weight,
                      kl_estimator, beta):
    """The argument checks of ``grpo_loss`` (also used by ``onepass.distributed.grpo_loss``)."""
    _check_loss_inputs(hidden, weight, targets, mask, bias)
    b_, t_ = targets.shape
    if advantages.shape not in ((b_,), (b_, t_)):
        raise ValueError(f"advantages must be [B]=[{b_}] or [B, T]=[{b_}, {t_}], got {tuple(advantages.shape)}")
    _check_token_tensor("old_logp", old_logp, targets.shape)
    _check_token_tensor("ref_logp", ref_logp, targets.shape)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("give the reference as both ref_hidden and ref_weight, or neither")
    if ref_hidden is not None and ref_logp is not None:
        raise ValueError("give the reference either as ref_logp or as ref_hidden + ref_weight, not both")
    if kl_estimator == "full" and ref_hidden is None:
        raise ValueError("kl_estimator='full' needs the reference as ref_hidden + ref_weight")
    if beta != 0.0 and ref_hidden is None and ref_logp is None:
        raise ValueError(f"beta={beta} needs a reference: ref_logp or ref_hidden + ref_weight")


def grpo_loss(hidden, weight, targets, advantages, *, mask, old_logp=None, ref_logp=None, ref_hidden=None,
              ref_weight=None, bias=None, ref_bias=None, temperature=1.0, beta=0.0, kl_estimator="k3",
              epsilon_low=0.2, epsilon_high=0.2, dual_clip=None, loss_agg="token-mean", entropy_coef=0.0,
              backend="auto"):
    """Fused GRPO / PPO-clip loss from hidden states [B, T, D] and the LM-head weight [V, D].

    One sweep over the vocabulary gives per-token policy logp and entropy (and, with ``ref_hidden`` +
    ``ref_weight``, the reference logp and the exact KL(policy‖reference) from the same sweep); the
    backward recomputes the tiles once.  ``advantages`` is [B] (per sequence) or [B, T]; ``mask`` [B, T];
    ``kl_estimator`` is one of k1, k2, k3, abs (with "+" variants) on sampled tokens, or "full" for the
    exact full-vocabulary KL (needs the reference as hidden + weight).  Masked positions (mask 0) are
    excluded; targets there may be anything in [0, V) or −100.

    Returns (loss scalar fp32, metrics dict of detached scalars: pg_loss, clip_frac, clip_frac_low,
    clip_frac_high, ratio_mean, ppo_kl, entropy, and kl when β ≠ 0 or a reference is given).
    """
    check_grpo_inputs(hidden, weight, targets, advantages, mask, bias, old_logp, ref_logp, ref_hidden, ref_weight,
                      kl_estimator, beta)
    T = _validate.check_temperature(temperature)
    _validate.check_same_device(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=advantages,
                                ref_hidden=ref_hidden, ref_weight=ref_weight)
    tk = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    be = _public.pick_backend(backend, hidden, "grpo_loss", _public.LINEAR_BACKENDS)
    terms = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip,
                 entropy_coef=entropy_coef)
    if be in ("cpu", "cuda") and _eager_gradients(hidden, weight, bias):
        return _grpo_one_pass(be, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tk, advantages, mask,
                              old_logp, ref_logp, T, kl_estimator, loss_agg, terms)
    if ref_hidden is not None:
        stats = linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, tk, bias=bias, ref_bias=ref_bias,
                                        temperature=T, backend=be)
        logp, ent, ref_lp, kl_full = stats["logp"], stats["entropy"], stats["ref_logp"], stats["kl_full"]
    else:
        logp, ent = linear_token_logprobs(hidden, weight, tk, bias=bias, temperature=T, return_entropy=True,
                                          backend=be)
        ref_lp, kl_full = ref_logp, None
    kl = None
    if kl_estimator == "full":
        kl = kl_full
    elif ref_lp is not None:
        kl = kl_penalty(logp, ref_lp, estimator=kl_estimator)
    return policy_loss(logp, advantages, mask=mask, old_logp=old_logp, kl=kl, entropy=ent, loss_agg=loss_agg,
                       **terms)


def _eager_gradients(*tensors) -> bool:
    """Whether a fused loss computes its gradients in the forward (chunked backends, eager autograd)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in tensors))


def _one_pass(be, hidden, weight, bias, hidden_b, weight_b, bias_b, targets, inv_temp, kind, beta, alpha,
              need_entropy, token_loss):
    """A loss Σ token_loss(stats chunk) on the chunked backends, forward and backward in the same pass:
    each chunk's logits are computed once (three matrix products per chunk for the trained model, one for
    the frozen second model — as many as the naive loss — instead of a separate recompute backward).
    The second model (reference / teacher) never receives gradient.  Returns (loss, stats [N, 8])."""
    detach = lambda x: x.detach().contiguous() if x is not None else None  # noqa: E731
    args = (_public.rows(hidden, hidden.shape[-1]), weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            _public.rows(hidden_b.detach(), hidden_b.shape[-1]) if hidden_b is not None else None,
            detach(weight_b), detach(bias_b))
    run = lambda needs: _ops.linear_fused_loss_chunked(  # noqa: E731
        be, *args, targets, inv_temp, kind, beta, alpha, need_entropy, token_loss, needs)
    return _ops.FusedLinearLoss.apply(*args, run)


def _grpo_one_pass(be, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tk, advantages, mask, old_logp,
                   ref_logp, T, kl_estimator, loss_agg, terms):
    """grpo_loss on the chunked backends with forward and backward in the same pass (``_one_pass``)."""
    v = weight.shape[0]
    shape = tk.shape
    flat = lambda x: x.reshape(-1) if x is not None else None  # noqa: E731
    w_tok = flat(aggregation_weights(mask, loss_agg))
    adv = flat(_expand_advantages(advantages, w_tok.view(shape)))
    old, ref_lp_in = flat(old_logp), flat(ref_logp)
    two = ref_hidden is not None
    targets = _public.kernel_targets(tk, shape, v, -100)

    def token_kl(st, s, e):
        if kl_estimator == "full":
            return st[:, _ops.STAT_DIV]
        ref = st[:, _ops.STAT_LOGP_B] if two else (ref_lp_in[s:e] if ref_lp_in is not None else None)
        return None if ref is None else kl_penalty(st[:, _ops.STAT_LOGP_A], ref, estimator=kl_estimator)

    def token_loss(st, s, e):
        per_token, _, _ = _policy_terms(st[:, _ops.STAT_LOGP_A], adv[s:e], old[s:e] if old is not None else None,
                                        token_kl(st, s, e), st[:, _ops.STAT_ENTROPY], **terms)
        return (w_tok[s:e] * per_token).sum()

    loss, stats = _one_pass(be, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, 1.0 / T,
                            1 if two else 0, 0.0, 0.0, True, token_loss)
    st = stats.view(*shape, 8)
    kl = None
    if kl_estimator == "full":
        kl = st[..., _ops.STAT_DIV]
    elif two or ref_logp is not None:
        kl = kl_penalty(st[..., _ops.STAT_LOGP_A], st[..., _ops.STAT_LOGP_B] if two else ref_logp,
                        estimator=kl_estimator)
    with torch.no_grad():
        _, metrics = policy_loss(st[..., _ops.STAT_LOGP_A], advantages, mask=mask, old_logp=old_logp, kl=kl,
                                 entropy=st[..., _ops.STAT_ENTROPY], loss_agg=loss_agg, **terms)
    return loss, metrics


OPD_SAMPLED = "sampled_reverse_kl"


def opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, *, mask,
             divergence="reverse_kl", beta=0.5, alpha=0.5, reward_scale=1.0, ref_logp=None, student_bias=None,
             teacher_bias=None, temperature=1.0, loss_agg="token-mean", backend="auto"):
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
    [V, Dt], targets (the sampled tokens) and mask [B, T].  Returns (loss, metrics).
    """
    ds, v = _check_loss_inputs(student_hidden, student_weight, targets, mask, student_bias, prefix="student_")
    dt, vt = _public.check_linear("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    if vt != v:
        raise ValueError(f"teacher_weight has V={vt} but student_weight has V={v}")
    if teacher_hidden.shape[:2] != targets.shape:
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}; [B, T, D] with [B, T] = "
                         f"{tuple(targets.shape)} expected")
    _check_token_tensor("ref_logp", ref_logp, targets.shape)
    sampled = divergence == OPD_SAMPLED
    if sampled:
        code = 0
        if ref_logp is None and reward_scale != 1.0:
            raise ValueError("reward_scale != 1 (G-OPD / ExOPD) needs ref_logp, the reference log-probs")
    else:
        if divergence not in KIND_CODES:
            raise ValueError(f"divergence must be one of {tuple(KIND_CODES) + (OPD_SAMPLED,)}, got {divergence!r}")
        if reward_scale != 1.0 or ref_logp is not None:
            raise ValueError("reward_scale and ref_logp apply to divergence='sampled_reverse_kl' only")
        code, beta, alpha = kernel_kind(divergence, beta, alpha)
    T = _validate.check_temperature(temperature)
    _validate.check_same_dtype(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    _validate.check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, targets=targets,
                                mask=mask)
    tk = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    tk_k = _public.kernel_targets(tk, targets.shape, v, -100)
    be = _public.pick_backend(backend, student_hidden, "opd_loss", _public.LINEAR_BACKENDS)
    w = aggregation_weights(mask, loss_agg)
    if sampled:
        lam = float(reward_scale)
        r_lp = ref_logp.reshape(-1) if ref_logp is not None else None

        def token_terms(logp, q_logp, s, e):
            """Per-token −r·ratio with the detached G-OPD reward r."""
            if r_lp is None:
                reward = q_logp - logp
            else:
                ref_s = r_lp[s:e].to(logp.dtype)
                reward = lam * (q_logp - ref_s) - (logp - ref_s)
            return -reward.detach() * torch.exp(logp - logp.detach())
    if be in ("cpu", "cuda") and _eager_gradients(student_hidden, student_weight, student_bias):
        w_flat = w.reshape(-1)

        def token_loss(st, s, e):
            if sampled:
                per_token = token_terms(st[:, _ops.STAT_LOGP_A], st[:, _ops.STAT_LOGP_B], s, e)
            else:
                per_token = st[:, _ops.STAT_DIV]
            return (w_flat[s:e] * per_token).sum()

        loss, stats = _one_pass(be, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, tk_k, 1.0 / T, code, beta, alpha, False, token_loss)
        st = stats.view(*targets.shape, 8)
        logp, q_logp, div = st[..., _ops.STAT_LOGP_A], st[..., _ops.STAT_LOGP_B], st[..., _ops.STAT_DIV]
        return loss, _opd_metrics(logp, q_logp, div, mask, sampled, token_terms if sampled else None)
    if be == "torch":
        th, tw = teacher_hidden.detach(), teacher_weight.detach()
        tb = teacher_bias.detach() if teacher_bias is not None else None
        logp = ref.linear_token_logprobs(student_hidden, student_weight, tk, bias=student_bias, temperature=T)
        q_logp = ref.linear_token_logprobs(th, tw, tk, bias=tb, temperature=T)
        div = None if sampled else ref.linear_divergence(
            student_hidden, student_weight, th, tw, student_bias=student_bias, teacher_bias=tb, kind=divergence,
            beta=beta, alpha=alpha, temperature=T, targets=tk)
    else:
        detach = lambda x: x.detach().contiguous() if x is not None else None  # noqa: E731
        stats = _ops.linear_vocab_stats(
            _public.rows(student_hidden, ds), student_weight.contiguous(),
            student_bias.contiguous() if student_bias is not None else None,
            _public.rows(teacher_hidden.detach(), dt), detach(teacher_weight), detach(teacher_bias),
            tk_k, 1.0 / T, code, beta, alpha, False, be)
        logp = stats[:, _ops.STAT_LOGP_A].reshape(targets.shape)
        q_logp = stats[:, _ops.STAT_LOGP_B].reshape(targets.shape)
        div = stats[:, _ops.STAT_DIV].reshape(targets.shape)
    if sampled:
        per_token = token_terms(logp.reshape(-1), q_logp.reshape(-1), 0, logp.numel()).view(logp.shape)
    else:
        per_token = div
    loss = (w * per_token).sum()
    return loss, _opd_metrics(logp, q_logp, div, mask, sampled, token_terms if sampled else None)


def _opd_metrics(logp, q_logp, div, mask, sampled, token_terms):
    logp, q_logp = logp.detach(), q_logp.detach()
    metrics = {"student_logp": _masked_mean(logp, mask), "teacher_logp": _masked_mean(q_logp, mask)}
    if sampled:
        neg_reward = token_terms(logp.reshape(-1), q_logp.reshape(-1), 0, logp.numel()).view(logp.shape)
        metrics["reward"] = _masked_mean(-neg_reward, mask)
        metrics["reverse_kl_sampled"] = _masked_mean(logp - q_logp, mask)
    else:
        metrics["divergence"] = _masked_mean(div.detach(), mask)
    return metrics
