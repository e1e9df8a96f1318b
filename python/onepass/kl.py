"""KL between policy and reference: the sampled-token estimators and the exact full-vocabulary KL."""
from __future__ import annotations

import math

import torch

from . import _dispatch, _validate
from ._contract import Kind, VocabStats
from ._ops.vocab_stats import linear_vocab_stats

#: Sampled-token estimators of KL(policy‖reference) as functions of the log-ratio x = logp − ref_logp.
KL_ESTIMATORS = {
    "k1": lambda x: x,
    "k2": lambda x: 0.5 * x * x,
    "k3": lambda x: torch.expm1(-x) + x,  # exp(−x) − 1 + x, without cancellation near x = 0
    "abs": torch.abs,
}
#: verl's names of the estimators (``kl_loss_type``).
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
#: How the estimate's gradient is taken: of the formula, of x²/2 (straight-through, verl's "+"), or of
#: w·x²/2 with w = sg(min(exp(logp − old_logp), 10)) (OpenRLHF's ``unbiased_gradient``).
KL_GRADIENTS = ("estimator", "k2", "k2_is")
#: OpenRLHF's cap on the importance weight of ``kl_gradient="k2_is"``.
KL_IS_WEIGHT_CAP = 10.0


def check_estimator(estimator: str, name: str = "estimator") -> None:
    base = estimator[:-1] if isinstance(estimator, str) and estimator.endswith("+") else estimator
    if not isinstance(base, str) or KL_ALIASES.get(base, base) not in KL_ESTIMATORS:
        names = tuple(KL_ESTIMATORS) + tuple(KL_ALIASES)
        raise ValueError(f"{name} must be one of {names} (optionally with a '+' suffix), got {estimator!r}")


def check_bounds(name: str, bounds) -> tuple[float, float]:
    """A clamp given as None (none), a number c > 0 (±c) or a (low, high) pair (None: unbounded), as
    (low, high) floats."""
    if bounds is None:
        return (-math.inf, math.inf)
    if isinstance(bounds, (int, float)) and not isinstance(bounds, bool):
        if not bounds > 0:
            raise ValueError(f"{name} must be > 0, a (low, high) pair or None, got {bounds!r}")
        return (-float(bounds), float(bounds))
    if isinstance(bounds, (tuple, list)) and len(bounds) == 2:
        low = -math.inf if bounds[0] is None else bounds[0]
        high = math.inf if bounds[1] is None else bounds[1]
        if all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)) and low < high:
            return (float(low), float(high))
    raise ValueError(f"{name} must be a number > 0, a (low, high) pair with low < high, or None; got {bounds!r}")


def clamp_to(x, bounds: tuple[float, float]):
    """x clamped to (low, high) (infinite bounds skipped, so the gradient passes unchanged)."""
    low, high = bounds
    if low == -math.inf and high == math.inf:
        return x
    return x.clamp(None if low == -math.inf else low, None if high == math.inf else high)


def kl_estimate(logp, ref_logp, estimator: str, clamp=(-20.0, 20.0), value_clamp=(-math.inf, math.inf),
                gradient: str = "estimator", old_logp=None):
    """``kl_penalty`` without argument checks (the losses call it per token; bounds as (low, high))."""
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    if estimator.endswith("+"):
        estimator, gradient = estimator[:-1], "k2"
    raw = logp.to(dt) - ref_logp.to(dt)
    value = clamp_to(KL_ESTIMATORS[KL_ALIASES.get(estimator, estimator)](clamp_to(raw, clamp)), value_clamp)
    if gradient == "estimator":
        return value
    surrogate = KL_ESTIMATORS["k2"](clamp_to(raw, clamp) if gradient == "k2" else raw)
    if gradient == "k2_is" and old_logp is not None:
        surrogate = surrogate * torch.exp(logp.to(dt) - old_logp.to(dt)).clamp(max=KL_IS_WEIGHT_CAP).detach()
    return value.detach() + surrogate - surrogate.detach()


def check_kl_gradient(gradient) -> None:
    if gradient not in KL_GRADIENTS:
        raise ValueError(f"kl_gradient must be one of {KL_GRADIENTS}, got {gradient!r}")


