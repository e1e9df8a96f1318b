"""KL between policy and reference: the sampled-token estimators and the exact full-vocabulary KL."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ops, _public, _validate
from .reference import vocab as ref

#: estimator name -> code of the ``onepass::kl_penalty`` op; "<name>+" adds 8 (straight-through).
KL_ESTIMATOR_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
_STRAIGHT = 8


def estimator_code(estimator: str) -> int:
    straight = isinstance(estimator, str) and estimator.endswith("+")
    name = estimator[:-1] if straight else estimator
    if name not in KL_ESTIMATOR_CODES:
        names = tuple(KL_ESTIMATOR_CODES) + tuple(k + "+" for k in KL_ESTIMATOR_CODES)
        raise ValueError(f"estimator must be one of {names}, got {estimator!r}")
    return KL_ESTIMATOR_CODES[name] + (_STRAIGHT if straight else 0)


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return logp.to(dt) - ref_logp.to(dt)


def _value(x: Tensor, code: int) -> Tensor:
    base = code % _STRAIGHT
    if base == 0:
        return x
    if base == 1:
        return 0.5 * x * x
    if base == 2:
        return torch.exp(-x) + x - 1
    return x.abs()


@torch.library.custom_op("onepass::kl_penalty", mutates_args=())
def _kl_penalty_op(logp: Tensor, ref_logp: Tensor, code: int, clamp: float) -> Tensor:
    return _value(_log_ratio(logp, ref_logp).clamp(-clamp, clamp), code)


@_kl_penalty_op.register_fake
def _(logp, ref_logp, code, clamp):
    return torch.empty_like(logp, dtype=torch.float64 if logp.dtype == torch.float64 else torch.float32)


def _kl_setup(ctx, inputs, output):
    logp, ref_logp, code, clamp = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.code, ctx.clamp = code, clamp


def _kl_bwd(ctx, g):
    logp, ref_logp = ctx.saved_tensors
    raw = _log_ratio(logp, ref_logp)
    x = raw.clamp(-ctx.clamp, ctx.clamp)
    inside = raw.abs() <= ctx.clamp
    base = 1 if ctx.code >= _STRAIGHT else ctx.code
    if base == 0:
        d = torch.ones_like(x)
    elif base == 1:
        d = x
    elif base == 2:
        d = 1 - torch.exp(-x)
    else:
        d = torch.sign(x)
    gx = torch.where(inside, g * d, torch.zeros_like(d))
    g_logp = gx.to(logp.dtype) if ctx.needs_input_grad[0] else None
    g_ref = (-gx).to(ref_logp.dtype) if ctx.needs_input_grad[1] else None
    return g_logp, g_ref, None, None


_kl_penalty_op.register_autograd(_kl_bwd, setup_context=_kl_setup)


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
    code = estimator_code(estimator)
    clamp = math.inf if clamp is None else float(clamp)
    if not clamp > 0:
        raise ValueError(f"clamp must be > 0 (or None for no clamp), got {clamp}")
    return _kl_penalty_op(logp, ref_logp, code, clamp)


def linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                            temperature=1.0, ignore_index=-100, backend="auto"):
    """Policy and reference LM heads in one sweep over the vocabulary.

    Args:
        hidden [..., D], weight [V, D] (policy; differentiable), ref_hidden [..., Dr], ref_weight [V, Dr]
        (reference; never receives gradient), targets [...] int64, optional biases [V].
    Returns: dict of [...] float32 tensors: ``logp``, ``ref_logp``, ``entropy`` (of the policy) and
    ``kl_full`` = Σ_v p_v (log p_v − log q_v), the exact KL(policy‖reference) over the vocabulary.
    """
    d, v = _public.check_linear("", hidden, weight, bias)
    dr, vr = _public.check_linear("ref_", ref_hidden, ref_weight, ref_bias)
    if vr != v:
        raise ValueError(f"ref_weight has V={vr} but weight has V={v}: the vocabularies must match")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden has leading shape {tuple(ref_hidden.shape[:-1])} but hidden has "
                         f"{tuple(hidden.shape[:-1])}")
    _validate.check_same_dtype(hidden=hidden, ref_hidden=ref_hidden)
    _validate.check_same_device(hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                bias=bias, ref_bias=ref_bias, targets=targets)
    T = _validate.check_temperature(temperature)
    lead = hidden.shape[:-1]
    t = _public.kernel_targets(targets, lead, v, ignore_index)
    be = _public.pick_backend(backend, hidden, "linear_policy_ref_stats", _public.LINEAR_BACKENDS)
    if be == "torch":
        return ref.linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, targets, bias=bias,
                                           ref_bias=ref_bias, temperature=T, ignore_index=ignore_index)
    detach = lambda x: x.detach().contiguous() if x is not None else None  # noqa: E731
    stats = _ops.linear_vocab_stats(
        _public.rows(hidden, d), weight.contiguous(), bias.contiguous() if bias is not None else None,
        _public.rows(ref_hidden.detach(), dr), detach(ref_weight), detach(ref_bias),
        t, 1.0 / T, 1, 0.0, 0.0, True, be)
    cols = {"logp": _ops.STAT_LOGP_A, "ref_logp": _ops.STAT_LOGP_B, "entropy": _ops.STAT_ENTROPY,
            "kl_full": _ops.STAT_DIV}
    return {k: stats[:, c].reshape(lead) for k, c in cols.items()}
