"""``torch.nn.Module`` wrappers of the onepass functions.

Each module stores the keyword arguments of its function at construction and passes them on every
call; ``forward`` takes the tensors (and, for the losses, per-call keyword overrides)::

    head_logprobs = onepass.nn.LinearTokenLogprobs(temperature=0.7, return_entropy=True)
    logp, entropy = head_logprobs(hidden, lm_head.weight, targets)

    loss_fn = onepass.nn.GRPOLoss(beta=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean")
    loss, metrics = loss_fn(hidden, lm_head.weight, targets, advantages, mask, ref_logp=ref_logp)

The modules hold no parameters or buffers: the LM-head weight is passed to ``forward`` (typically
``model.lm_head.weight``), so they work with any parameter sharing / sharding scheme.  Argument checks
happen in the wrapped functions, at call time (a bad keyword given at construction raises on the first
call, with the same message as the function).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .divergence import divergence as _divergence
from .divergence import linear_divergence as _linear_divergence
from .logprobs import linear_token_logprobs as _linear_token_logprobs
from .logprobs import token_logprobs as _token_logprobs
from .losses import grpo_loss as _grpo_loss
from .losses import opd_loss as _opd_loss

__all__ = ["LinearTokenLogprobs", "TokenLogprobs", "GRPOLoss", "OPDLoss", "Divergence", "LinearDivergence",
           "SinkhornDistance"]


class _KwargsModule(torch.nn.Module):
    """Stores keyword arguments (``self.kwargs``) merged with per-call overrides."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = dict(kwargs)

    def _merged(self, overrides: dict) -> dict:
        return {**self.kwargs, **overrides} if overrides else dict(self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if not isinstance(v, Tensor))


class TokenLogprobs(_KwargsModule):
    """Module form of :func:`onepass.token_logprobs`.

    Args (stored): ``temperature=1.0``, ``ignore_index=-100``, ``return_entropy=False``, ``logit_softcap=None``,
    ``logit_scale=1.0``, ``backend="auto"``.
    ``forward(logits [..., V], targets [...])`` -> logp [...] float32, or (logp, entropy).
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 logit_softcap: float | None = None, logit_scale: float = 1.0, backend: str = "auto") -> None:
        super().__init__(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
                         logit_softcap=logit_softcap, logit_scale=logit_scale, backend=backend)

    def forward(self, logits: Tensor, targets: Tensor):
        return _token_logprobs(logits, targets, **self.kwargs)


class LinearTokenLogprobs(_KwargsModule):
    """Module form of :func:`onepass.linear_token_logprobs`: log-probs (and entropy) of ``targets`` under
    softmax((hidden @ weight.T + bias) / T) without materializing the [N, V] logits.

    Args (stored): ``temperature=1.0``, ``ignore_index=-100``, ``return_entropy=False``, ``logit_softcap=None``,
    ``logit_scale=1.0``, ``backend="auto"``.
    ``forward(hidden [..., D], weight [V, D], targets [...], bias=None)`` -> logp [...] float32, or
    (logp, entropy) with ``return_entropy=True``.  Differentiable w.r.t. hidden, weight and bias.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 logit_softcap: float | None = None, logit_scale: float = 1.0, backend: str = "auto") -> None:
        super().__init__(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
                         logit_softcap=logit_softcap, logit_scale=logit_scale, backend=backend)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None):
        return _linear_token_logprobs(hidden, weight, targets, bias=bias, **self.kwargs)


