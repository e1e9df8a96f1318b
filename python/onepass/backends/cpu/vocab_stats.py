"""CPU launchers of the vocab-stats kernels (C++/OpenMP kernels of ``onepass._C``).

Signatures and semantics: ``docs/vocab_stats.md``.  Arguments are validated by the public functions;
here only cheap consistency asserts are made before calling the kernel with raw pointers.
"""
from __future__ import annotations

import torch

from ..._contract import NUM_GRADS, NUM_STATS, stats_dtype
from .._common import compiled_module, dtype_code, ptr

def _check_inputs(a: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor | None) -> tuple[int, int]:
    assert a.dim() == 2 and a.is_contiguous() and a.device.type == "cpu", "a must be a contiguous [N, V] CPU tensor"
    n, v = a.shape
    if b is not None:
        assert b.shape == a.shape and b.dtype == a.dtype and b.is_contiguous(), "b must match a"
    if targets is not None:
        assert targets.shape == (n,) and targets.dtype == torch.int64 and targets.is_contiguous(), "bad targets"
    return n, v


def vocab_stats_fwd(a, b, targets, logit_map, kind, beta, alpha, need_entropy):
    """Per-row statistics ``stats`` [N, 8] (fp32, fp64 for fp64 inputs) of a, b through ``logit_map``
    (``LogitMap``: per model inv_temp and soft-cap, 0 = none)."""
    n, v = _check_inputs(a, b, targets)
    stats = torch.empty((n, NUM_STATS), dtype=stats_dtype(a), device=a.device)
    if n == 0:
        return stats
    compiled_module().vocab_stats_fwd_cpu(
        ptr(a), ptr(b), ptr(targets), ptr(stats), n, v, dtype_code(a),
        *map(float, logit_map), int(kind), float(beta), float(alpha), bool(need_entropy),
    )
    return stats


def vocab_stats_bwd(a, b, targets, stats, grads, logit_map, kind, beta, alpha, need_grad_a, need_grad_b):
    """``(grad_a | None, grad_b | None)``, [N, V] in the input dtype."""
    n, v = _check_inputs(a, b, targets)
    sd = stats_dtype(a)
    assert stats.shape == (n, NUM_STATS) and stats.dtype == sd and stats.is_contiguous(), "bad stats"
    assert grads.shape == (n, NUM_GRADS) and grads.dtype == sd and grads.is_contiguous(), "bad grads"
    assert not need_grad_b or b is not None, "need_grad_b needs b"
    grad_a = torch.empty_like(a) if need_grad_a else None
    grad_b = torch.empty_like(b) if need_grad_b else None
    if n == 0 or (grad_a is None and grad_b is None):
        return grad_a, grad_b
    compiled_module().vocab_stats_bwd_cpu(
        ptr(a), ptr(b), ptr(targets), ptr(stats), ptr(grads), ptr(grad_a), ptr(grad_b), n, v, dtype_code(a),
        *map(float, logit_map), int(kind), float(beta), float(alpha),
    )
    return grad_a, grad_b
