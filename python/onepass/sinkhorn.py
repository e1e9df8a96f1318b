"""``onepass.sinkhorn_distance``: SinKD-style batch-wise Sinkhorn distance between student and teacher.

Path: validation -> backend choice -> ``onepass::sinkhorn_cost`` (custom op: per-row lse's, then the
banded G x G cost built tile by tile over the vocabulary, never storing [G, V] probabilities) ->
log-domain Sinkhorn on the small G x G matrices in plain torch (autograd) -> value.  The backward of
the custom op (``onepass::sinkhorn_cost_backward``) maps dL/dC back onto both logits in one vocab sweep
per side.  ``backend="torch"`` runs the plain-PyTorch reference (``onepass.reference.sinkhorn``).
"""
from __future__ import annotations

import math

import torch

from onepass._dispatch import resolve_backend
from onepass._validate import check_float, check_same_device, check_same_dtype, check_temperature
from onepass.backends import sinkhorn as _launch
from onepass.reference.sinkhorn import log_sinkhorn as _log_sinkhorn
from onepass.reference.sinkhorn import sinkhorn_distance as _ref_sinkhorn_distance

__all__ = ["sinkhorn_distance"]

COSTS = ("l1", "sqeuclidean", "hellinger")
_SUPPORTED = ("triton", "cpu", "torch")


# ----------------------------------------------------------------------------------------------
# Custom ops: the two vocab sweeps.
# ----------------------------------------------------------------------------------------------
def _planes_dtype(a: torch.Tensor, backend: str) -> torch.dtype:
    return torch.float64 if (a.dtype == torch.float64 and backend == "cpu") else torch.float32


