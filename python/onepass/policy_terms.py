"""The policy-loss math on per-token quantities: importance ratio, per-token objective, multipliers,
KL and entropy terms, aggregation weights (docs/loss_variants.md).  Plain PyTorch, shared by every backend
of ``onepass.grpo_loss`` (on the vocabulary sweep's stats) and by ``onepass.policy_loss``.

loss = loss_scale · [ agg(ℓ_t · c_t) + β · agg_kl(kl_t · ρ_t) − entropy_coef · agg_H(H_t) ]

``PolicyTerms`` holds the validated options; ``PolicyTerms.row_elementwise`` says whether the per-token
contribution of a row depends on that row only (then the fused loss streams chunks of rows in one pass),
or needs reductions across tokens (a sequence-level ratio, a sequence or batch selection, a quantile):
then the loss runs on all the sweep's per-token stats at once.  Both evaluate ``token_contributions``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .kl import check_bounds, check_estimator, check_kl_gradient, clamp_to, kl_estimate

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
#: TRL's entropy aggregation: the token mean over the loss mask (× the high-entropy mask), whatever the loss type.
LOCAL_TOKEN_MEAN = "local-token-mean"
RATIO_LEVELS = ("token", "sequence", "sequence-token")
EMPTY_SEQUENCES = ("exclude", "count")


def _zeros_where(keep: Tensor, x: Tensor) -> Tensor:
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _row_mean(x: Tensor, m: Tensor) -> Tensor:
    """Per-row masked mean [B, 1] of x [B, T] (m float, 0/1; empty rows → 0)."""
    return _zeros_where(m != 0, x).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)


def _masked_mean_all(x: Tensor, m: Tensor) -> Tensor:
    return _zeros_where(m != 0, x).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------
# Per-token objectives ℓ_t.  Each takes the context (A, logp, old_logp, log_ratio, mask, token_weights)
# and the terms; returns (ℓ, indicators for the metrics).  ``mask`` is given only to cross-token objectives.
# ----------------------------------------------------------------------------------------------------
def _ppo_clip(c, t):
    A, ratio = c.A, torch.exp(c.log_ratio)
    capped = ratio if t.ratio_cap is None else ratio.clamp(max=t.ratio_cap)
    pg1 = -A * capped
    pg2 = -A * ratio.clamp(1.0 - t.epsilon_low, 1.0 + t.epsilon_high)
    pg = torch.maximum(pg1, pg2)
    low, high = (capped < 1.0 - t.epsilon_low) & (A < 0), (capped > 1.0 + t.epsilon_high) & (A > 0)
    ind = {"clip_frac": pg2 > pg1, "clip_frac_low": low, "clip_frac_high": high, "clip_region": low | high}
    if t.dual_clip is not None:
        pg3 = -A * t.dual_clip
        ind["dual_clip_frac"] = (pg > pg3) & (A < 0)
        pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
    return pg, ind


def _cispo(c, t):
    ratio = torch.exp(c.log_ratio)
    bounded = ratio.clamp(1.0 - t.epsilon_low, 1.0 + t.epsilon_high).detach()
    cispo_clip = (ratio > 1.0 + t.epsilon_high) & (c.A > 0)
    return -bounded * c.A * c.logp, {"clip_frac": ratio != bounded, "cispo_clip": cispo_clip}


def _sapo(c, t):
    tau = torch.where(c.A > 0, torch.full_like(c.A, t.sapo_tau_pos), torch.full_like(c.A, t.sapo_tau_neg))
    return -c.A * torch.sigmoid(tau * (torch.exp(c.log_ratio) - 1.0)) * (4.0 / tau), {}


def _reinforce(c, t):
    return -c.A * c.logp, {}


def _dppo(c, t, divergence):
    """−A·sg(min(r, cap))·logp on the tokens inside a one-sided trust region of the sampled token's
    probability (TV: p − p_old; Bernoulli KL of (p_old, p)), the side chosen by the sign of A."""
    A, logp, old = c.A, c.logp, c.old_logp
    ratio = torch.exp(c.log_ratio)
    capped = (ratio if t.ratio_cap is None else ratio.clamp(max=t.ratio_cap)).detach()
    with torch.no_grad():
        p, p_old = torch.exp(logp), torch.exp(old)
        if divergence == "tv":
            inside_pos, inside_neg = (p - p_old) <= t.epsilon_high, (p - p_old) >= -t.epsilon_low
        else:
            bkl = p_old * (old - logp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            inside_pos = (bkl <= t.epsilon_high) | (p <= p_old)
            inside_neg = (bkl <= t.epsilon_low) | (p >= p_old)
        inside = torch.where(A > 0, inside_pos, inside_neg)
        over = ratio > t.ratio_cap if t.ratio_cap is not None else torch.zeros_like(inside)
    return -A * capped * logp * inside.to(logp.dtype), {"clip_frac": ~inside, "dual_clip_frac": over & inside}


def _covariance(c) -> Tensor:
    """(A_t − mean A)(logp_t − mean logp), means over the unmasked tokens (detached)."""
    m = c.mask.to(c.logp.dtype)
    A = c.A.expand_as(c.logp)
    return ((A - _masked_mean_all(A, m)) * (c.logp - _masked_mean_all(c.logp, m))).detach()


def _clip_cov(c, t):
    """PPO clip (no dual clip) with ℓ = 0 on max(⌊f·N⌋, 1) tokens drawn uniformly among the unmasked,
    unclipped tokens with lb < cov_t < ub (Clip-Cov; candidates in row-major order, ``torch.randperm``)."""
    A, ratio = c.A, torch.exp(c.log_ratio)
    pg1, pg2 = -A * ratio, -A * ratio.clamp(1.0 - t.epsilon_low, 1.0 + t.epsilon_high)
    with torch.no_grad():
        cov = _covariance(c)
        lb, ub = t.cov_bounds
        candidates = torch.nonzero(((cov > lb) & (cov < ub) & (c.mask != 0) & ~(pg2 > pg1)).reshape(-1)).squeeze(-1)
        dropped = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
        if candidates.numel() > 0:
            n_drop = min(max(int(t.cov_fraction * int((c.mask != 0).sum())), 1), candidates.numel())
            pick = torch.randperm(candidates.numel(), generator=t.generator)[:n_drop].to(candidates.device)
            dropped[candidates[pick]] = True
        dropped = dropped.view(cov.shape)
    return _zeros_where(~dropped, torch.maximum(pg1, pg2)), {"clip_frac": dropped}


def _kl_cov(c, t):
    """−A·r, plus κ·|x| on the max(⌊f·N⌋, 1) unmasked tokens of largest covariance (KL-Cov)."""
    pg = -c.A * torch.exp(c.log_ratio)
    with torch.no_grad():
        valid = torch.nonzero((c.mask != 0).reshape(-1)).squeeze(-1)
        penalized = torch.zeros(pg.numel(), dtype=torch.bool, device=pg.device)
        if valid.numel() > 0:
            a, lp = c.A.expand_as(c.logp).reshape(-1)[valid], c.logp.reshape(-1)[valid]
            cov = (a - a.mean()) * (lp - lp.mean())
            penalized[valid[torch.topk(cov, max(1, int(valid.numel() * t.cov_fraction))).indices]] = True
    penalized = penalized.view(pg.shape)
    return torch.where(penalized, pg + t.kl_cov_coef * c.log_ratio.abs(), pg), {}


def _geo_mean(c, t):
    """GMPO: per sequence L_b = −Ā_b·exp(mean_t x̃_t), x̃ the log-ratio clipped to [−ε_low, ε_high] on the
    side sign(A_t) selects; correction weights enter as their per-sequence geometric mean.  Returned per
    token as L_b / n_b (aggregated as Σ_b L_b / B)."""
    A, x, m = c.A, c.log_ratio, c.mask.to(c.logp.dtype)
    sign = torch.sign(A)
    clipped = x.clamp(-t.epsilon_low, t.epsilon_high)
    x_sel = sign * torch.minimum(sign * x, sign * clipped)
    seq_loss = -_row_mean(A.expand_as(m), m) * torch.exp(_row_mean(x_sel, m))
    if c.token_weights is not None:
        seq_loss = seq_loss * torch.exp(_row_mean(torch.log(c.token_weights + 1e-10), m))
    was_clipped = x != clipped
    return seq_loss / m.sum(-1, keepdim=True).clamp_min(1.0), {"clip_frac": was_clipped & (A > 0),
                                                               "dual_clip_frac": was_clipped & (A < 0)}


def _dro(c, t):
    x = c.logp - c.old_logp
    return -(c.logp * c.A - 0.5 * t.dro_beta * x * x), {}


def _vespo(c, t):
    """VESPO: −sg(φ(w))·A·logp, w the sequence ratio exp(Σ_t clamp(x_t, ±20) (+ Σ_t log IS_t)) clamped in
    log to [log 1e-8, 20]; φ(w) = exp(λ + k·log w − λ·w) with (k, λ) by the sign of A; non-finite φ → 0."""
    k_pos, lam_pos, k_neg, lam_neg = t.vespo_params
    lo = math.log(1e-8)
    with torch.no_grad():
        m = c.mask.to(c.logp.dtype)
        log_w = _zeros_where(m != 0, (c.logp - c.old_logp).clamp(-20.0, 20.0)).sum(-1, keepdim=True)
        if c.token_weights is not None:
            log_w = log_w + _zeros_where(m != 0, torch.log(c.token_weights).clamp(lo, 20.0)).sum(-1, keepdim=True)
        log_w = log_w.clamp(lo, 20.0)
        nonneg = c.A >= 0
        k = torch.where(nonneg, torch.full_like(c.A, k_pos), torch.full_like(c.A, k_neg))
        lam = torch.where(nonneg, torch.full_like(c.A, lam_pos), torch.full_like(c.A, lam_neg)).clamp_min(1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * c.A * c.logp, {"phi": phi}


class Objective(NamedTuple):
    fn: Callable
    cross_token: bool = False  # needs sequence or batch reductions of per-token values
    own_weights: bool = False  # takes the correction weights itself (not multiplied onto ℓ)
    sums_log_weights: bool = False  # multiplies the weights over the sequence: a per-sequence weight counts once


OBJECTIVES = {
    "ppo_clip": Objective(_ppo_clip),
    "cispo": Objective(_cispo),
    "sapo": Objective(_sapo),
    "reinforce": Objective(_reinforce),
    "dppo_tv": Objective(lambda c, t: _dppo(c, t, "tv")),
    "dppo_kl": Objective(lambda c, t: _dppo(c, t, "binary_kl")),
    "clip_cov": Objective(_clip_cov, cross_token=True),
    "kl_cov": Objective(_kl_cov, cross_token=True),
    "geo_mean": Objective(_geo_mean, cross_token=True, own_weights=True),
    "dro": Objective(_dro),
    "vespo": Objective(_vespo, cross_token=True, own_weights=True, sums_log_weights=True),
}


def sequence_weights_per_token(terms: "PolicyTerms", weights: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence correction weights [B] or [B, 1] as per-token ones [B, T]: broadcast, or, for an
    objective that multiplies the weights over the sequence (vespo), w_b^(1/n_b) on each unmasked token."""
    w = (weights[:, None] if weights.dim() == 1 else weights).expand(mask.shape)
    if not OBJECTIVES[terms.objective].sums_log_weights:
        return w
    n_b = (mask != 0).sum(-1, keepdim=True).clamp_min(1).to(w.dtype)
    return torch.exp(torch.log(w) / n_b)


