"""Helpers shared by the compiled-module launchers (CPU and CUDA)."""
from __future__ import annotations

import torch

#: dtype codes understood by onepass._C (csrc/common.h ``DType``).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

NUM_STATS = 8
NUM_GRADS = 4


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"onepass kernels take float32/float16/bfloat16/float64 tensors, got {t.dtype}") from None


def ptr(t: torch.Tensor | None) -> int:
    """Raw data pointer, or 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def stats_dtype(a: torch.Tensor) -> torch.dtype:
    """Per-row statistics are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if a.dtype == torch.float64 else torch.float32
