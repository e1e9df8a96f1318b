"""Glue for the pytest-benchmark suites in ``benchmarks/``: the same cases and providers as the CLI.

Shapes: the tiny "quick" shapes by default (the suites then run in seconds, without the peers that compile);
``ONEPASS_BENCH_SHAPES=default`` (or ``pytest benchmarks --bench-shapes default``) uses the CLI's default
shape of each family on the device, with every installed peer and, on the CPU, the GEMM "floor".
Device: CUDA when available (``ONEPASS_BENCH_DEVICE`` overrides).
"""
from __future__ import annotations

import os

import torch

from .registry import cases, get_family, providers_for, runs_in, set_onepass_backend


def device() -> str:
    return os.environ.get("ONEPASS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def params(family: str):
    """pytest params (case, provider) of one family, with readable ids."""
    import pytest

    quick = os.environ.get("ONEPASS_BENCH_SHAPES", "quick") != "default"
    dev = device()
    out = []
    fam = get_family(family)
    for c in cases(dev, quick=quick, names=[family], dtype=os.environ.get("ONEPASS_BENCH_DTYPE"), full=False):
        default_cpu = not (quick or dev.startswith("cuda"))
        for provider in [p for p in providers_for(fam, dev, quick=quick, full=False)
                         if runs_in(p, c.pass_, fam, default_cpu=default_cpu)]:
            cid = "-".join([c.op_label, c.shape_label.replace(" ", ","), c.dtype, c.pass_, provider])
            out.append(pytest.param(c, provider, id=cid))
    return out


def run(benchmark, case, provider, rounds: int | None = None) -> None:
    """Time one (case, provider) with ``benchmark.pedantic`` (setup = reset the grads, untimed)."""
    from .measure import Call

    set_onepass_backend(os.environ.get("ONEPASS_BENCH_BACKEND", "auto"))
    dev = device()
    call = Call(case, provider, dev)
    cuda = dev.startswith("cuda")

    def target():
        out = call.run()
        if cuda:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update({"case": case.id, "provider": provider, "device": dev})
    benchmark.pedantic(target, setup=call.prep, rounds=rounds or (20 if cuda else 3), warmup_rounds=1)