class _Context(NamedTuple):
    A: Tensor
    logp: Tensor
    old_logp: Tensor
    log_ratio: Tensor
    mask: Optional[Tensor]
    token_weights: Optional[Tensor]


# ----------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------
def _number(name, x, *, low=None, strict=False, allow_none=False, allow_inf=False):
    if x is None and allow_none:
        return None
    # comparisons only (no math.isnan / float()): a symbolic float under torch.compile stays symbolic
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
    ok = ok and (allow_inf or abs(x) < math.inf)
    ok = ok and (low is None or (x > low if strict else x >= low))
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '≥'} {low}"
        raise ValueError(f"{name} must be a finite number{bound}{' or None' if allow_none else ''}, got {x!r}")
    return x


@dataclasses.dataclass(frozen=True)
class Aggregation:
    """How per-token terms are summed: ``loss_agg`` (and ``kl_agg``, ``entropy_agg``, default ``loss_agg``)
    with global normalizers: ``num_tokens`` (token-mean denominator), ``num_sequences`` (sequence-mean
    denominator), ``horizon`` (seq-mean-token-sum-norm's constant; default the padded T),
    ``empty_sequences`` ("exclude": fully masked sequences are not counted, "count": they are), and
    ``loss_scale`` multiplying everything."""
    loss_agg: str = "token-mean"
    kl_agg: Optional[str] = None
    entropy_agg: Optional[str] = None
    num_tokens: Optional[float] = None
    num_sequences: Optional[float] = None
    horizon: Optional[float] = None
    empty_sequences: str = "exclude"
    loss_scale: float = 1.0

    def __post_init__(self):
        for name in ("loss_agg", "kl_agg", "entropy_agg"):
            mode = getattr(self, name)
            allowed = LOSS_AGG_MODES + ((LOCAL_TOKEN_MEAN,) if name == "entropy_agg" else ())
            if (mode is not None or name == "loss_agg") and mode not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {mode!r}")
        for name in ("num_tokens", "num_sequences", "horizon"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
                value = value.item()
            object.__setattr__(self, name, _number(name, value, low=0, strict=True, allow_none=True))
        if self.empty_sequences not in EMPTY_SEQUENCES:
            raise ValueError(f"empty_sequences must be one of {EMPTY_SEQUENCES}, got {self.empty_sequences!r}")
        object.__setattr__(self, "loss_scale", _number("loss_scale", self.loss_scale))

    def weights(self, mask: Tensor, mode: str, dtype=torch.float32) -> Tensor:
        """w [B, T] (``dtype``) with Σ w·ℓ the aggregation of ℓ by ``mode``, times ``loss_scale``."""
        m = mask.to(dtype)
        if mode in ("token-mean", LOCAL_TOKEN_MEAN):
            n = m.sum().clamp_min(1.0) if self.num_tokens is None or mode == LOCAL_TOKEN_MEAN else self.num_tokens
            return m * (self.loss_scale / n)
        if mode == "token-sum":
            return m * self.loss_scale
        per_seq = m.sum(-1, keepdim=True)
        if self.num_sequences is not None:
            n_seq = torch.tensor(self.num_sequences, dtype=dtype, device=m.device)
        elif self.empty_sequences == "exclude":
            n_seq = (per_seq > 0).sum().clamp_min(1).to(dtype)
        else:
            n_seq = torch.tensor(max(m.shape[0], 1), dtype=dtype, device=m.device)
        w = m * (self.loss_scale / n_seq)
        if mode == "seq-mean-token-mean":
            return w / per_seq.clamp_min(1.0)
        if mode == "seq-mean-token-sum-norm":
            return w / (m.shape[-1] if self.horizon is None else self.horizon)
        return w


@dataclasses.dataclass(frozen=True)
class PolicyTerms:
    """The validated options of a policy loss (keywords of ``grpo_loss`` / ``policy_loss``)."""
    objective: str = "ppo_clip"
    ratio_level: str = "token"
    log_ratio_clamp: object = 20.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: Optional[float] = None
    ratio_cap: Optional[float] = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    dro_beta: Optional[float] = None
    cov_fraction: float = 2e-4
    cov_bounds: tuple = (1.0, 5.0)
    kl_cov_coef: float = 1.0
    vespo_params: tuple = (2.0, 3.0, 3.0, 2.0)
    generator: Optional[torch.Generator] = None
    off_policy_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_log_ratio_clamp: object = 20.0
    kl_value_clamp: object = None
    kl_gradient: str = "estimator"
    kl_ratio_weight: bool = False
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {self.objective!r}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("log_ratio_clamp", check_bounds("log_ratio_clamp", self.log_ratio_clamp))
        set_("kl_log_ratio_clamp", check_bounds("kl_log_ratio_clamp", self.kl_log_ratio_clamp))
        set_("kl_value_clamp", check_bounds("kl_value_clamp", self.kl_value_clamp))
        set_("epsilon_low", _number("epsilon_low", self.epsilon_low, low=0, allow_inf=True))
        set_("epsilon_high", _number("epsilon_high", self.epsilon_high, low=0, allow_inf=True))
        set_("dual_clip", _number("dual_clip", self.dual_clip, low=1, strict=True, allow_none=True))
        set_("ratio_cap", _number("ratio_cap", self.ratio_cap, low=0, strict=True, allow_none=True))
        set_("sapo_tau_pos", _number("sapo_tau_pos", self.sapo_tau_pos, low=0, strict=True))
        set_("sapo_tau_neg", _number("sapo_tau_neg", self.sapo_tau_neg, low=0, strict=True))
        if self.objective == "dro" or self.dro_beta is not None:
            set_("dro_beta", _number("dro_beta", self.dro_beta, low=0, strict=True))
        set_("cov_fraction", _number("cov_fraction", self.cov_fraction, low=0))
        if not (isinstance(self.cov_bounds, (tuple, list)) and len(self.cov_bounds) == 2):
            raise ValueError(f"cov_bounds must be a (low, high) pair, got {self.cov_bounds!r}")
        set_("cov_bounds", tuple(_number("cov_bounds", b) for b in self.cov_bounds))
        set_("kl_cov_coef", _number("kl_cov_coef", self.kl_cov_coef))
        if not (isinstance(self.vespo_params, (tuple, list)) and len(self.vespo_params) == 4):
            raise ValueError(f"vespo_params must be (k_pos, lambda_pos, k_neg, lambda_neg), got {self.vespo_params!r}")
        set_("vespo_params", tuple(_number("vespo_params", p) for p in self.vespo_params))
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")
        set_("off_policy_threshold", _number("off_policy_threshold", self.off_policy_threshold, allow_none=True))
        q = self.top_entropy_quantile
        if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0.0 <= q <= 1.0):
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {q!r}")
        set_("beta", _number("beta", self.beta))
        set_("entropy_coef", _number("entropy_coef", self.entropy_coef))
        if self.kl_estimator != "full":
            check_estimator(self.kl_estimator, "kl_estimator")
        check_kl_gradient(self.kl_gradient)
        if not isinstance(self.kl_ratio_weight, bool):
            raise ValueError(f"kl_ratio_weight must be a bool, got {self.kl_ratio_weight!r}")

    @property
    def row_elementwise(self) -> bool:
        """Whether a row's contribution depends on that row's inputs only (the one-pass chunked path)."""
        return (self.ratio_level == "token" and not OBJECTIVES[self.objective].cross_token
                and self.off_policy_threshold is None and self.top_entropy_quantile >= 1.0)

    def needs_generator_state(self) -> bool:
        return self.objective == "clip_cov"


