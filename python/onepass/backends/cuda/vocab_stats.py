"""CUDA launchers of the vocab-stats kernels (the CUDA kernels of ``onepass._C``).

Signatures and semantics: ``docs/vocab_stats.md``.  Arguments are validated by the public functions;
here only cheap consistency asserts are made before calling the kernel with raw pointers on the
current CUDA stream of ``a``'s device.  float32 / float16 / bfloat16 only (float64: 'cpu' / 'torch').
"""
from __future__ import annotations

import torch

from ..._contract import NUM_GRADS, NUM_STATS
from .._common import compiled_module, dtype_code, ptr

def _check_inputs(a: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor | None) -> tuple[int, int]:
    assert a.dim() == 2 and a.is_contiguous() and a.device.type == "cuda", "a must be a contiguous [N, V] CUDA tensor"
    if a.dtype == torch.float64:
        raise TypeError("onepass CUDA backend: float64 is not supported by the CUDA kernels "
                        "(use float32/float16/bfloat16, or the 'cpu' / 'torch' backend)")
    n, v = a.shape
    if b is not None:
        assert b.shape == a.shape and b.dtype == a.dtype and b.is_contiguous() and b.device == a.device, "b must match a"
    if targets is not None:
        assert (targets.shape == (n,) and targets.dtype == torch.int64 and targets.is_contiguous()
                and targets.device == a.device), "targets must be a contiguous int64 [N] tensor on a's device"
    return n, v


def vocab_stats_fwd(a, b, targets, logit_map, kind, beta, alpha, need_entropy):
    """Per-row statistics ``stats`` [N, 8] float32."""
    n, v = _check_inputs(a, b, targets)
    stats = torch.empty((n, NUM_STATS), dtype=torch.float32, device=a.device)
    if n == 0:
        return stats
    mod = compiled_module()
    with torch.cuda.device(a.device):
        stream = torch.cuda.current_stream(a.device).cuda_stream
        mod.vocab_stats_fwd_cuda(
            ptr(a), ptr(b), ptr(targets), ptr(stats), n, v, dtype_code(a),
            *map(float, logit_map), int(kind), float(beta), float(alpha), bool(need_entropy), stream,
        )
    return stats


def vocab_stats_bwd(a, b, targets, stats, grads, logit_map, kind, beta, alpha, need_grad_a, need_grad_b):
    """``(grad_a | None, grad_b | None)``, [N, V] in the input dtype."""
    n, v = _check_inputs(a, b, targets)
    assert (stats.shape == (n, NUM_STATS) and stats.dtype == torch.float32 and stats.is_contiguous()
            and stats.device == a.device), "stats must be a contiguous float32 [N, 8] tensor on a's device"
    assert (grads.shape == (n, NUM_GRADS) and grads.dtype == torch.float32 and grads.is_contiguous()
            and grads.device == a.device), "grads must be a contiguous float32 [N, 4] tensor on a's device"
    assert not need_grad_b or b is not None, "need_grad_b needs b"
    grad_a = torch.empty_like(a) if need_grad_a else None
    grad_b = torch.empty_like(b) if need_grad_b else None
    if n == 0 or (grad_a is None and grad_b is None):
        return grad_a, grad_b
    mod = compiled_module()
    with torch.cuda.device(a.device):
        stream = torch.cuda.current_stream(a.device).cuda_stream
        mod.vocab_stats_bwd_cuda(
            ptr(a), ptr(b), ptr(targets), ptr(stats), ptr(grads), ptr(grad_a), ptr(grad_b), n, v,
            dtype_code(a), *map(float, logit_map), int(kind), float(beta), float(alpha), stream,
        )
    return grad_a, grad_b
