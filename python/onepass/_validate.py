"""Argument checks shared by the public functions: each error names the argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, t: torch.Tensor, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_vocab(name: str, v: int) -> None:
    if v == 0:
        raise ValueError(f"{name} has an empty vocabulary (V=0)")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: all tensors must be on one device")
    return first


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}: they must match")


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not 0.0 < t < math.inf:  # also rejects NaN; a plain comparison traces under torch.compile
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_targets(targets: torch.Tensor, lead_shape: torch.Size, vocab: int, ignore_index: int,
                  name: str = "targets") -> torch.Tensor:
    """Validate targets [...] int64 in [0, V) or == ignore_index; return the kernel form [N] with -1
    marking ignored rows."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {targets.dtype}")
    if targets.shape != lead_shape:
        raise ValueError(f"{name} has shape {tuple(targets.shape)} but the leading shape of the logits is {tuple(lead_shape)}")
    flat = targets.reshape(-1).to(torch.int64)
    ignored = flat == ignore_index
    if flat.numel() and not torch.compiler.is_compiling():
        bad = ((flat < 0) | (flat >= vocab)) & ~ignored
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} has value {int(flat[i])} at flat position {i}, outside [0, {vocab}) "
                             f"and not ignore_index={ignore_index}")
    return torch.where(ignored, torch.full_like(flat, -1), flat).contiguous()