def kl_penalty(logp, ref_logp, *, estimator="k3", clamp=20.0, value_clamp=None, gradient="estimator",
               old_logp=None):
    """Per-token KL estimate from sampled-token log-probs (verl/OpenRLHF conventions).

    x = clamp(logp − ref_logp) (clamped before any exp, so no inf/NaN even at ±1000; ``clamp`` is c for
    ±c, a (low, high) pair, or None): "k1" (verl "kl"): x, "k2" ("mse"): x²/2, "k3" ("low_var_kl"):
    exp(−x) + x − 1 (as expm1(−x) + x: exact for tiny |x| in float32), "abs": |x|; the value then
    clamped to ``value_clamp`` (verl's k3 and OpenRLHF: 10).  ``gradient``: "estimator" (of the formula),
    "k2" (the value of the estimator with the gradient of x²/2, straight-through; same as the "<name>+"
    names) or "k2_is" (gradient of w·(logp − ref_logp)²/2, w = sg(min(exp(logp − old_logp), 10)),
    OpenRLHF's unbiased gradient; ``old_logp`` None: w = 1).  The gradient is 0 where x is clamped.

    Args: logp, ref_logp (and old_logp) [...] float (same shape).  Returns [...] float32 (float64 for
    float64 input).
    """
    _validate.check_float("logp", logp, min_dim=0)
    _validate.check_float("ref_logp", ref_logp, min_dim=0)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)} but logp has {tuple(logp.shape)}")
    if old_logp is not None:
        _validate.check_float("old_logp", old_logp, min_dim=0)
        if old_logp.shape != logp.shape:
            raise ValueError(f"old_logp has shape {tuple(old_logp.shape)} but logp has {tuple(logp.shape)}")
    _validate.check_same_device(logp=logp, ref_logp=ref_logp, old_logp=old_logp)
    check_estimator(estimator)
    check_kl_gradient(gradient)
    return kl_estimate(logp, ref_logp, estimator, check_bounds("clamp", clamp),
                       check_bounds("value_clamp", value_clamp), gradient, old_logp)


def linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                            temperature=1.0, ignore_index=-100, logit_softcap=None, logit_scale=1.0,
                            ref_logit_softcap=None, ref_logit_scale=1.0, backend="auto"):
    """Policy and reference LM heads in one sweep over the vocabulary.

    Args:
        hidden [..., D], weight [V, D] (policy; differentiable), ref_hidden [..., Dr], ref_weight [V, Dr]
        (reference; never receives gradient), targets [...] int64, optional biases [V].
        logit_softcap, logit_scale (policy) and ref_logit_softcap, ref_logit_scale (reference): each
        model's logits become c·tanh(s·ℓ/c) (c = None: s·ℓ) before the temperature.
    Returns: dict of [...] float32 tensors: ``logp``, ``ref_logp``, ``entropy`` (of the policy) and
    ``kl_full`` = Σ_v p_v (log p_v − log q_v), the exact KL(policy‖reference) over the vocabulary.
    """
    _, v = _validate.check_linear("", hidden, weight, bias)
    _validate.check_second_model("ref_", ref_hidden, ref_weight, ref_bias, "", hidden, v)
    _validate.check_same_device(hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                bias=bias, ref_bias=ref_bias, targets=targets)
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale, ref_logit_softcap, ref_logit_scale,
                                    "ref_")
    lead = hidden.shape[:-1]
    t = _validate.kernel_targets(targets, lead, v, ignore_index)
    be = _dispatch.resolve_backend(backend, hidden, "vocab_stats", "linear_policy_ref_stats")
    stats = linear_vocab_stats(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                               ref_bias.detach() if ref_bias is not None else None, targets=t, logit_map=logit_map,
                               kind=Kind.REVERSE_KL, need_entropy=True, backend=be)
    return policy_ref_outputs(stats)


def policy_ref_outputs(stats: VocabStats) -> dict:
    """``linear_policy_ref_stats``'s outputs from the policy (a) / reference (b) stats with ``Kind.REVERSE_KL``."""
    return {"logp": stats.logp_a, "ref_logp": stats.logp_b, "entropy": stats.entropy, "kl_full": stats.div}
