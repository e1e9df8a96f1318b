"""f-divergences between a student p = softmax(student/T) and a teacher q = softmax(teacher/T), per token.

kinds: "forward_kl" KL(q‖p); "reverse_kl" KL(p‖q); "jsd" β·KL(q‖m) + (1−β)·KL(p‖m), m = βq + (1−β)p
(β=0 is forward KL and β=1 reverse KL, as in TRL's GKD); "tv" ½Σ|p−q|; "hellinger" Σ(√p−√q)²;
"chi2" Σ(p−q)²/q; "alpha" (Σ p^α q^(1−α) − 1)/(α(α−1)) (α→1 reverse KL, α→0 forward KL, evaluated
with expm1-based formulas that stay exact near both ends).

The KL kinds take one sweep over the vocabulary; the others a second sweep once both normalizers are
known; the backward is one recompute sweep (docs/vocab_stats.md).  Gradients flow to the student, and to
the teacher when it requires grad.
"""
from __future__ import annotations

import math

from . import _ops, _public, _validate
from .reference import vocab as ref

KIND_CODES = {"reverse_kl": 1, "forward_kl": 2, "jsd": 3, "tv": 4, "hellinger": 5, "chi2": 6, "alpha": 7}


def kernel_kind(kind: str, beta: float, alpha: float) -> tuple[int, float, float]:
    """Validate (kind, β, α) and map the KL end points of jsd and alpha onto the KL kinds."""
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {tuple(KIND_CODES)}, got {kind!r}")
    beta, alpha = float(beta), float(alpha)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] for kind='jsd', got {beta}")
        if beta == 0.0:
            return KIND_CODES["forward_kl"], beta, alpha
        if beta == 1.0:
            return KIND_CODES["reverse_kl"], beta, alpha
    if kind == "alpha":
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if alpha == 1.0:
            return KIND_CODES["reverse_kl"], beta, alpha
        if alpha == 0.0:
            return KIND_CODES["forward_kl"], beta, alpha
    return KIND_CODES[kind], beta, alpha


def divergence(student_logits, teacher_logits, *, kind="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0,
               targets=None, ignore_index=-100, backend="auto"):
    """Per-token divergence between softmax(student_logits/T) and softmax(teacher_logits/T).

    Args:
        student_logits, teacher_logits: [..., V], same shape and dtype (fp32/bf16/fp16; fp64 on cpu/torch).
        targets: optional [...] int64, used only to mask positions equal to ``ignore_index`` (output 0,
            no gradient there).
    Returns: [...] float32 (float64 for float64 inputs).
    """
    _validate.check_float("student_logits", student_logits)
    _validate.check_float("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has "
                         f"{tuple(student_logits.shape)}: they must match")
    _validate.check_same_dtype(student_logits=student_logits, teacher_logits=teacher_logits)
    _validate.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, targets=targets)
    code, beta, alpha = kernel_kind(kind, beta, alpha)
    T = _validate.check_temperature(temperature)
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    _validate.check_vocab("student_logits", v)
    t = _public.kernel_targets(targets, lead, v, ignore_index)
    be = _public.pick_backend(backend, student_logits, "divergence")
    if be == "torch":
        return ref.divergence(student_logits, teacher_logits, kind=kind, beta=beta, alpha=alpha, temperature=T,
                              targets=targets, ignore_index=ignore_index)
    stats = _ops.vocab_stats(_public.rows(student_logits, v), _public.rows(teacher_logits, v), t, 1.0 / T, code,
                             beta, alpha, False, be)
    return stats[:, _ops.STAT_DIV].reshape(lead)


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                      teacher_bias=None, kind="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0, targets=None,
                      ignore_index=-100, backend="auto"):
    """``divergence`` of student logits = student_hidden @ student_weight.T (+ bias) and the teacher's
    likewise, both models' tiles computed in the same vocabulary loop; [N, V] is never materialized.

    Shapes: student_hidden [..., Ds], student_weight [V, Ds], teacher_hidden [..., Dt], teacher_weight
    [V, Dt] (Ds and Dt may differ: a larger teacher is fine; the leading shapes and V must match).
    """
    ds, v = _public.check_linear("student_", student_hidden, student_weight, student_bias)
    dt, vt = _public.check_linear("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    if vt != v:
        raise ValueError(f"teacher_weight has V={vt} but student_weight has V={v}: the vocabularies must match")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden has leading shape {tuple(teacher_hidden.shape[:-1])} but student_hidden "
                         f"has {tuple(student_hidden.shape[:-1])}")
    _validate.check_same_dtype(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    _validate.check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                student_bias=student_bias, teacher_bias=teacher_bias, targets=targets)
    code, beta, alpha = kernel_kind(kind, beta, alpha)
    T = _validate.check_temperature(temperature)
    lead = student_hidden.shape[:-1]
    t = _public.kernel_targets(targets, lead, v, ignore_index)
    be = _public.pick_backend(backend, student_hidden, "linear_divergence", _public.LINEAR_BACKENDS)
    if be == "torch":
        return ref.linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                     student_bias=student_bias, teacher_bias=teacher_bias, kind=kind, beta=beta,
                                     alpha=alpha, temperature=T, targets=targets, ignore_index=ignore_index)
    stats = _ops.linear_vocab_stats(
        _public.rows(student_hidden, ds), student_weight.contiguous(),
        student_bias.contiguous() if student_bias is not None else None,
        _public.rows(teacher_hidden, dt), teacher_weight.contiguous(),
        teacher_bias.contiguous() if teacher_bias is not None else None,
        t, 1.0 / T, code, beta, alpha, False, be)
    return stats[:, _ops.STAT_DIV].reshape(lead)
