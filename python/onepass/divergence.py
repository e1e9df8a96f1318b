"""f-divergences between a student p = softmax(student/T) and a teacher q = softmax(teacher/T), per token.

Each model's logits may be scaled and soft-capped first, inside the kernels: z = c·tanh(s·ℓ/c) with the
student's ``logit_scale`` s / ``logit_softcap`` c and the teacher's ``teacher_logit_scale`` /
``teacher_logit_softcap`` (independent; c = None is no cap), then divided by T.

kinds: "forward_kl" KL(q‖p); "reverse_kl" KL(p‖q); "jsd" β·KL(q‖m) + (1−β)·KL(p‖m), m = βq + (1−β)p
(β=0 is forward KL and β=1 reverse KL, as in TRL's GKD); "tv" ½Σ|p−q|; "hellinger" Σ(√p−√q)²;
"chi2" Σ(p−q)²/q; "alpha" (Σ p^α q^(1−α) − 1)/(α(α−1)) (α→1 reverse KL, α→0 forward KL, evaluated
with expm1-based formulas that stay exact near both ends).

The KL kinds take one sweep over the vocabulary; the others a second sweep once both normalizers are
known; the backward is one recompute sweep (docs/vocab_stats.md).  Gradients flow to the student, and to
the teacher when it requires grad.
"""
from __future__ import annotations

from . import _dispatch, _validate
from ._contract import kernel_kind
from ._ops.vocab_stats import linear_vocab_stats, vocab_stats


def divergence(student_logits, teacher_logits, *, kind="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0,
               targets=None, ignore_index=-100, logit_softcap=None, logit_scale=1.0, teacher_logit_softcap=None,
               teacher_logit_scale=1.0, backend="auto"):
    """Per-token divergence between softmax(student_logits/T) and softmax(teacher_logits/T).

    Args:
        student_logits, teacher_logits: [..., V], same shape and dtype (fp32/bf16/fp16; fp64 on cpu/torch).
        targets: optional [...] int64, used only to mask positions equal to ``ignore_index`` (output 0,
            no gradient there).
        logit_softcap, logit_scale: the student's cap c (None = none) and scale s: z = c·tanh(s·ℓ/c);
        teacher_logit_softcap, teacher_logit_scale: the teacher's.
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
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale, teacher_logit_softcap,
                                    teacher_logit_scale, "teacher_")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    _validate.check_vocab("student_logits", v)
    t = _validate.kernel_targets(targets, lead, v, ignore_index)
    be = _dispatch.resolve_backend(backend, student_logits, "vocab_stats", "divergence")
    return vocab_stats(student_logits, teacher_logits, targets=t, logit_map=logit_map, kind=code, beta=beta,
                       alpha=alpha, backend=be).div


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                      teacher_bias=None, kind="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0, targets=None,
                      ignore_index=-100, logit_softcap=None, logit_scale=1.0, teacher_logit_softcap=None,
                      teacher_logit_scale=1.0, backend="auto"):
    """``divergence`` of student logits = student_hidden @ student_weight.T (+ bias) and the teacher's
    likewise, both models' tiles computed in the same vocabulary loop; [N, V] is never materialized.

    Shapes: student_hidden [..., Ds], student_weight [V, Ds], teacher_hidden [..., Dt], teacher_weight
    [V, Dt] (Ds and Dt may differ: a larger teacher is fine; the leading shapes and V must match).
    Soft-cap and scale keywords as ``divergence``.
    """
    _, v = _validate.check_linear("student_", student_hidden, student_weight, student_bias)
    _validate.check_second_model("teacher_", teacher_hidden, teacher_weight, teacher_bias, "student_", student_hidden,
                                 v)
    _validate.check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                student_bias=student_bias, teacher_bias=teacher_bias, targets=targets)
    code, beta, alpha = kernel_kind(kind, beta, alpha)
    logit_map = _validate.logit_map(temperature, logit_softcap, logit_scale, teacher_logit_softcap,
                                    teacher_logit_scale, "teacher_")
    lead = student_hidden.shape[:-1]
    t = _validate.kernel_targets(targets, lead, v, ignore_index)
    be = _dispatch.resolve_backend(backend, student_hidden, "vocab_stats", "linear_divergence")
    return linear_vocab_stats(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias, targets=t, logit_map=logit_map, kind=code, beta=beta, alpha=alpha,
                              backend=be).div
