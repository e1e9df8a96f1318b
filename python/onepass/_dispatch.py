"""Backend selection: which implementation of an op runs for given tensors.

Backends: ``"triton"`` (GPU, or CPU under the Triton interpreter ``TRITON_INTERPRET=1``),
``"cuda"`` (the CUDA kernels of ``onepass._C``), ``"cpu"`` (the C++/OpenMP kernels of ``onepass._C``)
and ``"torch"`` (the plain-PyTorch reference ``onepass.reference``).  ``"auto"`` takes, for the device
of the inputs, the first available backend of the op's preference list.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


_COMPILED: list = []  # [module or None] once looked up (a plain cache: torch.compile traces through it)


def compiled_module():
    """``onepass._C`` or None (warns once when it is missing)."""
    if _COMPILED:
        return _COMPILED[0]
    _COMPILED.append(_load_compiled())
    return _COMPILED[0]


def _load_compiled():
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
        return None
    return _C


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def backend_status(backend: str, device_type: str) -> tuple[bool, str]:
    """(usable, reason) for ``backend`` on tensors of ``device_type`` ('cpu' or 'cuda')."""
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if not _triton_installed():
            return False, "triton is not installed"
        if device_type == "cuda":
            return True, ""
        if triton_interpreting():
            return True, ""
        return False, "Triton kernels run on CUDA tensors (or on CPU tensors only with TRITON_INTERPRET=1)"
    mod = compiled_module()
    if mod is None:
        return False, "the compiled module onepass._C is not built"
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the C++ CPU kernels take CPU tensors, got {device_type} tensors"
        return True, ""
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the CUDA kernels take CUDA tensors, got {device_type} tensors"
        if not getattr(mod, "with_cuda", False):
            return False, "onepass._C was built without CUDA (no nvcc at build time, or ONEPASS_CUDA=0)"
        return True, ""
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here: for ``device`` if given, else for any device of this machine."""
    if device is not None:
        kinds = [torch.device(device).type]
    else:
        kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(backend_status(b, k)[0] for k in kinds)]


def resolve_backend(backend: str, device: torch.device, supported: tuple[str, ...], op: str) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    ``supported`` lists the backends that implement the op.  ``"auto"`` picks the first usable one in
    the device's preference order; a forced backend that cannot run raises ``RuntimeError`` naming
    the backend and the reason.
    """
    device_type = device.type
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("torch",)):
            if name in supported and backend_status(name, device_type)[0]:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend not in supported:
        raise RuntimeError(f"onepass.{op}: backend {backend!r} does not implement this op (it has {list(supported)})")
    ok, why = backend_status(backend, device_type)
    if not ok:
        raise RuntimeError(f"onepass.{op}: backend {backend!r} cannot run here: {why}")
    return backend
