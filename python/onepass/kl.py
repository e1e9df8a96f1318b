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


def check_estimator(estimator: str, name: str = "estimator") -> None:
    base = estimator[:-1] if isinstance(estimator, str) and estimator.endswith("+") else estimator
    if not isinstance(base, str) or base not in KL_ESTIMATORS:
        names = tuple(KL_ESTIMATORS) + tuple(k + "+" for k in KL_ESTIMATORS)
        raise ValueError(f"{name} must be one of {names}, got {estimator!r}")


def kl_estimate(logp, ref_logp, estimator: str, clamp: float = 20.0):
    """``kl_penalty`` without argument checks (the losses call it per token)."""
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    x = (logp.to(dt) - ref_logp.to(dt)).clamp(-clamp, clamp)
    if not estimator.endswith("+"):
        return KL_ESTIMATORS[estimator](x)
    k2 = KL_ESTIMATORS["k2"](x)
    return k2 + (KL_ESTIMATORS[estimator[:-1]](x) - k2).detach()


def kl_penalty(logp, ref_logp, *, estimator="k3", clamp=20.0):
    """Per-token KL estimate from sampled-token log-probs (verl/OpenRLHF conventions).

    x = clamp(logp − ref_logp, −clamp, clamp) (clamped before any exp, so no inf/NaN even at ±1000):
    "k1": x, "k2": x²/2, "k3": exp(−x) + x − 1, "abs": |x|; "<name>+": the value of <name> with the
    gradient of k2 (straight-through).  The gradient is 0 where the log-ratio is clamped.

    Args: logp, ref_logp [...] float (same shape).  Returns [...] float32 (float64 for float64 input).
    """
    _validate.check_float("logp", logp, min_dim=0)
    _validate.check_float("ref_logp", ref_logp, min_dim=0)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)} but logp has {tuple(logp.shape)}")
    _validate.check_same_device(logp=logp, ref_logp=ref_logp)
    check_estimator(estimator)
    clamp = math.inf if clamp is None else float(clamp)
    if not clamp > 0:
        raise ValueError(f"clamp must be > 0 (or None for no clamp), got {clamp}")
    return kl_estimate(logp, ref_logp, estimator, clamp)


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