def term_weights(terms: PolicyTerms, aggregation: Aggregation, mask: Tensor, dtype=torch.float32):
    """The aggregation weights [B, T] of the policy, KL and entropy terms (w_pg, w_kl, w_entropy); geo_mean
    aggregates its per-sequence losses as Σ_b L_b / B whatever ``loss_agg`` (verl)."""
    pg_agg = aggregation
    if terms.objective == "geo_mean":
        pg_agg = Aggregation("seq-mean-token-sum", empty_sequences="count", loss_scale=aggregation.loss_scale)
    w_pg = pg_agg.weights(mask, pg_agg.loss_agg, dtype)
    w_kl = aggregation.weights(mask, aggregation.kl_agg or aggregation.loss_agg, dtype) if terms.beta != 0.0 else None
    w_entropy = (aggregation.weights(mask, aggregation.entropy_agg or aggregation.loss_agg, dtype)
                 if terms.entropy_coef != 0.0 else None)
    return w_pg, w_kl, w_entropy


def default_generator(terms: PolicyTerms) -> PolicyTerms:
    """``terms`` with a generator seeded 0 when the objective draws at random and none was given
    (deterministic by default)."""
    if terms.needs_generator_state() and terms.generator is None:
        return dataclasses.replace(terms, generator=torch.Generator().manual_seed(0))
    return terms


