"""The Sinkhorn-distance op: ``onepass::sinkhorn_cost`` (the two vocabulary sweeps, custom op) and the
log-domain Sinkhorn iterations on the small G x G cost matrices (plain torch, autograd).

Banded layout: rows are cut into consecutive groups of ``group_size`` = G rows (the last may be
smaller); a G x G quantity of every group is stored as [N, G], entry (i, jj) pairing student row i with
teacher row gstart(i) + jj (entries past the end of a short last group are 0).

Launchers of the family (``onepass._dispatch.LAUNCHERS``), inputs [N, V] contiguous, lse's [N] in the
stats dtype, ``kind`` a ``_contract.Cost``:

- ``sinkhorn_cost(a, b, lse_a, lse_b, inv_temp, group_size, kind) -> planes [3, N, G]`` = (C, A, B)
  with A_ij = Σ_v p_iv dC_ij/dp_iv and B_ij = Σ_v q_jv dC_ij/dq_jv (the softmax-Jacobian means of the
  backward, without another sweep);
- ``sinkhorn_grads(a, b, lse_a, lse_b, gm, gm_t, sa, sb, inv_temp, group_size, kind, need_a, need_b)
  -> (dL/da, dL/db)`` [N, V] in the input dtype (an empty tensor for a side that is not needed), from the
  banded upstream gm = dL/dC [N, G], its per-group transpose gm_t and the per-row means
  sa_i = Σ_j gm_ij A_ij, sb_j = Σ_i gm_ij B_ij (both sides may be computed in one sweep).

The custom ops take 1/T as a float64 CPU tensor ``hyper`` [1] (read back with ``.item()`` inside the op,
so the launchers get a Python float): under torch.compile a new temperature is a new input, not a
recompile (a float argument of a custom op is specialized); the same convention as the vocab-stats ops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._contract import LogitMap, Stat, hyperparameters, stats_dtype
from .._dispatch import Cap, has, launcher

FAMILY = "sinkhorn"


def band_transpose(m: torch.Tensor, group_size: int) -> torch.Tensor:
    """Banded [N, G] of the per-group transposes."""
    n, g = m.shape[0], int(group_size)
    nf = n // g
    r = n - nf * g
    parts = []
    if nf:
        parts.append(m[: nf * g].reshape(nf, g, g).transpose(1, 2).reshape(nf * g, g))
    if r:
        parts.append(F.pad(m[nf * g:, :r].T, (0, g - r)))
    return torch.cat(parts).contiguous() if parts else m.clone()


def _lse(a, b, inv_temp, backend):
    """[2, N] log-sum-exps of a/T and b/T from the same backend's vocab-stats forward."""
    stats = launcher("vocab_stats", backend).vocab_stats_fwd(a, b, None, LogitMap.plain(float(inv_temp)), 0, 0.0,
                                                             0.0, False)
    return stats[:, [Stat.LSE_A, Stat.LSE_B]].T.contiguous()


