"""Backend selection and the launcher registry: which implementation of a kernel family runs.

Backends: ``"triton"`` (GPU, or CPU under the Triton interpreter ``TRITON_INTERPRET=1``), ``"cuda"``
(the CUDA kernels of ``onepass._C``), ``"cpu"`` (the C++/OpenMP kernels of ``onepass._C``) and
``"torch"`` (plain PyTorch, differentiated by autograd).  ``"auto"`` takes, for the device of the
inputs, the first usable backend of the device's preference order that implements the family.

``LAUNCHERS`` maps (family, backend) to the launcher module and its capabilities; every backend's
module of a family has the same file name and the same functions (docs/architecture.md).  The op layer
(``onepass._ops``) asks for capabilities, never for backend names.
"""
from __future__ import annotations

import enum
import importlib
import importlib.util
import os
import sys

import torch

from .backends._common import compiled_module

BACKENDS = ("triton", "cuda", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


class Cap(enum.Flag):
    """What a launcher module offers beyond its family's forward/backward launchers."""

    NONE = 0
    #: Plain differentiable torch: called directly, differentiated by autograd (no custom op).
    AUTOGRAD = enum.auto()
    #: ``linear_vocab_stats_fwd``: logits computed tile by tile in the kernel (forward).
    LINEAR_KERNEL = enum.auto()
    #: ``linear_vocab_stats_bwd``: the launcher owns the whole fused-linear backward (all six gradients).
    LINEAR_BACKWARD = enum.auto()
    #: Chunked fused-linear losses with forward and backward in the same pass (``_ops.fused_loss``).
    ONE_PASS_LOSS = enum.auto()
    #: Computes in float64 (the GPU kernels compute in fp32 only).
    FLOAT64 = enum.auto()


LAUNCHERS: dict[tuple[str, str], tuple[str, Cap]] = {
    ("vocab_stats", "triton"): ("onepass.triton_kernels.vocab_stats", Cap.LINEAR_KERNEL | Cap.LINEAR_BACKWARD),
    ("vocab_stats", "cuda"): ("onepass.backends.cuda.vocab_stats", Cap.ONE_PASS_LOSS),
    ("vocab_stats", "cpu"): ("onepass.backends.cpu.vocab_stats", Cap.ONE_PASS_LOSS | Cap.FLOAT64),
    ("vocab_stats", "torch"): ("onepass.backends.torch.vocab_stats", Cap.AUTOGRAD | Cap.FLOAT64),
    ("sinkhorn", "triton"): ("onepass.triton_kernels.sinkhorn", Cap.NONE),
    ("sinkhorn", "cpu"): ("onepass.backends.cpu.sinkhorn", Cap.FLOAT64),
    ("sinkhorn", "torch"): ("onepass.backends.torch.sinkhorn", Cap.AUTOGRAD | Cap.FLOAT64),
    ("advantages", "triton"): ("onepass.triton_kernels.advantages", Cap.FLOAT64),
    ("advantages", "cuda"): ("onepass.backends.cuda.advantages", Cap.FLOAT64),
    ("advantages", "cpu"): ("onepass.backends.cpu.advantages", Cap.FLOAT64),
    ("advantages", "torch"): ("onepass.backends.torch.advantages", Cap.FLOAT64),
}


def launcher(family: str, backend: str):
    """The launcher module of ``family`` on ``backend``.  Read from ``sys.modules`` once imported, which
    torch.compile traces (``importlib`` it cannot): the AUTOGRAD launchers, whose code is traced, are
    imported with ``onepass``."""
    name = LAUNCHERS[(family, backend)][0]
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)


def has(family: str, backend: str, cap: Cap) -> bool:
    return bool(LAUNCHERS[(family, backend)][1] & cap)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def backend_status(backend: str, device_type: str) -> tuple[bool, str]:
    """(usable, reason) for ``backend`` on tensors of ``device_type`` ('cpu' or 'cuda')."""
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if not _TRITON_INSTALLED:
            return False, "triton is not installed"
        if device_type == "cuda" or triton_interpreting():
            return True, ""
        return False, "Triton kernels run on CUDA tensors (or on CPU tensors only with TRITON_INTERPRET=1)"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    mod = compiled_module()
    if mod is None:
        return False, "the compiled module onepass._C is not built"
    if device_type != backend:
        kernels = "C++ CPU" if backend == "cpu" else "CUDA"
        return False, f"the {kernels} kernels take {backend.upper()} tensors, got {device_type} tensors"
    if backend == "cuda" and not getattr(mod, "with_cuda", False):
        return False, "onepass._C was built without CUDA (no nvcc at build time, or ONEPASS_CUDA=0)"
    if backend == "cuda" and not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no CUDA device, driver, or CUDA build of torch)"
    return True, ""


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here: for ``device`` if given, else for any device of this machine."""
    if device is not None:
        kinds = [torch.device(device).type]
    else:
        kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(backend_status(b, k)[0] for k in kinds)]


def resolve_backend(backend: str, x: torch.Tensor, family: str, op: str) -> str:
    """The backend that runs ``op`` (of kernel ``family``) on tensors like ``x``.

    ``"auto"`` picks the first usable backend of the device's preference order that implements the
    family (and float64, for float64 inputs).  A forced backend that cannot run raises ``RuntimeError``
    naming the backend and the reason; float64 on a backend without it raises ``TypeError``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    device_type = x.device.type
    is64 = x.dtype == torch.float64

    def fits(name: str) -> bool:
        return (family, name) in LAUNCHERS and (not is64 or has(family, name, Cap.FLOAT64))

    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("torch",)):
            if fits(name) and backend_status(name, device_type)[0]:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if (family, backend) not in LAUNCHERS:
        have = [b for b in BACKENDS if (family, b) in LAUNCHERS]
        raise RuntimeError(f"onepass.{op}: backend {backend!r} does not implement this op (it has {have})")
    ok, why = backend_status(backend, device_type)
    if not ok:
        raise RuntimeError(f"onepass.{op}: backend {backend!r} cannot run here: {why}")
    if not fits(backend):
        raise TypeError(f"onepass.{op}: backend {backend!r} takes float32/float16/bfloat16 inputs; float64 runs "
                        "on backend='cpu' or 'torch'")
    return backend


# The AUTOGRAD launchers' code is traced by torch.compile, which cannot trace ``importlib``: import them
# with onepass (plain torch, cheap) so that ``launcher`` finds them in ``sys.modules``.
for _module, _caps in LAUNCHERS.values():
    if _caps & Cap.AUTOGRAD:
        importlib.import_module(_module)