# ----------------------------------------------------------------------------------------------------
# The per-token contributions
# ----------------------------------------------------------------------------------------------------
def log_importance_ratio(logp: Tensor, old_logp: Optional[Tensor], mask: Optional[Tensor], terms: PolicyTerms):
    """Clamped log r: token level x_t = logp − old (old None: sg(logp)); "sequence": the masked row mean of
    x (gradient to every token of the row); "sequence-token": sg(row mean) + logp − sg(logp)."""
    x = logp - (logp.detach() if old_logp is None else old_logp)
    if terms.ratio_level != "token":
        seq = _row_mean(x, mask.to(x.dtype))
        x = seq if terms.ratio_level == "sequence" else seq.detach() + logp - logp.detach()
    return clamp_to(x, terms.log_ratio_clamp)


def off_policy_sequence_mask(logp, sampling_logp, A, mask, threshold) -> Tensor:
    """TRL's off-policy mask: keep a sequence where A ≥ 0 or mean_t(sampling_logp − sg(logp)) ≤ threshold."""
    d = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    return ((A >= 0) | (_row_mean(d, mask.to(d.dtype)) <= threshold)).to(logp.dtype)


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """1 on the unmasked tokens whose entropy ≥ the (1 − ρ) quantile of the unmasked entropies."""
    e = entropy.detach()
    keep = mask != 0
    local = e[keep]
    if local.numel() == 0:
        return torch.zeros_like(e)
    return ((e >= _quantile(local.float(), 1.0 - top_quantile).to(e.dtype)) & keep).to(e.dtype)