@torch.library.custom_op("onepass::sinkhorn_cost", mutates_args=())
def _sinkhorn_cost_op(a: torch.Tensor, b: torch.Tensor, hyper: torch.Tensor, group_size: int, kind: int,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded planes [3, N, G] = (C, A, B) and lse [2, N].  Only plane C is differentiable (A, B, lse are auxiliary outputs for the backward)."""
    inv_temp = hyper.item()
    lse = _lse(a, b, inv_temp, backend)
    return launcher(FAMILY, backend).sinkhorn_cost(a, b, lse[0], lse[1], inv_temp, group_size, kind), lse


@_sinkhorn_cost_op.register_fake
def _(a, b, hyper, group_size, kind, backend):
    dt = stats_dtype(a)
    n = a.shape[0]
    return a.new_empty((3, n, group_size), dtype=dt), a.new_empty((2, n), dtype=dt)


@torch.library.custom_op("onepass::sinkhorn_cost_backward", mutates_args=())
def _sinkhorn_cost_backward_op(a: torch.Tensor, b: torch.Tensor, lse: torch.Tensor, planes: torch.Tensor,
                           grad_cost: torch.Tensor, hyper: torch.Tensor, group_size: int, kind: int, backend: str,
                           need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/da, dL/db) in the input dtype from the banded upstream dL/dC [N, G] (an empty tensor for a
    side that is not needed)."""
    g = int(group_size)
    gm = grad_cost.to(planes.dtype).contiguous()
    gm_t = band_transpose(gm, g)
    sa = (gm * planes[1]).sum(1)  # <dL/dp_i, p_i>
    sb = band_transpose(gm * planes[2], g).sum(1)  # <dL/dq_j, q_j>
    return launcher(FAMILY, backend).sinkhorn_grads(a, b, lse[0].contiguous(), lse[1].contiguous(), gm, gm_t, sa, sb,
                                                    hyper.item(), g, kind, need_a, need_b)


@_sinkhorn_cost_backward_op.register_fake
def _(a, b, lse, planes, grad_cost, hyper, group_size, kind, backend, need_a, need_b):
    return (torch.empty_like(a) if need_a else a.new_empty(0)), (torch.empty_like(b) if need_b else b.new_empty(0))


def _cost_setup_context(ctx, inputs, output):
    a, b, hyper, group_size, kind, backend = inputs
    planes, lse = output
    ctx.save_for_backward(a, b, lse, planes, hyper)
    ctx.args = (group_size, kind, backend)
    ctx.mark_non_differentiable(lse)


def _cost_backward(ctx, grad_planes, grad_lse):
    a, b, lse, planes, hyper = ctx.saved_tensors
    group_size, kind, backend = ctx.args
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_planes is None or not (need_a or need_b):
        return None, None, None, None, None, None
    ga, gb = _sinkhorn_cost_backward_op(a, b, lse, planes, grad_planes[0], hyper, group_size, kind, backend,
                                    need_a, need_b)
    return (ga if need_a else None), (gb if need_b else None), None, None, None, None


_sinkhorn_cost_op.register_autograd(_cost_backward, setup_context=_cost_setup_context)


# ----------------------------------------------------------------------------------------------
# The small G x G part: log-domain Sinkhorn with uniform marginals, rows then columns (SinKD's order).
# ----------------------------------------------------------------------------------------------
def _plan_value(cost: torch.Tensor, epsilon: float, n_iters: int, tol: float | None) -> torch.Tensor:
    """Σ_ij P_ij C_ij for a batch of square cost matrices [k, m, m]: P = diag(e^u) K diag(e^w) with
    K = e^(−C/ε), u and w updated alternately so that P's rows, then its columns, sum to 1/m; stops early
    once the worst row-marginal error Σ_i |Σ_j P_ij − 1/m| of the batch is below ``tol``."""
    m = cost.shape[-1]
    log_marginal = -math.log(m)
    scaled = -cost / epsilon
    w = cost.new_zeros(cost.shape[:-1])
    for _ in range(n_iters):
        u = log_marginal - torch.logsumexp(scaled + w[:, None, :], dim=2)
        w = log_marginal - torch.logsumexp(scaled + u[:, :, None], dim=1)
        if tol is not None:
            with torch.no_grad():
                row_err = (torch.logsumexp(scaled + u[:, :, None] + w[:, None, :], dim=2).exp() - 1.0 / m)
                if float(row_err.abs().sum(1).max()) < tol:
                    break
    return (torch.exp(scaled + u[:, :, None] + w[:, None, :]) * cost).sum((1, 2))


def sinkhorn_value(a: torch.Tensor, b: torch.Tensor, *, inv_temp: float, group_size: int, cost: int, epsilon: float,
                   n_iters: int, tol: float | None, backend: str) -> torch.Tensor:
    """Mean over the groups of the Sinkhorn values <P, C> between the rows of softmax(a/T) and
    softmax(b/T) (a, b [N, V] contiguous); differentiable w.r.t. both."""
    if has(FAMILY, backend, Cap.AUTOGRAD):
        lse = launcher("vocab_stats", backend).vocab_stats_fwd(a, b, None, LogitMap.plain(inv_temp), 0, 0.0, 0.0,
                                                                 False)
        c = launcher(FAMILY, backend).sinkhorn_cost(a, b, lse[:, Stat.LSE_A], lse[:, Stat.LSE_B], inv_temp,
                                                    group_size, cost)[0]
    else:
        c = _sinkhorn_cost_op(a, b, hyperparameters(inv_temp), group_size, cost, backend)[0][0]
    n, g = c.shape
    full = n // g
    values = []
    if full:
        values.append(_plan_value(c[: full * g].reshape(full, g, g), epsilon, n_iters, tol))
    if n > full * g:
        r = n - full * g
        values.append(_plan_value(c[full * g:, :r][None], epsilon, n_iters, tol))
    return torch.cat(values).mean()
