"""Argument checks shared by the public functions: each error names the argument."""
from __future__ import annotations

import math

import torch

from ._contract import LogitMap

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor, min_dim: int = 1) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_vocab(name: str, v: int) -> None:
    if v == 0:
        raise ValueError(f"{name} has an empty vocabulary (V=0)")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    for name, t in present.items():
        check_tensor(name, t)
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: all tensors must be on one device")
    if first.type == "meta":
        raise ValueError(f"{first_name} is a meta tensor (no data): onepass ops need CPU or CUDA tensors")
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


def check_logit_softcap(value, name: str = "logit_softcap") -> float | None:
    """None (no cap) or a finite cap c > 0 of c·tanh(ℓ/c)."""
    if value is None:
        return None
    c = float(value)
    if not 0.0 < c < math.inf:
        raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    return c


def check_logit_scale(value, name: str = "logit_scale") -> float:
    """A finite multiplier s > 0 of the raw logits (applied before the cap)."""
    s = float(value)
    if not 0.0 < s < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return s


def logit_map(temperature, logit_softcap=None, logit_scale=1.0, second_softcap=None, second_scale=1.0,
              second_prefix: str = ""):
    """Validated ``_contract.LogitMap`` of the public keywords: temperature, the first model's
    ``logit_softcap``/``logit_scale`` and the second model's (named ``{second_prefix}logit_softcap`` etc.)."""
    return LogitMap.from_public(check_temperature(temperature), check_logit_softcap(logit_softcap),
                                check_logit_scale(logit_scale),
                                check_logit_softcap(second_softcap, f"{second_prefix}logit_softcap"),
                                check_logit_scale(second_scale, f"{second_prefix}logit_scale"))


def check_targets(targets: torch.Tensor, lead_shape: torch.Size, vocab: int, ignore_index: int,
                  name: str = "targets") -> torch.Tensor:
    """Validate targets [...] int64 in [0, V) or == ignore_index; return the kernel form [N] with -1
    marking ignored rows."""
    check_tensor(name, targets)
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


def kernel_targets(targets, lead_shape, vocab, ignore_index, name="targets"):
    """``check_targets`` of optional targets (None stays None)."""
    if targets is None:
        return None
    return check_targets(targets, lead_shape, vocab, ignore_index, name)


def check_linear(prefix: str, hidden, weight, bias):
    """Validate one model's hidden [..., D], weight [V, D], bias [V] (same dtype); returns (D, V)."""
    check_float(f"{prefix}hidden", hidden)
    check_float(f"{prefix}weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be [V, D], got shape {tuple(weight.shape)}")
    d = hidden.shape[-1]
    if d == 0:
        raise ValueError(f"{prefix}hidden has an empty hidden dimension (D=0), shape {tuple(hidden.shape)}")
    if weight.shape[1] != d:
        raise ValueError(f"{prefix}weight has D={weight.shape[1]} but {prefix}hidden has D={d} "
                         f"(weight must be [V, D], the nn.Linear(D, V).weight layout)")
    check_vocab(f"{prefix}weight", weight.shape[0])
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must be [V]=[{weight.shape[0]}], got shape {tuple(bias.shape)}")
    check_same_dtype(**{f"{prefix}hidden": hidden, f"{prefix}weight": weight, f"{prefix}bias": bias})
    return d, weight.shape[0]


def check_second_model(prefix: str, hidden, weight, bias, first_prefix: str, first_hidden, vocab: int) -> None:
    """Validate the second model (reference / teacher) of a two-model sweep against the first: its own
    hidden/weight/bias, the same vocabulary, leading shape and dtype."""
    _, v = check_linear(prefix, hidden, weight, bias)
    if v != vocab:
        raise ValueError(f"{prefix}weight has V={v} but {first_prefix}weight has V={vocab}: the vocabularies must match")
    if hidden.shape[:-1] != first_hidden.shape[:-1]:
        raise ValueError(f"{prefix}hidden has leading shape {tuple(hidden.shape[:-1])} but {first_prefix}hidden has "
                         f"{tuple(first_hidden.shape[:-1])}")
    check_same_dtype(**{f"{first_prefix}hidden": first_hidden, f"{prefix}hidden": hidden})
