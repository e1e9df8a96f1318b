"""Per-token log-probs of sampled tokens and entropy, from logits or fused with the LM head.

    logp = z[y] − logsumexp(z),  entropy = logsumexp(z) − Σ softmax(z)·z,  z = logits / T

Path: kernels (``triton_kernels/vocab_stats.py``, ``csrc/cpu|cuda/vocab_stats``) -> launchers ->
custom ops ``onepass::vocab_stats`` / ``onepass::linear_vocab_stats`` (``_ops.py``) -> these functions.
NaN policy: a NaN logit makes that row's outputs NaN and leaves every other row untouched.
"""
from __future__ import annotations

from . import _ops, _public, _validate
from .reference import vocab as ref


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False, backend="auto"):
    """Log-probability of ``targets`` under softmax(logits / T), optionally with the entropy.

    Args:
        logits: [..., V] float32/bfloat16/float16 (float64 on the cpu/torch backends).
        targets: [...] int64, each in [0, V) or ``ignore_index``.
    Returns:
        logp [...] float32 (float64 for float64 logits), or (logp, entropy) with ``return_entropy``.
        Ignored positions give 0 and receive no gradient.  Differentiable w.r.t. ``logits``.
    """
    _validate.check_float("logits", logits)
    T = _validate.check_temperature(temperature)
    _validate.check_same_device(logits=logits, targets=targets)
    lead, v = logits.shape[:-1], logits.shape[-1]
    _validate.check_vocab("logits", v)
    t = _public.kernel_targets(targets, lead, v, ignore_index)
    be = _public.pick_backend(backend, logits, "token_logprobs")
    if be == "torch":
        return ref.token_logprobs(logits, targets, temperature=T, ignore_index=ignore_index,
                                  return_entropy=return_entropy)
    stats = _ops.vocab_stats(_public.rows(logits, v), None, t, 1.0 / T, 0, 0.0, 0.0, bool(return_entropy), be)
    logp = stats[:, _ops.STAT_LOGP_A].reshape(lead)
    if not return_entropy:
        return logp
    return logp, stats[:, _ops.STAT_ENTROPY].reshape(lead)


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, backend="auto"):
    """``token_logprobs`` of logits = hidden @ weight.T (+ bias), never materializing [N, V].

    Args:
        hidden: [..., D]; weight: [V, D] (``nn.Linear(D, V).weight``); bias: [V] or None; same dtype.
        targets: [...] int64.
    Returns: as ``token_logprobs``; differentiable w.r.t. hidden, weight and bias.
    """
    d, v = _public.check_linear("", hidden, weight, bias)
    T = _validate.check_temperature(temperature)
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    lead = hidden.shape[:-1]
    t = _public.kernel_targets(targets, lead, v, ignore_index)
    be = _public.pick_backend(backend, hidden, "linear_token_logprobs", _public.LINEAR_BACKENDS)
    if be == "torch":
        return ref.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=T,
                                         ignore_index=ignore_index, return_entropy=return_entropy)
    stats = _ops.linear_vocab_stats(_public.rows(hidden, d), weight.contiguous(),
                                    bias.contiguous() if bias is not None else None, None, None, None, t,
                                    1.0 / T, 0, 0.0, 0.0, bool(return_entropy), be)
    logp = stats[:, _ops.STAT_LOGP_A].reshape(lead)
    if not return_entropy:
        return logp
    return logp, stats[:, _ops.STAT_ENTROPY].reshape(lead)