def _quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) for 1-D x of any size (torch's is limited to 2^24)."""
    ordered = x.sort().values
    position = q * (x.numel() - 1)
    low = min(int(math.floor(position)), x.numel() - 1)
    high = min(low + 1, x.numel() - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


class Contributions(NamedTuple):
    per_token: Tensor  # weighted contributions [..]: their sum is the loss
    pg: Tensor  # weighted policy term
    kl: Optional[Tensor]  # per-token KL (× ρ), unweighted
    entropy_weights: Optional[Tensor]
    log_ratio: Tensor
    indicators: dict


def token_contributions(terms: PolicyTerms, logp: Tensor, entropy: Optional[Tensor], advantages: Tensor, *,
                        w_pg: Tensor, w_kl=None, w_entropy=None, old_logp=None, kl=None, ref_logp=None,
                        token_weights=None, sampling_logp=None, mask=None,
                        aggregation: Optional[Aggregation] = None) -> Contributions:
    """Per-token contributions (Σ = the loss) from per-token tensors of one shape (rows, or [B, T] with
    ``mask`` when ``terms`` is not row-elementwise).  ``kl`` is a given per-token KL (the sweep's exact one),
    else it is estimated from ``ref_logp``; ``w_*`` are the aggregation weights (``Aggregation.weights``).
    The constants (advantages, old_logp, ...) are 0 where the weights are 0."""
    dt = logp.dtype
    cast = lambda x: None if x is None else x.to(dt)  # noqa: E731
    A, old, weights = cast(advantages), cast(old_logp), cast(token_weights)
    log_ratio = log_importance_ratio(logp, old, mask, terms)
    objective = OBJECTIVES[terms.objective]
    ctx = _Context(A, logp, logp.detach() if old is None else old, log_ratio, mask, weights)
    pg, indicators = objective.fn(ctx, terms)
    multiplier = None
    if weights is not None and not objective.own_weights:
        multiplier = weights
    if terms.off_policy_threshold is not None:
        sampling = ctx.old_logp if sampling_logp is None else cast(sampling_logp)
        seq_mask = off_policy_sequence_mask(logp, sampling, A, mask, terms.off_policy_threshold)
        multiplier = seq_mask if multiplier is None else multiplier * seq_mask
    entropy_mask = None
    if terms.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy, mask, terms.top_entropy_quantile)
        multiplier = entropy_mask if multiplier is None else multiplier * entropy_mask
    if multiplier is not None:
        pg = pg * multiplier
    pg = _zeros_where(w_pg != 0, w_pg * pg)
    per_token = pg
    if terms.beta != 0.0 or kl is not None or ref_logp is not None:
        if kl is None and ref_logp is not None:
            kl = kl_estimate(logp, cast(ref_logp), terms.kl_estimator, terms.kl_log_ratio_clamp, terms.kl_value_clamp,
                             terms.kl_gradient, ctx.old_logp)
        if kl is not None and terms.kl_ratio_weight:
            kl = kl * torch.exp(log_ratio)
        if kl is not None and terms.beta != 0.0:
            per_token = per_token + _zeros_where(w_kl != 0, (terms.beta * w_kl) * kl)
    if entropy is not None and terms.entropy_coef != 0.0:
        if entropy_mask is not None and aggregation is not None and aggregation.entropy_agg == LOCAL_TOKEN_MEAN:
            w_entropy = aggregation.weights(mask.to(dt) * entropy_mask, LOCAL_TOKEN_MEAN, w_pg.dtype)
        per_token = per_token - _zeros_where(w_entropy != 0, (terms.entropy_coef * w_entropy) * entropy)
    return Contributions(per_token, pg, kl, w_entropy, log_ratio, indicators)
