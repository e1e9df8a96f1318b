"""Per-token log-probs of sampled tokens and entropy, from logits or fused with the LM head.

    logp = z[y] − logsumexp(z),  entropy = logsumexp(z) − Σ softmax(z)·z,  z = logits / T

Path: these functions -> ``onepass._ops.vocab_stats`` -> the backend's vocab-stats launchers
(docs/architecture.md).
NaN policy: a NaN logit makes that row's outputs NaN and leaves every other row untouched.
"""
from __future__ import annotations

from . import _dispatch, _validate
from ._ops.vocab_stats import linear_vocab_stats, vocab_stats


def _outputs(stats, return_entropy):
    return (stats.logp_a, stats.entropy) if return_entropy else stats.logp_a


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
    t = _validate.check_targets(targets, lead, v, ignore_index)
    be = _dispatch.resolve_backend(backend, logits, "vocab_stats", "token_logprobs")
    stats = vocab_stats(logits, targets=t, inv_temp=1.0 / T, need_entropy=return_entropy, backend=be)
    return _outputs(stats, return_entropy)


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, backend="auto"):
    """``token_logprobs`` of logits = hidden @ weight.T (+ bias), never materializing [N, V].

    Args:
        hidden: [..., D]; weight: [V, D] (``nn.Linear(D, V).weight``); bias: [V] or None; same dtype.
        targets: [...] int64.
    Returns: as ``token_logprobs``; differentiable w.r.t. hidden, weight and bias.
    """
    _, v = _validate.check_linear("", hidden, weight, bias)
    T = _validate.check_temperature(temperature)
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    lead = hidden.shape[:-1]
    t = _validate.check_targets(targets, lead, v, ignore_index)
    be = _dispatch.resolve_backend(backend, hidden, "vocab_stats", "linear_token_logprobs")
    stats = linear_vocab_stats(hidden, weight, bias, targets=t, inv_temp=1.0 / T, need_entropy=return_entropy,
                               backend=be)
    return _outputs(stats, return_entropy)
