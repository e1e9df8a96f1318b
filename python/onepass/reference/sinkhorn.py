"""Plain-PyTorch reference of :func:`onepass.sinkhorn_distance` (SinKD-style batch-wise Sinkhorn).

Obviously correct, not fast: it materializes the [N, V] softmaxes, builds the cost matrices with
``torch.cdist`` / matmuls and differentiates everything with autograd.  It is the oracle of the tests
(run it in float64), the ``"torch"`` backend and the "naive" side of the benchmarks.

Definitions (shared with the fused op, which reuses :func:`log_sinkhorn` for the small G x G part):

- p_i = softmax(student_i / T), q_j = softmax(teacher_j / T); rows are cut into consecutive groups of
  ``group_size`` rows (the last group may be smaller); inside a group the rows of p and of q are two
  uniform point clouds (weights 1/G).
- cost C_ij: ``"l1"`` sum_v |p_iv - q_jv| (SinKD's, ``torch.cdist(p, q, p=1)``), ``"sqeuclidean"``
  ||p_i - q_j||^2 = ||p_i||^2 + ||q_j||^2 - 2 p_i.q_j, ``"hellinger"`` sum_v (sqrt p - sqrt q)^2 =
  sum p_i + sum q_j - 2 sqrt(p_i).sqrt(q_j).
- log-domain Sinkhorn with K = exp(-C / epsilon) in SinKD's order: each iteration normalizes the rows
  of the plan to 1/G, then its columns to 1/G (``n_iters`` iterations, or fewer when ``tol`` is given
  and the row-marginal error sum_i |sum_j P_ij - 1/G| drops below it, max over groups).
- value = <P, C>; the mean over groups is returned.  SinKD's own loss normalizes to marginals 1, so it
  equals G times this value (same plan up to the factor G).  A group of one row gives P = [[1]] and the
  value C_00.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

COSTS = ("l1", "sqeuclidean", "hellinger")


def log_sinkhorn(cost: torch.Tensor, epsilon: float, n_iters: int, tol: float | None = None):
    """Entropic plan and value for a batch of square-or-not cost matrices [..., n, m] with uniform
    marginals.  Returns (value [...], plan [..., n, m], iterations run).  Differentiable by autograd.

    Iteration k: f = log(1/n) - LSE_j(-C/eps + g); g = log(1/m) - LSE_i(-C/eps + f) (rows, then
    columns: SinKD's order).  Plan P = exp(-C/eps + f + g); value sum P * C.
    """
    n, m = cost.shape[-2], cost.shape[-1]
    log_a, log_b = -math.log(n), -math.log(m)
    log_k = cost / (-epsilon)
    g = torch.zeros(cost.shape[:-2] + (m,), dtype=cost.dtype, device=cost.device)
    iters = 0
    for _ in range(n_iters):
        f = log_a - torch.logsumexp(log_k + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(log_k + f.unsqueeze(-1), dim=-2)
        iters += 1
        if tol is not None:
            with torch.no_grad():
                rows = torch.exp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2)).sum(-1)
                err = (rows - math.exp(log_a)).abs().sum(-1).max()
            if float(err) < tol:
                break
    plan = torch.exp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2))
    value = (plan * cost).sum((-2, -1))
    return value, plan, iters


def cost_matrix(log_p: torch.Tensor, log_q: torch.Tensor, cost: str) -> torch.Tensor:
    """C [n, m] between the rows of p = exp(log_p) [n, V] and q = exp(log_q) [m, V]."""
    p, q = log_p.exp(), log_q.exp()
    if cost == "l1":
        return torch.cdist(p.unsqueeze(0), q.unsqueeze(0), p=1).squeeze(0)
    if cost == "sqeuclidean":
        return (p * p).sum(-1, keepdim=True) + (q * q).sum(-1).unsqueeze(0) - 2.0 * (p @ q.T)
    if cost == "hellinger":
        sp, sq = torch.exp(0.5 * log_p), torch.exp(0.5 * log_q)  # finite gradients where p = 0
        return p.sum(-1, keepdim=True) + q.sum(-1).unsqueeze(0) - 2.0 * (sp @ sq.T)
    raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")


def sinkhorn_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, epsilon: float = 0.1,
                      n_iters: int = 20, cost: str = "l1", temperature: float = 1.0,
                      group_size: int | None = None, tol: float | None = None) -> torch.Tensor:
    """Reference SinKD Sinkhorn distance (see the module docstring).  Inputs [..., V] (leading dims
    flattened into N rows); computes in float32 (float64 for float64 inputs) and returns a scalar in
    that dtype."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    v = student_logits.shape[-1]
    a = student_logits.reshape(-1, v).to(dt)
    b = teacher_logits.reshape(-1, v).to(dt)
    n = a.shape[0]
    gs = n if group_size is None else int(group_size)
    log_p = F.log_softmax(a / temperature, dim=-1)
    log_q = F.log_softmax(b / temperature, dim=-1)
    values = []
    for s in range(0, n, gs):
        c = cost_matrix(log_p[s:s + gs], log_q[s:s + gs], cost)
        values.append(log_sinkhorn(c, epsilon, n_iters, tol)[0])
    return torch.stack(values).mean()
