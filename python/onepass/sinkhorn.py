"""``onepass.sinkhorn_distance``: SinKD-style batch-wise Sinkhorn distance between student and teacher.

Path: validation -> backend choice -> ``onepass._ops.sinkhorn.sinkhorn_value`` (the custom op
``onepass::sinkhorn_cost``: per-row lse's, then the banded G x G cost built tile by tile over the
vocabulary, never storing [G, V] probabilities; log-domain Sinkhorn on the small G x G matrices in plain
torch; the backward maps dL/dC back onto both logits in one vocab sweep per side).
"""
from __future__ import annotations

import math

import torch

from . import _dispatch
from ._contract import Cost
from ._ops.sinkhorn import sinkhorn_value
from ._ops.vocab_stats import rows
from ._validate import check_float, check_same_device, check_same_dtype, check_temperature

__all__ = ["sinkhorn_distance"]


def _check_positive(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not 0.0 < v < math.inf:  # also rejects NaN; a plain comparison traces under torch.compile
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
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    vocab = student_logits.shape[-1]
    n = student_logits.numel() // vocab if vocab else 0
    if vocab < 1 or n < 1:
        raise ValueError(f"student_logits must have at least one row and one vocab entry, got shape "
                         f"{tuple(student_logits.shape)}")
    eps = _check_positive("epsilon", epsilon)
    n_iters = _check_int("n_iters", n_iters, 1)
    if not isinstance(cost, str) or cost.upper() not in Cost.__members__:
        raise ValueError(f"cost must be one of {tuple(c.lower() for c in Cost.__members__)}, got {cost!r}")
    temp = check_temperature(temperature)
    if group_size is None:
        g = n
    else:
        g = min(_check_int("group_size", group_size, 1), n)
    tol = _check_positive("tol", tol, allow_none=True)
    which = _dispatch.resolve_backend(backend, student_logits, "sinkhorn", "sinkhorn_distance")
    return sinkhorn_value(rows(student_logits), rows(teacher_logits), inv_temp=1.0 / temp, group_size=g,
                          cost=Cost[cost.upper()], epsilon=eps, n_iters=n_iters, tol=tol, backend=which)
