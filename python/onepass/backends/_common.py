"""Helpers shared by the compiled-module launchers (CPU and CUDA), and the one loader of ``onepass._C``."""
from __future__ import annotations

import warnings

import torch

from .._contract import TORCH_DTYPES, stats_dtype  # noqa: F401  (stats_dtype: re-exported for launchers)

_COMPILED: list = []  # [module or None] once looked up (a plain cache: torch.compile traces through it)


def compiled_module():
    """``onepass._C`` or None (warns once when it is missing)."""
    if not _COMPILED:
        try:
            from onepass import _C
        except ImportError as exc:
            warnings.warn(
                f"onepass: the compiled module onepass._C is not available ({exc}); the 'cpu' and 'cuda' "
                "backends are disabled and CPU tensors use the plain-PyTorch 'torch' backend. Reinstall "
                "with `pip install -e .` to build it.",
                RuntimeWarning,
                stacklevel=4,
            )
            _C = None
        _COMPILED.append(_C)
    return _COMPILED[0]


def dtype_code(t: torch.Tensor) -> int:
    try:
        return int(TORCH_DTYPES[t.dtype])
    except KeyError:
        raise TypeError(f"onepass kernels take float32/float16/bfloat16/float64 tensors, got {t.dtype}") from None


def ptr(t: torch.Tensor | None) -> int:
    """Raw data pointer, or 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()
