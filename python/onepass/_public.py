"""Shared plumbing of the public vocabulary functions: flattening, validation, backend choice."""
from __future__ import annotations

import torch

from . import _dispatch, _validate

VOCAB_BACKENDS = ("triton", "cuda", "cpu", "torch")
LINEAR_BACKENDS = ("triton", "cuda", "cpu", "torch")


def pick_backend(backend: str, x: torch.Tensor, op: str, supported=VOCAB_BACKENDS) -> str:
    """Resolve ``backend`` for ``x``; float64 under "auto" on a GPU falls back to the torch reference
    (the GPU kernels compute in fp32)."""
    name = _dispatch.resolve_backend(backend, x.device, supported, op)
    if x.dtype == torch.float64 and name in ("triton", "cuda"):
        if backend == "auto":
            return "torch"
        raise TypeError(f"onepass.{op}: backend {name!r} takes float32/float16/bfloat16 inputs; float64 runs on "
                        "backend='cpu' or 'torch'")
    return name


def rows(x: torch.Tensor, last: int) -> torch.Tensor:
    """[..., last] -> contiguous [N, last]."""
    return x.reshape(-1, last).contiguous()


def kernel_targets(targets, lead_shape, vocab, ignore_index, name="targets"):
    if targets is None:
        return None
    return _validate.check_targets(targets, lead_shape, vocab, ignore_index, name)


def check_linear(prefix: str, hidden, weight, bias):
    """Validate one model's hidden [..., D], weight [V, D], bias [V]; returns (D, V)."""
    _validate.check_float(f"{prefix}hidden", hidden)
    _validate.check_float(f"{prefix}weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be [V, D], got shape {tuple(weight.shape)}")
    d = hidden.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(f"{prefix}weight has D={weight.shape[1]} but {prefix}hidden has D={d} "
                         f"(weight must be [V, D], the nn.Linear(D, V).weight layout)")
    _validate.check_same_dtype(**{f"{prefix}hidden": hidden, f"{prefix}weight": weight})
    _validate.check_vocab(f"{prefix}weight", weight.shape[0])
    if bias is not None:
        _validate.check_float(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must be [V]=[{weight.shape[0]}], got shape {tuple(bias.shape)}")
    return d, weight.shape[0]