class GRPOLoss(_KwargsModule):
    """Module form of :func:`onepass.grpo_loss` (fused GRPO / PPO-clip loss from hidden states).

    Any keyword argument of ``grpo_loss`` except the tensors is stored at construction, e.g.
    ``GRPOLoss(beta=0.04, kl_estimator="k3", epsilon_low=0.2, epsilon_high=0.28, loss_agg="token-mean",
    entropy_coef=0.0, temperature=1.0, dual_clip=None, logit_softcap=None, logit_scale=1.0,
    ref_logit_softcap=None, ref_logit_scale=1.0, backend="auto")``.

    ``forward(hidden [B, T, D], weight [V, D], targets [B, T], advantages [B] or [B, T], mask [B, T],
    **overrides)`` -> (loss scalar, metrics dict).  ``overrides`` are per-call keyword arguments of
    ``grpo_loss`` (the per-batch tensors ``old_logp``, ``ref_logp``, ``ref_hidden``, ``ref_weight``,
    ``bias``, ``ref_bias``, or any stored option), taking precedence over the stored ones.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor,
                **overrides: Any):
        return _grpo_loss(hidden, weight, targets, advantages, mask=mask, **self._merged(overrides))


class OPDLoss(_KwargsModule):
    """Module form of :func:`onepass.opd_loss` (on-policy distillation; student and teacher LM heads in
    one vocabulary sweep).

    Stored keyword arguments, e.g. ``OPDLoss(divergence="reverse_kl", reward_scale=1.0, temperature=1.0,
    loss_agg="token-mean", logit_softcap=None, teacher_logit_softcap=None, backend="auto")`` (also ``beta``,
    ``alpha`` for jsd / alpha divergences, ``logit_scale``, ``teacher_logit_scale``).

    ``forward(student_hidden [B, T, Ds], student_weight [V, Ds], teacher_hidden [B, T, Dt],
    teacher_weight [V, Dt], targets [B, T] (or None for a full-vocabulary divergence), mask [B, T],
    **overrides)`` -> (loss, metrics); per-call
    ``overrides`` (e.g. ``ref_logp``, ``student_bias``, ``teacher_bias``) take precedence.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, targets: Tensor | None, mask: Tensor, **overrides: Any):
        return _opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask=mask,
                         **self._merged(overrides))


class Divergence(_KwargsModule):
    """Module form of :func:`onepass.divergence`: per-token f-divergence between softmax(student/T) and
    softmax(teacher/T).

    Args (stored): ``kind="reverse_kl"`` (forward_kl, reverse_kl, jsd, tv, hellinger, chi2, alpha),
    ``beta=0.5``, ``alpha=0.5``, ``temperature=1.0``, ``ignore_index=-100``, ``logit_softcap=None``,
    ``logit_scale=1.0``, ``teacher_logit_softcap=None``, ``teacher_logit_scale=1.0``, ``backend="auto"``.
    ``forward(student_logits [..., V], teacher_logits [..., V], targets=None)`` -> [...] float32;
    ``targets`` only masks positions equal to ``ignore_index``.
    """

    def __init__(self, kind: str = "reverse_kl", *, beta: float = 0.5, alpha: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, logit_softcap: float | None = None, logit_scale: float = 1.0,
                 teacher_logit_softcap: float | None = None, teacher_logit_scale: float = 1.0,
                 backend: str = "auto") -> None:
        super().__init__(kind=kind, beta=beta, alpha=alpha, temperature=temperature, ignore_index=ignore_index,
                         logit_softcap=logit_softcap, logit_scale=logit_scale,
                         teacher_logit_softcap=teacher_logit_softcap, teacher_logit_scale=teacher_logit_scale,
                         backend=backend)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None):
        return _divergence(student_logits, teacher_logits, targets=targets, **self.kwargs)


class LinearDivergence(_KwargsModule):
    """Module form of :func:`onepass.linear_divergence` (both LM heads fused in one vocabulary sweep).

    Same stored arguments as :class:`Divergence`.  ``forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, targets=None, student_bias=None, teacher_bias=None)`` -> [...] float32.
    """

    def __init__(self, kind: str = "reverse_kl", *, beta: float = 0.5, alpha: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, logit_softcap: float | None = None, logit_scale: float = 1.0,
                 teacher_logit_softcap: float | None = None, teacher_logit_scale: float = 1.0,
                 backend: str = "auto") -> None:
        super().__init__(kind=kind, beta=beta, alpha=alpha, temperature=temperature, ignore_index=ignore_index,
                         logit_softcap=logit_softcap, logit_scale=logit_scale,
                         teacher_logit_softcap=teacher_logit_softcap, teacher_logit_scale=teacher_logit_scale,
                         backend=backend)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, targets: Tensor | None = None, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None):
        return _linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  student_bias=student_bias, teacher_bias=teacher_bias, targets=targets,
                                  **self.kwargs)


class SinkhornDistance(_KwargsModule):
    """Module form of :func:`onepass.sinkhorn_distance` (SinKD-style batch-wise Sinkhorn distance).

    Stored keyword arguments, e.g. ``SinkhornDistance(epsilon=0.1, n_iters=20, cost="l1", temperature=1.0,
    group_size=None, backend="auto")`` (whatever ``sinkhorn_distance`` accepts; only the ones given are
    passed, so the function's own defaults apply to the rest).
    ``forward(student_logits [..., V], teacher_logits [..., V])`` -> scalar.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor):
        from .sinkhorn import sinkhorn_distance

        return sinkhorn_distance(student_logits, teacher_logits, **self.kwargs)
