"""TRL (1.16) at the log-prob level: one line before ``trainer.train()``::

    import onepass.integrations.trl as onepass_trl
    onepass_trl.patch(trainer)          # GRPOTrainer, RLOOTrainer, DPOTrainer, KTOTrainer, DistillationTrainer

Where TRL computes what the patch replaces (read from the installed trl 1.16):

* ``GRPOTrainer`` / ``RLOOTrainer`` / ``DPOTrainer`` / ``KTOTrainer`` wrap the policy (and reference) with
  ``trl.trainer.utils.add_fused_lm_head``; ``model(..., fused_lm_head=True)`` runs the backbone, then
  ``trl.kernels.ChunkedLogProbFunction`` on the last hidden states and the LM-head weight.  The patch swaps
  that one function (module attribute ``trl.trainer.utils._ChunkedLogProbFunction``) for onepass's fused
  ``linear_token_logprobs`` (log-probs and entropy in one vocabulary sweep, differentiable in both).  The
  backbone forward, the prompt/completion split, ``logits_to_keep``, padding, PEFT unwrapping, gradient
  checkpointing, FSDP2 / ZeRO-3 gathering of the head, MoE aux losses and every loss type stay TRL's own.
* ``DistillationTrainer`` computes its generalized JSD with
  ``trl.trainer.distillation_trainer._chunked_divergence_loss``; the patch swaps that function for
  ``onepass.linear_divergence(kind="jsd")`` (both heads in one sweep), plus a no-grad entropy sweep of the
  student for the ``entropy`` metric.

The swap is process-wide (every trainer of the process that uses these functions gets onepass) until
``unpatch()``.  A final-logit soft-cap (Gemma 2/3) and a logit scale (Cohere, Granite, ...) are applied inside
the onepass ops, in TRL's order c·tanh(s·z/c) / T.  What cannot be reproduced exactly is refused with
``UnsupportedOption`` naming the option: a non-positive logit scale or soft-cap, a PEFT adapter on ``lm_head``, DPO's
``use_weighting`` (WPO needs Σ p², which the fused op does not compute), and trainers other than the ones
above (e.g. ``trl.experimental.gkd.GKDTrainer``, which materializes both models' logits itself).
"""
from __future__ import annotations

import torch

import onepass

from ._common import (UnsupportedOption, check_logit_postprocessing, fused_token_logprobs, logit_postprocessing,
                      mean_scaled_logits, output_head, refuse, target_is_argmax, unwrap_peft)

__all__ = ["UnsupportedOption", "patch", "unpatch", "is_patched", "OnepassLogProbFunction",
           "onepass_chunked_divergence_loss"]

# Per-token fields of TRL's FusedCausalLMOutput the patched head computes: "mean_logits" and "is_top1" are
# no-grad metrics (exact mean through weight.mean(0); arg-max over vocabulary tiles).
SUPPORTED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")

_FUSED_HEAD_TRAINERS = ("GRPOTrainer", "RLOOTrainer", "DPOTrainer", "KTOTrainer")
_DIVERGENCE_TRAINERS = ("DistillationTrainer",)

_originals: dict[str, object] = {}


class OnepassLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction`` (same ``apply`` arguments and 5-tuple result).

    ``apply(hidden [N, D], weight [V, D], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=("log_probs",))`` returns (log_probs, entropy,
    log_sum_sq_probs, mean_logits, is_top1), each [N] float32 or None when not requested, with
    z = c·tanh(s·(hidden @ weight.T + bias)/c) / temperature (s = logit_scale, c = final_logit_softcapping;
    without a cap s·(hidden @ weight.T + bias) / temperature), log_probs = z[y] − logsumexp(z) and
    entropy = logsumexp(z) − Σ softmax(z)·z, both differentiable.  ``chunk_size`` is TRL's tiling knob; onepass
    tiles on its own, so it is ignored.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        unknown = [name for name in outputs if name not in SUPPORTED_OUTPUTS]
        if unknown:
            raise refuse(f"fused LM head outputs {unknown}",
                         f"the onepass head computes {SUPPORTED_OUTPUTS} (DPO's use_weighting needs log_sum_sq_probs)")
        logit_scale = 1.0 if logit_scale is None else float(logit_scale)
        check_logit_postprocessing(logit_scale, final_logit_softcapping, "")
        want_entropy = "entropy" in outputs
        result = fused_token_logprobs(hidden, weight, bias, targets, temperature=temperature,
                                      logit_scale=logit_scale, logit_softcap=final_logit_softcapping,
                                      return_entropy=want_entropy)
        log_probs, entropy = result if want_entropy else (result, None)
        mean_logits = (mean_scaled_logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale,
                                          logit_softcap=final_logit_softcapping)
                       if "mean_logits" in outputs else None)
        is_top1 = target_is_argmax(hidden, weight, bias, targets) if "is_top1" in outputs else None
        return log_probs, entropy, None, mean_logits, is_top1


