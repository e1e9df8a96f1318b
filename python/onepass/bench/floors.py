"""GPU floors measured on the device (METHOD.md): cuBLAS GEMM times and the device copy bandwidth.

* Linear ops: the sum of the measured times of the GEMMs a family lists (``registry.linear_gemms``): fwd =
  the logits product h @ W.T; fwd+bwd = logits, their recompute, dH = dZ @ W and dW = dZ.T @ h (the
  "4-GEMM floor"); a frozen second model adds its logits twice (forward + recompute).
* Logits-input ops: bytes (inputs read once + outputs written once; the backward reads the inputs again
  and writes the gradient) over the bandwidth of a large device-to-device copy (bytes read + written).
"""
from __future__ import annotations

import functools
import statistics

import torch

from .measure import floor_runner, time_cuda
from .registry import Floor, Gemm


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str = "cuda", nbytes: int = 2 * 2**30) -> float:
    """Bytes/s of ``dst.copy_(src)`` on a ``nbytes`` tensor, counting read + write."""
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_cuda(lambda: dst.copy_(src), repeat=20, flush=False, device=device))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


@functools.lru_cache(maxsize=None)
def gemm_ms(g: Gemm, dtype: str, device: str = "cuda") -> float:
    run = floor_runner((g,), dtype, device)
    ms = statistics.median(time_cuda(run, repeat=10, device=device))
    del run
    torch.cuda.empty_cache()
    return ms


def floor_ms(floor: Floor | None, dtype: str, device: str = "cuda") -> float | None:
    if floor is None:
        return None
    if floor.gemms:
        return sum(gemm_ms(g, dtype, device) for g in floor.gemms)
    if floor.bytes:
        return floor.bytes / copy_bandwidth(device) * 1e3
    return None
