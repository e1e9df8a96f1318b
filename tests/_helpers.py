"""Shared test helpers: which (backend, device) pairs run here, and the tolerance rule.

Tolerance rule (flash-attention's): error vs the float64 reference ≤ 2 × the error of the same-dtype
naive PyTorch computation + a small absolute floor.
"""
from __future__ import annotations

import os

import pytest
import torch

import onepass

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4, torch.float64: 1e-10}


def backend_cases(ops=("triton", "cuda", "cpu", "torch")):
    """pytest params of (backend, device) usable here; CUDA-device cases carry the gpu mark."""
    cases = []
    gpu = torch.cuda.is_available()
    for be in ops:
        if be == "cuda":
            cases.append(pytest.param(be, "cuda", marks=pytest.mark.gpu, id="cuda"))
        elif be == "triton":
            if gpu:
                cases.append(pytest.param(be, "cuda", marks=pytest.mark.gpu, id="triton-gpu"))
            elif os.environ.get("TRITON_INTERPRET") == "1":
                cases.append(pytest.param(be, "cpu", id="triton-interp"))
        elif be == "cpu":
            cases.append(pytest.param(be, "cpu", id="cpu"))
        else:
            cases.append(pytest.param(be, "cpu", id="torch"))
            if gpu:
                cases.append(pytest.param(be, "cuda", marks=pytest.mark.gpu, id="torch-gpu"))
    return cases


def interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def max_err(x: torch.Tensor, truth: torch.Tensor, strict: bool = True) -> float:
    """Max |x − truth| over finite reference entries; ``strict``: x must be non-finite exactly where the
    reference is (same sign of infinity)."""
    out_dtype = x.dtype
    x, truth = x.detach().double().cpu(), truth.detach().double().cpu()
    assert x.shape == truth.shape, f"shape {tuple(x.shape)} != reference {tuple(truth.shape)}"
    truth = truth.to(out_dtype).double()  # a value beyond the output dtype's range is rightly inf there
    finite = torch.isfinite(truth)
    if strict:
        assert torch.equal(torch.isfinite(x), finite), "non-finite entries differ from the reference"
        assert torch.equal(x[~finite].nan_to_num(0.0), truth[~finite].nan_to_num(0.0)), "infinities differ"
    keep = finite & torch.isfinite(x)
    if not keep.any():
        return 0.0
    return (x[keep] - truth[keep]).abs().max().item()


def assert_tolerance(out, truth, naive, dtype, what="", scale=1.0, factor=2.0):
    """err(out) ≤ factor·err(naive same-dtype) + floor·scale (factor 2 unless a test states why more); an
    output stored in bf16/fp16 (gradients) may also be off by one unit in the last place at the largest
    reference magnitude."""
    err = max_err(out, truth)
    naive_err = max_err(naive, truth, strict=False) if naive is not None else 0.0
    bound = factor * naive_err + FLOOR[dtype] * scale
    if out.dtype in (torch.bfloat16, torch.float16):
        finite = truth[torch.isfinite(truth)]
        bound += torch.finfo(out.dtype).eps * (finite.abs().max().item() if finite.numel() else 0.0)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (naive {naive_err:.3e})"