def onepass_chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                                    teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                                    student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                                    teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                                    teacher_final_logit_softcapping=None, temperature=1.0):
    """Drop-in for ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (same arguments and result).

    student_hidden_states [B, K, Ds], teacher_hidden_states [B, K, Dt], weights [V, Ds] / [V, Dt],
    completion_mask [B, K].  Per valid position, with p = softmax(f_s(z_s) / T) (student), q = softmax(f_t(z_t) / T)
    (teacher), f(z) = c·tanh(s·z/c) (s·z without a cap) with each model's scale s and soft-cap c, and
    m = β·q + (1 − β)·p: β·KL(q‖m) + (1 − β)·KL(p‖m) (β=0 forward KL(q‖p), β=1 reverse KL(p‖q)).
    Returns (loss = Σ divergence / (num_items_in_batch or the valid count), Σ student entropy (no grad),
    valid count).  Gradient flows to the student only.
    """
    check_logit_postprocessing(student_logit_scale, student_final_logit_softcapping, "student ")
    check_logit_postprocessing(teacher_logit_scale, teacher_final_logit_softcapping, "teacher ")
    student_weight, student_bias = _full(student_lm_head_weight), _full(student_lm_head_bias)
    teacher_weight, teacher_bias = _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    student = student_hidden_states.reshape(-1, student_hidden_states.size(-1))[valid].to(student_weight.dtype)
    teacher = teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1))[valid].detach()
    teacher = teacher.to(student.dtype)
    teacher_weight = teacher_weight.detach().to(student.dtype)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach().to(student.dtype)
    divergence = onepass.linear_divergence(
        student, student_weight, teacher, teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
        kind="jsd", beta=float(beta), temperature=float(temperature), logit_scale=float(student_logit_scale),
        logit_softcap=student_final_logit_softcapping, teacher_logit_scale=float(teacher_logit_scale),
        teacher_logit_softcap=teacher_final_logit_softcapping)
    with torch.no_grad():
        _, entropy = fused_token_logprobs(student, student_weight, student_bias,
                                          torch.zeros(student.shape[0], dtype=torch.long, device=student.device),
                                          temperature=temperature, logit_scale=student_logit_scale,
                                          logit_softcap=student_final_logit_softcapping, return_entropy=True)
    loss = divergence.sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy.sum(), n_valid


def _full(tensor):
    """A sharded FSDP2 parameter (DTensor) gathered once into a plain tensor; anything else unchanged."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _check_model(model, role: str) -> None:
    if model is None:
        return
    base = unwrap_peft(model)
    scale, softcap = logit_postprocessing(base.config)
    check_logit_postprocessing(scale, softcap, f"{role}.config.")
    output_head(model)


def patch(trainer):
    """Route ``trainer``'s per-token log-probs (or its distillation divergence) through onepass; see the module
    docstring for what changes and what is refused.  Call before ``trainer.train()``; returns ``trainer``."""
    import trl.trainer.distillation_trainer as distillation
    import trl.trainer.utils as trl_utils

    kind = type(trainer).__mro__
    names = {cls.__name__ for cls in kind if cls.__module__.startswith("trl.")}
    if not names & set(_FUSED_HEAD_TRAINERS + _DIVERGENCE_TRAINERS):
        raise refuse(type(trainer).__name__,
                     f"supported trainers are {_FUSED_HEAD_TRAINERS + _DIVERGENCE_TRAINERS}")
    args = trainer.args
    if getattr(args, "use_weighting", False):
        raise refuse("use_weighting=True", "WPO weights need log Σ p², which the onepass head does not compute")
    _check_model(trainer.model, "model")
    _check_model(getattr(trainer, "ref_model", None), "ref_model")
    _check_model(getattr(trainer, "teacher_model", None), "teacher_model")

    if names & set(_FUSED_HEAD_TRAINERS):
        _swap(trl_utils, "_ChunkedLogProbFunction", OnepassLogProbFunction)
    else:
        _swap(distillation, "_chunked_divergence_loss", onepass_chunked_divergence_loss)
    return trainer


def _swap(module, name: str, replacement) -> None:
    key = f"{module.__name__}.{name}"
    if key not in _originals:
        _originals[key] = getattr(module, name)
    setattr(module, name, replacement)


def unpatch() -> None:
    """Restore TRL's own functions (every patch of this process)."""
    import importlib

    for key, original in _originals.items():
        module_name, name = key.rsplit(".", 1)
        setattr(importlib.import_module(module_name), name, original)
    _originals.clear()


def is_patched() -> bool:
    return bool(_originals)
