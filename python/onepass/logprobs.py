"""Per-token log-probs of sampled tokens and entropy, from logits or fused with the LM head.

    logp = z[y] − logsumexp(z),  entropy = logsumexp(z) − Σ softmax(z)·z,  z = cap(s·ℓ) / T

with ℓ the raw logits, s = ``logit_scale`` and cap(x) = c·tanh(x/c) for ``logit_softcap`` c (identity
when None), all applied inside the kernels.

Path: these functions -> ``onepass._ops.vocab_stats`` -> the backend's vocab-stats launchers
(docs/architecture.md).
NaN policy: a NaN logit makes that row's outputs NaN and leaves every other row untouched.
"""
from __future__ import annotations

from . import _dispatch, _validate
from ._ops.vocab_stats import linear_vocab_stats, vocab_stats


def _outputs(stats, return_entropy):
    return (stats.logp_a, stats.entropy) if return_entropy else stats.logp_a


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False, logit_softcap=None,
                   logit_scale=1.0, backend="auto"):
    """Log-probability of ``targets`` under softmax(cap(s·logits) / T), optionally with the entropy.

    Args:
        logits: [..., V] float32/bfloat16/float16 (float64 on the cpu/torch backends).
        targets: [...] int64, each in [0, V) or ``ignore_index``.
        logit_softcap: None, or c > 0: the logits become c·tanh(s·ℓ/c) (Gemma-2's final soft-cap) before
            the temperature; logit_scale: s > 0, multiplies the raw logits ℓ first (Cohere-style).
    Returns:
        logp [...] float32 (float64 for float64 logits), or (logp, entropy) with ``return_entropy``.
        Ignored positions give 0 and receive no gradient.  Differentiable w.r.t. ``logits``.
    """
    _validate.check_float("logits", logits)
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale)
    _validate.check_same_device(logits=logits, targets=targets)
    lead, v = logits.shape[:-1], logits.shape[-1]
    _validate.check_vocab("logits", v)
    t = _validate.check_targets(targets, lead, v, ignore_index)
    be = _dispatch.resolve_backend(backend, logits, "vocab_stats", "token_logprobs")
    stats = vocab_stats(logits, targets=t, logit_map=logit_map, need_entropy=return_entropy, backend=be)
    return _outputs(stats, return_entropy)


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, logit_softcap=None, logit_scale=1.0, backend="auto"):
    """``token_logprobs`` of logits = hidden @ weight.T (+ bias), never materializing [N, V].

    Args:
        hidden: [..., D]; weight: [V, D] (``nn.Linear(D, V).weight``); bias: [V] or None; same dtype.
        targets: [...] int64.
        logit_softcap, logit_scale: as ``token_logprobs``, on the logits computed in the kernel.
    Returns: as ``token_logprobs``; differentiable w.r.t. hidden, weight and bias.
    """
    _, v = _validate.check_linear("", hidden, weight, bias)
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale)
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    lead = hidden.shape[:-1]
    t = _validate.check_targets(targets, lead, v, ignore_index)
    be = _dispatch.resolve_backend(backend, hidden, "vocab_stats", "linear_token_logprobs")
    stats = linear_vocab_stats(hidden, weight, bias, targets=t, logit_map=logit_map, need_entropy=return_entropy,
                               backend=be)
    return _outputs(stats, return_entropy)