@torch.library.custom_op("onepass::sinkhorn_cost", mutates_args=())
def sinkhorn_cost(a: torch.Tensor, b: torch.Tensor, inv_temp: float, group_size: int, kind: int,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded planes [3, N, G] = (C, A, B) and lse [2, N] (see onepass/backends/sinkhorn.py).
    Only plane C is differentiable (A, B, lse are auxiliary outputs for the backward)."""
    planes, lse = _launch.sinkhorn_cost(a, b, inv_temp, group_size, kind, backend)
    return planes, lse.to(planes.dtype)


@sinkhorn_cost.register_fake
def _(a, b, inv_temp, group_size, kind, backend):
    dt = _planes_dtype(a, backend)
    n = a.shape[0]
    return a.new_empty((3, n, group_size), dtype=dt), a.new_empty((2, n), dtype=dt)


@torch.library.custom_op("onepass::sinkhorn_cost_backward", mutates_args=())
def sinkhorn_cost_backward(a: torch.Tensor, b: torch.Tensor, lse: torch.Tensor, planes: torch.Tensor,
                           grad_cost: torch.Tensor, inv_temp: float, group_size: int, kind: int, backend: str,
                           need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/da, dL/db) in the input dtype from the banded upstream dL/dC [N, G] (an empty tensor for a
    side that is not needed)."""
    g = int(group_size)
    gc = grad_cost.to(planes.dtype).contiguous()
    ga = a.new_empty(0)
    gb = b.new_empty(0)
    if need_a:
        sx = (gc * planes[1]).sum(1)
        ga = _launch.sinkhorn_grad(a, b, lse[0], lse[1], gc, sx, gc.sum(1), inv_temp, g, kind, backend)
    if need_b:
        gt = _launch.band_transpose(gc, g)
        sx = (gt * _launch.band_transpose(planes[2], g)).sum(1)
        gb = _launch.sinkhorn_grad(b, a, lse[1], lse[0], gt, sx, gt.sum(1), inv_temp, g, kind, backend)
    return ga, gb


@sinkhorn_cost_backward.register_fake
def _(a, b, lse, planes, grad_cost, inv_temp, group_size, kind, backend, need_a, need_b):
    return (torch.empty_like(a) if need_a else a.new_empty(0)), (torch.empty_like(b) if need_b else b.new_empty(0))


def _cost_setup_context(ctx, inputs, output):
    a, b, inv_temp, group_size, kind, backend = inputs
    planes, lse = output
    ctx.save_for_backward(a, b, lse, planes)
    ctx.args = (inv_temp, group_size, kind, backend)
    ctx.mark_non_differentiable(lse)


def _cost_backward(ctx, grad_planes, grad_lse):
    a, b, lse, planes = ctx.saved_tensors
    inv_temp, group_size, kind, backend = ctx.args
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_planes is None or not (need_a or need_b):
        return None, None, None, None, None, None
    ga, gb = sinkhorn_cost_backward(a, b, lse, planes, grad_planes[0], inv_temp, group_size, kind, backend,
                                    need_a, need_b)
    return (ga if need_a else None), (gb if need_b else None), None, None, None, None


sinkhorn_cost.register_autograd(_cost_backward, setup_context=_cost_setup_context)


# ----------------------------------------------------------------------------------------------
# The small G x G part.
# ----------------------------------------------------------------------------------------------
def _banded_sinkhorn(c: torch.Tensor, g: int, epsilon: float, n_iters: int, tol: float | None) -> torch.Tensor:
    """Mean over groups of the Sinkhorn values of the banded cost c [N, G]."""
    n = c.shape[0]
    nf = n // g
    r = n - nf * g
    total = c.new_zeros(())
    if nf:
        total = total + _log_sinkhorn(c[: nf * g].reshape(nf, g, g), epsilon, n_iters, tol)[0].sum()
    if r:
        total = total + _log_sinkhorn(c[nf * g:, :r], epsilon, n_iters, tol)[0]
    return total / (nf + (1 if r else 0))


# ----------------------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------------------
def _check_positive(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (v > 0.0) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def sinkhorn_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, epsilon: float = 0.1,
                      n_iters: int = 20, cost: str = "l1", temperature: float = 1.0,
                      group_size: int | None = None, tol: float | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """SinKD-style batch-wise Sinkhorn distance between student and teacher distributions.

    Args:
        student_logits, teacher_logits: [..., V] logits of the same shape, dtype and device (leading dims
            are flattened into N rows).  p_i = softmax(student_i / T), q_j = softmax(teacher_j / T).
        epsilon: entropic regularization (> 0); the iterations run in the log domain, stable for
            epsilon down to 1e-3.
        n_iters: Sinkhorn iterations (>= 1), each a row then a column normalization of the plan
            (SinKD's order); exactly ``n_iters`` are run unless ``tol`` is given.
        cost: ``"l1"`` C_ij = sum_v |p_iv - q_jv| (SinKD's own, = torch.cdist(p, q, p=1)),
            ``"sqeuclidean"`` ||p_i - q_j||^2, ``"hellinger"`` sum_v (sqrt p_iv - sqrt q_jv)^2.
        temperature: T > 0.
        group_size: split the N rows into consecutive independent groups of this many rows (the last
            may be smaller); None = one group of all rows.  Inside a group the student rows and the
            teacher rows are two uniform point clouds (weights 1/G).  A group of one row has the plan
            [[1]] and the value C_00.  The mean over groups is returned.
        tol: if given (> 0), stop early once the row-marginal error sum_i |sum_j P_ij - 1/G| (max over
            the groups solved together) is below ``tol`` (checked every iteration; a host sync, so use
            ``tol=None`` under ``torch.compile(fullgraph=True)``).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"`` (the plain-PyTorch reference).

    Returns:
        The scalar <P, C> with P the entropic plan after the iterations (mean over groups); float32
        (float64 for float64 inputs on the cpu and torch backends).  SinKD's loss (marginals 1 instead
        of 1/G) equals G times this value.

    Gradient (w.r.t. both logits): exact gradient of the returned value.  Autograd runs through the
    Sinkhorn iterations on the small G x G matrices only, giving dL/dC; the cost kernel's backward then
    maps dL/dC onto the logits in one vocab sweep per side, without materializing [G, V]:
    dL/dz_iv = p_iv (dL/dp_iv - <dL/dp_i, p_i>) / T with dL/dp_iv = sum_j dL/dC_ij dC_ij/dp_iv
    (l1: sign(p_iv - q_jv); sqeuclidean: 2 (p_iv - q_jv); hellinger: -sqrt(q_jv / p_iv), applied as
    p_iv times it) and the per-row means <dL/dp_i, p_i> = sum_j dL/dC_ij A_ij from a G x G side output
    of the forward sweep.  Where p_iv = q_jv exactly the l1 subgradient sign(0) = 0 is used.
    """
    check_float("student_logits", student_logits, min_dim=2)
    check_float("teacher_logits", teacher_logits, min_dim=2)
    if student_logits.shape != teacher_logits.shape:
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(f"student_logits and teacher_logits must have the same vocab size, got "
                             f"{student_logits.shape[-1]} and {teacher_logits.shape[-1]}")
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    check_same_dtype(student_logits=student_logits, teacher_logits=teacher_logits)
    device = check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    vocab = student_logits.shape[-1]
    n = student_logits.numel() // vocab if vocab else 0
    if vocab < 1 or n < 1:
        raise ValueError(f"student_logits must have at least one row and one vocab entry, got shape "
                         f"{tuple(student_logits.shape)}")
    eps = _check_positive("epsilon", epsilon)
    n_iters = _check_int("n_iters", n_iters, 1)
    if not isinstance(cost, str) or cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    temp = check_temperature(temperature)
    if group_size is None:
        g = n
    else:
        g = min(_check_int("group_size", group_size, 1), n)
    tol = _check_positive("tol", tol, allow_none=True)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    which = resolve_backend(backend, device, _SUPPORTED, "sinkhorn_distance")
    if which == "triton" and student_logits.dtype == torch.float64:
        raise TypeError("sinkhorn_distance: the triton backend takes float32/float16/bfloat16 logits; use "
                        "backend='cpu' or 'torch' for float64")

    if which == "torch":
        return _ref_sinkhorn_distance(student_logits, teacher_logits, epsilon=eps, n_iters=n_iters, cost=cost,
                                      temperature=temp, group_size=g, tol=tol)

    a = student_logits.reshape(n, vocab).contiguous()
    b = teacher_logits.reshape(n, vocab).contiguous()
    planes, _ = sinkhorn_cost(a, b, 1.0 / temp, g, _launch.COST_KINDS[cost], which)
    return _banded_sinkhorn(planes[0], g, eps, n_iters, tol)
