"""Float64 references of the policy-loss variants of TRL 1.16, verl 0.9 and OpenRLHF 0.11.

Plain PyTorch on per-token tensors, written from the definitions restated in ``docs/loss_variants.md``
(independent of ``onepass.losses``); the oracle of the fused implementation.  Everything is computed in
float64; gradients flow to ``logp`` (and only there) with the stop-gradient placement of the peer.

Structure (one loss = ratio → per-token objective → multipliers → aggregation, plus the KL and entropy
terms, each aggregated on its own):

- ``log_importance_ratio``: token, sequence (GSPO: gradient through the sequence mean) or
  sequence-token (GSPO-token: the sequence value, each token's own gradient) level.
- ``OBJECTIVES``: the per-token policy term ℓ_t (ppo_clip with dual clip and TRL's ``delta`` cap, cispo,
  sapo, reinforce (verl gpg), dppo_tv, dppo_kl, clip_cov, kl_cov, geo_mean, dro, vespo).
- multipliers of the policy term only: off-policy correction weights (``token_weights``, computed by the
  public ``onepass.corrections`` helpers, which are checked against the peers directly), TRL's
  off-policy sequence mask (``off_policy_sequence_mask``) and high-entropy token mask
  (``high_entropy_mask``).
- ``aggregate``: verl's ``loss_agg`` modes with global normalizers (token count, sequence count,
  horizon), the choice of counting fully masked sequences, and an overall scale.
- ``kl_penalty``: k1/k2/k3/abs under TRL, verl and OpenRLHF names, clamps and gradient conventions.

Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``entropy``, ``mask`` are [B, T]; ``advantages`` is [B]
(per sequence) or [B, T].  Inputs may be any float dtype; they are promoted to float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence", "sequence-token")
KL_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3", "abs": "abs"}
#: OpenRLHF's cap on the importance weight of its unbiased KL gradient (``KL_IS_WEIGHT_CLIP``).
KL_IS_WEIGHT_CAP = 10.0


def _f64(x):
    return None if x is None else x.to(torch.float64)


def _m(mask: Tensor) -> Tensor:
    return mask.to(torch.float64)


def _where_masked(x: Tensor, mask: Tensor) -> Tensor:
    """x broadcast to the mask's shape, exactly 0 (not NaN·0) where the mask is 0."""
    x = x.expand(mask.shape)
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Σ m·x / max(Σ m, 1) (x broadcast to the mask's shape); 0 for an empty mask."""
    m = _m(mask)
    return _where_masked(x, mask).sum(dim) / m.sum(dim).clamp_min(1.0)


def _clamp(x: Tensor, bounds) -> Tensor:
    """bounds: None, a number c (clamp to ±c) or a (low, high) pair with None for no bound."""
    if bounds is None:
        return x
    if isinstance(bounds, (int, float)):
        return x.clamp(-bounds, bounds)
    return x.clamp(bounds[0], bounds[1])


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
def aggregate(per_token: Tensor, mask: Tensor, loss_agg: str = "token-mean", *, num_tokens=None,
              num_sequences=None, horizon=None, empty_sequences: str = "exclude") -> Tensor:
    """Scalar Σ_b,t w_bt·ℓ_bt for one of verl's ``loss_agg`` modes (ℓ broadcast to [B, T], masked).

    - "token-mean": Σ m·ℓ / N, N = ``num_tokens`` (a global token count) or Σ m (at least 1)
    - "token-sum": Σ m·ℓ
    - "seq-mean-token-mean": Σ_b (Σ_t m·ℓ / max(n_b, 1)) / S
    - "seq-mean-token-sum": Σ_b Σ_t m·ℓ / S
    - "seq-mean-token-sum-norm": Σ_b Σ_t m·ℓ / S / H, H = ``horizon`` or T
    S = ``num_sequences`` (a global sequence count) or, by default, the number of sequences with at
    least one unmasked token (``empty_sequences="exclude"``, verl) or B (``"count"``, TRL); at least 1.
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    if empty_sequences not in ("exclude", "count"):
        raise ValueError(f"empty_sequences must be 'exclude' or 'count', got {empty_sequences!r}")
    x = _where_masked(_f64(per_token), mask)
    m = _m(mask)
    if loss_agg == "token-mean":
        n = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=torch.float64)
        return x.sum() / n.clamp_min(1.0) if num_tokens is None else x.sum() / n
    if loss_agg == "token-sum":
        return x.sum()
    n_b = m.sum(-1)
    seq = x.sum(-1)
    if loss_agg == "seq-mean-token-mean":
        seq = seq / n_b.clamp_min(1.0)
    if num_sequences is None:
        count = (n_b > 0).sum() if empty_sequences == "exclude" else torch.tensor(m.shape[0])
        count = count.to(torch.float64).clamp_min(1.0)
    else:
        count = torch.as_tensor(num_sequences, dtype=torch.float64)
    loss = seq.sum() / count
    if loss_agg == "seq-mean-token-sum-norm":
        loss = loss / (m.shape[-1] if horizon is None else horizon)
    return loss


# ----------------------------------------------------------------------------------------------------
# Importance ratio
# ----------------------------------------------------------------------------------------------------
def log_importance_ratio(logp: Tensor, old_logp, mask: Tensor, level: str = "token", clamp=None) -> Tensor:
    """log r with the gradient convention of the level; [B, T] ("token", "sequence-token") or [B, 1].

    x_t = logp_t − old_logp_t (old_logp None: on-policy, old = sg(logp)), then
    - "token": x_t (TRL, verl vanilla, OpenRLHF ppo)
    - "sequence": mean_t x_t over unmasked tokens (count ≥ 1), one value per sequence whose gradient
      reaches every token as 1/n_b (GSPO as TRL ``importance_sampling_level="sequence"`` and OpenRLHF gspo)
    - "sequence-token": sg(mean_t x_t) + logp_t − sg(logp_t): the sequence value at every token, each
      token's own gradient (GSPO-token, verl gspo)
    then clamped to ``clamp`` (a number for ±c, a (low, high) pair, or None).
    """
    if level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {level!r}")
    old = logp.detach() if old_logp is None else _f64(old_logp)
    x = logp - old
    if level == "token":
        return _clamp(x, clamp)
    seq = masked_mean(x, mask, dim=-1).unsqueeze(-1)
    if level == "sequence-token":
        seq = seq.detach() + logp - logp.detach()
    return _clamp(seq, clamp)


# ----------------------------------------------------------------------------------------------------
# Per-token objectives: each returns (ℓ [B, T] or [B, 1], metrics dict of [B, T] / [B, 1] indicators)
# ----------------------------------------------------------------------------------------------------
def _ppo_clip(ctx, epsilon_low=0.2, epsilon_high=0.2, dual_clip=None, ratio_cap=None, **_):
    """ℓ = max(−A·min(r, cap), −A·clip(r, 1−ε_low, 1+ε_high));
    dual clip c: ℓ = min(ℓ, −A·c) where A < 0."""
    A, ratio = ctx["A"], torch.exp(ctx["log_ratio"])
    capped = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
    pg1 = -A * capped
    pg2 = -A * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = torch.maximum(pg1, pg2)
    low = (capped < 1.0 - epsilon_low) & (A < 0)
    high = (capped > 1.0 + epsilon_high) & (A > 0)
    ind = {"clip_frac": (pg2 > pg1), "clip_low": low, "clip_high": high, "clip_region": low | high}
    if dual_clip is not None:
        pg3 = -A * dual_clip
        ind["dual_clip_frac"] = (pg > pg3) & (A < 0)
        pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
    return pg, ind


def _cispo(ctx, epsilon_low=0.2, epsilon_high=0.2, **_):
    """ℓ = −sg(clip(r, 1−ε_low, 1+ε_high))·A·logp (ε_low = inf: no lower bound, TRL's form)."""
    ratio = torch.exp(ctx["log_ratio"])
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    A = ctx["A"]
    return -clipped.detach() * A * ctx["logp"], {"clip_frac": ratio != clipped,
                                                 "cispo_clip": (ratio > 1.0 + epsilon_high) & (A > 0)}


def _sapo(ctx, sapo_tau_pos=1.0, sapo_tau_neg=1.05, **_):
    """ℓ = −A·σ(τ(r − 1))·4/τ with τ = τ_pos where A > 0, else τ_neg."""
    A = ctx["A"]
    tau = torch.where(A > 0, torch.full_like(A, sapo_tau_pos), torch.full_like(A, sapo_tau_neg))
    gate = torch.sigmoid(tau * (torch.exp(ctx["log_ratio"]) - 1.0)) * 4.0 / tau
    return -gate * A, {}


def _reinforce(ctx, **_):
    """ℓ = −A·logp (verl gpg and its REINFORCE loss; no ratio)."""
    return -ctx["A"] * ctx["logp"], {}


def _dppo(ctx, divergence, epsilon_low=0.2, epsilon_high=0.2, ratio_cap=None, **_):
    """ℓ = −A·sg(min(r, cap))·logp·valid, valid (detached) a binary trust region on the sampled token's
    probability: TV |p − p_old| or the Bernoulli KL, one-sided by the sign of A."""
    A, logp, old = ctx["A"], ctx["logp"], ctx["old_logp"]
    ratio = torch.exp(ctx["log_ratio"])
    capped = (ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)).detach()
    p, p_old = torch.exp(logp), torch.exp(old)
    if divergence == "tv":
        valid_pos = (p - p_old) <= epsilon_high
        valid_neg = (p - p_old) >= -epsilon_low
    else:
        # Bernoulli KL(p_old ‖ p) over {sampled token, rest}; 1e-8 keeps the second log finite (verl)
        bkl = p_old * (old - logp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        valid_pos = (bkl <= epsilon_high) | (p <= p_old)
        valid_neg = (bkl <= epsilon_low) | (p >= p_old)
    valid = torch.where(A > 0, valid_pos, valid_neg).detach().to(torch.float64)
    over = (ratio > ratio_cap) if ratio_cap is not None else torch.zeros_like(valid, dtype=torch.bool)
    return -A * capped * logp * valid, {"clip_frac": valid == 0, "dual_clip_frac": over & (valid > 0)}


def _clip_cov(ctx, epsilon_low=0.2, epsilon_high=0.2, cov_fraction=2e-4, cov_bounds=(1.0, 5.0), generator=None,
              **_):
    """PPO clip with a random subset of high-covariance tokens left out (Clip-Cov).

    cov_t = (A_t − mean A)·(logp_t − mean logp) over unmasked tokens; candidates are the unmasked,
    unclipped tokens with lb < cov_t < ub; max(⌊fraction·Σm⌋, 1) of them (at most all), drawn by
    ``torch.randperm`` over the candidates in row-major order, get ℓ = 0."""
    A, mask = ctx["A"], ctx["mask"]
    ratio = torch.exp(ctx["log_ratio"])
    pg1 = -A * ratio
    pg2 = -A * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    valid = mask.bool()
    with torch.no_grad():
        cov = (A - masked_mean(A, mask)) * (ctx["logp"] - masked_mean(ctx["logp"], mask))
        cand = (cov > cov_bounds[0]) & (cov < cov_bounds[1]) & valid & ~(pg2 > pg1)
        idx = torch.nonzero(cand)
        n_clip = max(int(cov_fraction * mask.sum().item()), 1)
        keep = torch.ones_like(cov)  # [B, T] also for per-sequence advantages
        if len(idx) > 0:
            idx = idx[torch.randperm(len(idx), generator=generator)[:min(n_clip, len(idx))]]
            keep[idx[:, 0], idx[:, 1]] = 0.0
    return torch.maximum(pg1, pg2) * keep, {"clip_frac": keep == 0}


def _kl_cov(ctx, cov_fraction=2e-4, kl_cov_coef=1.0, **_):
    """ℓ = −A·r, plus coef·|logp − old_logp| on the max(⌊fraction·n⌋, 1) unmasked tokens of largest
    covariance (A_t − mean A)(logp_t − mean logp) (plain means over the n unmasked tokens; KL-Cov)."""
    A, mask, log_ratio = ctx["A"], ctx["mask"], ctx["log_ratio"]
    pg = -A * torch.exp(log_ratio)
    flat_valid = torch.nonzero(mask.reshape(-1).bool(), as_tuple=True)[0]
    if len(flat_valid) > 0:
        with torch.no_grad():
            a = A.expand(mask.shape).reshape(-1)[flat_valid]
            lp = ctx["logp"].reshape(-1)[flat_valid]
            cov = (a - a.mean()) * (lp - lp.mean())
            top = flat_valid[torch.topk(cov, max(1, int(len(cov) * cov_fraction)), largest=True).indices]
        penalized = torch.zeros(mask.numel(), dtype=torch.bool, device=A.device)  # [B, T] also for A [B, 1]
        penalized[top] = True
        pg = torch.where(penalized.view(mask.shape), pg + kl_cov_coef * log_ratio.abs(), pg)
    return pg, {}


def _geo_mean(ctx, epsilon_low=0.2, epsilon_high=0.2, token_weights=None, **_):
    """GMPO: per sequence L_b = −Ā_b·exp(mean_t x̃_t), Ā_b the token-mean advantage, x̃_t the log-ratio
    clipped to [−ε_low, ε_high] on the side the sign of A_t selects (above for A > 0, below for A < 0,
    0 for A = 0).  Returned per token as L_b/n_b so that "seq-mean-token-sum" sums L_b.  Correction
    weights enter as their per-sequence geometric mean exp(mean_t log(w_t + 1e-10)) (verl)."""
    A, mask, x = ctx["A"], ctx["mask"], ctx["log_ratio"]
    m = _m(mask)
    sgn = torch.sign(A)
    xc = x.clamp(-epsilon_low, epsilon_high)
    x_sel = sgn * torch.minimum(sgn * x, sgn * xc)
    n_b = m.sum(-1, keepdim=True).clamp_min(1.0)
    ratio = torch.exp((x_sel * m).sum(-1, keepdim=True) / n_b)
    adv = (A.expand(m.shape) * m).sum(-1, keepdim=True) / n_b
    seq_loss = -adv * ratio
    if token_weights is not None:
        seq_loss = seq_loss * torch.exp((torch.log(token_weights + 1e-10) * m).sum(-1, keepdim=True) / n_b)
    clipped = x != xc
    return seq_loss / n_b, {"clip_frac": clipped & (A > 0), "dual_clip_frac": clipped & (A < 0)}


def _dro(ctx, dro_beta=None, **_):
    """ℓ = −(A·logp − β/2·(logp − old_logp)²)."""
    if dro_beta is None or dro_beta <= 0:
        raise ValueError(f"dro_beta must be > 0 for objective='dro', got {dro_beta!r}")
    x = ctx["logp"] - ctx["old_logp"]
    return -(ctx["logp"] * ctx["A"] - 0.5 * dro_beta * x * x), {}


def _vespo(ctx, vespo_params=(2.0, 3.0, 3.0, 2.0), token_weights=None, **_):
    """VESPO: ℓ = −sg(φ(w))·A·logp with w the sequence ratio exp(Σ_t clamp(x_t, ±20)·m_t (+ Σ_t
    log clamp(IS_t))) clamped in log to [log 1e-8, 20] and φ(w) = exp(λ + k·log w − λ·w), (k, λ) =
    (k_pos, λ_pos) where A ≥ 0 else (k_neg, λ_neg), λ ≥ 1e-4; non-finite φ → 0 (TRL)."""
    k_pos, lam_pos, k_neg, lam_neg = vespo_params
    A, mask = ctx["A"], ctx["mask"]
    lo = math.log(1e-8)
    with torch.no_grad():
        x = (ctx["logp"] - ctx["old_logp"]).clamp(-20.0, 20.0)
        log_w = (x * _m(mask)).sum(-1, keepdim=True)
        if token_weights is not None:
            log_is = torch.log(token_weights).clamp(lo, 20.0)
            if log_is.shape[-1] != 1:
                log_is = _where_masked(log_is, mask)
            log_w = log_w + log_is.sum(-1, keepdim=True)
        log_w = log_w.clamp(lo, 20.0)
        nonneg = A >= 0
        k = torch.where(nonneg, torch.full_like(A, k_pos), torch.full_like(A, k_neg))
        lam = torch.where(nonneg, torch.full_like(A, lam_pos), torch.full_like(A, lam_neg)).clamp_min(1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * A * ctx["logp"], {"phi": phi}


OBJECTIVES = {
    "ppo_clip": _ppo_clip,
    "cispo": _cispo,
    "sapo": _sapo,
    "reinforce": _reinforce,
    "dppo_tv": lambda ctx, **kw: _dppo(ctx, "tv", **kw),
    "dppo_kl": lambda ctx, **kw: _dppo(ctx, "binary_kl", **kw),
    "clip_cov": _clip_cov,
    "kl_cov": _kl_cov,
    "geo_mean": _geo_mean,
    "dro": _dro,
    "vespo": _vespo,
}
#: objectives that use the correction weights themselves (they are not multiplied onto ℓ afterwards)
_OWN_WEIGHTS = ("geo_mean", "vespo")


# ----------------------------------------------------------------------------------------------------
# Multipliers of the policy term
# ----------------------------------------------------------------------------------------------------
def off_policy_sequence_mask(logp: Tensor, sampling_logp: Tensor, advantages: Tensor, mask: Tensor,
                             threshold: float) -> Tensor:
    """TRL / DeepSeek-V3.2 off-policy sequence mask [B, 1] (or [B, T] for per-token advantages): keep a
    sequence when A ≥ 0 or mean_t(sampling_logp − sg(logp)) ≤ threshold (NaN differences count as 0)."""
    A = _f64(advantages)
    A = A.unsqueeze(-1) if A.dim() == 1 else A
    d = torch.nan_to_num(_f64(sampling_logp) - logp.detach(), nan=0.0)
    avg = masked_mean(d, mask, dim=-1).unsqueeze(-1)
    return ((A >= 0) | (avg <= threshold)).to(torch.float64)


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """TRL's ``top_entropy_quantile``: 1 on the unmasked tokens whose entropy is ≥ the (1 − ρ) quantile
    (linear interpolation, ``torch.quantile``) of the unmasked entropies, else 0; all 0 for an empty mask."""
    e = _f64(entropy).detach()
    local = e[mask.bool()]
    if local.numel() == 0:
        return torch.zeros_like(e)
    thr = torch.quantile(local, 1.0 - top_quantile)
    return ((e * _m(mask) >= thr) & mask.bool()).to(torch.float64)


# ----------------------------------------------------------------------------------------------------
# KL and entropy
# ----------------------------------------------------------------------------------------------------
def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", *, log_ratio_clamp=None, value_clamp=None,
               gradient: str = "estimator", old_logp=None, is_cap: float = KL_IS_WEIGHT_CAP) -> Tensor:
    """Per-token sampled-token KL estimate of KL(π‖π_ref) [B, T].

    x = clamp(logp − ref_logp, ``log_ratio_clamp``); k1 = x, k2 = x²/2, k3 = exp(−x) + x − 1,
    abs = |x| (verl names kl, mse, low_var_kl accepted; a "+" suffix means ``gradient="k2"``); the value
    is clamped to ``value_clamp``.  ``gradient``: "estimator" (autograd of the formula), "k2" (value of
    the estimator, gradient of (logp − ref_logp)²/2, verl "+"), "k2_is" (gradient of w·(logp − ref_logp)²/2
    with w = sg(min(exp(logp − old_logp), is_cap)), OpenRLHF ``unbiased_gradient``).
    """
    if estimator.endswith("+"):
        estimator, gradient = estimator[:-1], "k2"
    if estimator not in KL_ALIASES:
        raise ValueError(f"kl_estimator must be one of {tuple(KL_ALIASES)}, got {estimator!r}")
    kind = KL_ALIASES[estimator]
    raw = logp - _f64(ref_logp)
    x = _clamp(raw, log_ratio_clamp)
    value = {"k1": lambda: x, "k2": lambda: 0.5 * x * x, "k3": lambda: torch.exp(-x) + x - 1,
             "abs": lambda: x.abs()}[kind]()
    value = _clamp(value, value_clamp)
    if gradient == "estimator":
        return value
    surrogate = 0.5 * raw * raw
    if gradient == "k2_is":
        w = 1.0 if old_logp is None else torch.exp(logp - _f64(old_logp)).clamp(max=is_cap).detach()
        surrogate = w * surrogate
    elif gradient != "k2":
        raise ValueError(f"kl_gradient must be 'estimator', 'k2' or 'k2_is', got {gradient!r}")
    return value.detach() + surrogate - surrogate.detach()


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------
def policy_loss(logp: Tensor, advantages: Tensor, *, mask: Tensor, old_logp=None, ref_logp=None, entropy=None,
                objective: str = "ppo_clip", ratio_level: str = "token", log_ratio_clamp=20.0,
                epsilon_low: float = 0.2, epsilon_high: float = 0.2, dual_clip=None, ratio_cap=None,
                sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05, dro_beta=None, cov_fraction: float = 2e-4,
                cov_bounds=(1.0, 5.0), kl_cov_coef: float = 1.0, vespo_params=(2.0, 3.0, 3.0, 2.0),
                generator=None, token_weights=None, off_policy_threshold=None, sampling_logp=None,
                top_entropy_quantile: float = 1.0, beta: float = 0.0, kl_estimator: str = "k3",
                kl_log_ratio_clamp=None, kl_value_clamp=None, kl_gradient: str = "estimator",
                kl_ratio_weight: bool = False, kl_agg=None, entropy_coef: float = 0.0, entropy_agg=None,
                loss_agg: str = "token-mean", num_tokens=None, num_sequences=None, horizon=None,
                empty_sequences: str = "exclude", loss_scale: float = 1.0):
    """Reference policy loss; returns (loss scalar float64, metrics dict of float64 scalars).

    loss = loss_scale · [ agg(ℓ_t · c_t) + β·agg_kl(kl_t · ρ_t) − entropy_coef · agg_H(H_t) ]

    - ℓ_t: ``objective`` (see ``OBJECTIVES``) on the log-ratio of ``ratio_level`` clamped to
      ``log_ratio_clamp``; hyperparameters ``epsilon_low``/``epsilon_high`` (clip range, CISPO bounds,
      DPPO divergence thresholds, GMPO log-ratio clip), ``dual_clip``, ``ratio_cap`` (TRL ``delta``,
      DPPO's truncation), ``sapo_tau_*``, ``dro_beta``, ``cov_*``/``kl_cov_coef``, ``vespo_params``.
    - c_t: ``token_weights`` (detached correction weights, e.g. ``rollout_is_weights``) × the off-policy
      sequence mask (``off_policy_threshold`` with ``sampling_logp``, default old_logp) × the
      high-entropy mask (``top_entropy_quantile`` < 1).
    - kl_t: ``kl_penalty`` of (logp, ref_logp) with ``kl_estimator``/``kl_*`` options; ρ_t = the
      importance ratio (with its gradient) when ``kl_ratio_weight`` (TRL ``use_bias_correction_kl``).
    - agg: ``aggregate`` with ``loss_agg``, ``num_tokens``, ``num_sequences``, ``horizon``,
      ``empty_sequences``; ``kl_agg`` / ``entropy_agg`` (default: ``loss_agg``) are the modes of the KL
      and entropy terms (same normalizers); ``entropy_agg="local-token-mean"`` is TRL's: the token mean
      over the loss mask times the high-entropy mask, ignoring ``num_tokens``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
    logp = _f64(logp)
    A = _f64(advantages)
    A = A.unsqueeze(-1) if A.dim() == 1 else A
    old = logp.detach() if old_logp is None else _f64(old_logp)
    weights = _f64(token_weights)
    log_ratio = log_importance_ratio(logp, old_logp, mask, ratio_level, log_ratio_clamp)
    ctx = dict(logp=logp, old_logp=old, A=A, mask=mask, log_ratio=log_ratio)
    hyper = dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip, ratio_cap=ratio_cap,
                 sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, dro_beta=dro_beta, cov_fraction=cov_fraction,
                 cov_bounds=cov_bounds, kl_cov_coef=kl_cov_coef, vespo_params=vespo_params, generator=generator,
                 token_weights=weights)
    pg, indicators = OBJECTIVES[objective](ctx, **hyper)
    multiplier = torch.ones_like(logp)
    if off_policy_threshold is not None:
        sampling = old if sampling_logp is None else sampling_logp
        multiplier = multiplier * off_policy_sequence_mask(logp, sampling, A, mask, off_policy_threshold)
    ent_mask = None
    if top_entropy_quantile < 1.0:
        ent_mask = high_entropy_mask(entropy, mask, top_entropy_quantile)
        multiplier = multiplier * ent_mask
    if weights is not None and objective not in _OWN_WEIGHTS:
        multiplier = multiplier * weights
    per_token = pg * multiplier
    if objective == "geo_mean":
        pg_loss = aggregate(per_token, mask, "seq-mean-token-sum", empty_sequences="count")
    else:
        pg_loss = aggregate(per_token, mask, loss_agg, num_tokens=num_tokens, num_sequences=num_sequences,
                            horizon=horizon, empty_sequences=empty_sequences)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss.detach(), "ppo_kl": masked_mean(-(logp - old), mask).detach(),
               "ratio_mean": masked_mean(torch.exp(log_ratio), mask).detach()}
    for name, ind in indicators.items():
        metrics[name] = masked_mean(ind.to(torch.float64), mask).detach()
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError(f"beta={beta} needs ref_logp")
        kl = kl_penalty(logp, ref_logp, kl_estimator, log_ratio_clamp=kl_log_ratio_clamp,
                        value_clamp=kl_value_clamp, gradient=kl_gradient, old_logp=old)
        if kl_ratio_weight:
            kl = kl * torch.exp(log_ratio)
        kl_loss = aggregate(kl, mask, loss_agg if kl_agg is None else kl_agg, num_tokens=num_tokens,
                            num_sequences=num_sequences, horizon=horizon, empty_sequences=empty_sequences)
        loss = loss + beta * kl_loss
        metrics["kl"] = masked_mean(kl, mask).detach()
        metrics["kl_loss"] = kl_loss.detach()
    if entropy is not None:
        ent = _f64(entropy)
        metrics["entropy"] = masked_mean(ent, mask).detach()
        if entropy_coef != 0.0:
            if entropy_agg == "local-token-mean":
                eff = _m(mask) if ent_mask is None else _m(mask) * ent_mask
                ent_loss = aggregate(ent, eff, "token-mean")
            else:
                ent_loss = aggregate(ent, mask, loss_agg if entropy_agg is None else entropy_agg,
                                     num_tokens=num_tokens, num_sequences=num_sequences, horizon=horizon,
                                     empty_sequences=empty_sequences)
            loss = loss - entropy_coef * ent_loss
            metrics["entropy_loss"] = ent_loss.detach()
    return loss * loss_scale, metrics
