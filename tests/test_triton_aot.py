"""Ahead-of-time compile of the Triton kernels for sm_90 and sm_80 with Triton's real NVIDIA backend
(no GPU, no interpreter): ``onepass.triton_kernels.aot_check`` on its representative subset.

The compile runs in a subprocess with a clean environment: this test session runs the kernels under
TRITON_INTERPRET=1 (tests/conftest.py), which must not be set when the kernels are defined for a real
target.  The full matrix: ``python -m onepass.triton_kernels.aot_check --full``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from onepass.triton_kernels import aot_check

SAMPLE_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_vocab_grad_kernel' for 'sm_90a'
ptxas info    : Function properties for _vocab_grad_kernel
    1304 bytes stack frame, 1396 bytes spill stores, 1484 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 664 bytes cmem[0]
"""


def test_parse_ptxas_log_and_spill_rule():
    row = aot_check.parse_ptxas_log(SAMPLE_LOG)
    assert row == {"registers": 255, "stack": 1304, "spill_stores": 1396, "spill_loads": 1484}
    row.update(arch=90, dtype="bf16", shared=73728)
    assert any("spills" in p for p in aot_check.problems(row))
    assert aot_check.problems({**row, "arch": 80}) == []  # sm_80 spills are reported, not failed
    assert aot_check.problems({**row, "dtype": "fp32"}) == []
    assert any("shared memory" in p for p in aot_check.problems({**row, "spill_stores": 0, "spill_loads": 0,
                                                                  "shared": 300000}))
    with pytest.raises(ValueError, match="ptxas"):
        aot_check.parse_ptxas_log("ptxas info    : 0 bytes gmem")


def test_matrix_covers_every_launcher_variant():
    names = [v.name for v in aot_check.full_matrix()]
    assert len(names) == len(set(names))
    for path in ("linear_fwd", "linear_fwd_split", "linear_grad", "linear_bwd", "logits_fwd", "logits_bwd"):
        for kind in aot_check.KIND_NAMES.values():
            for dtype in ("bf16", "fp16", "fp32"):
                assert any(n.startswith(f"{path}-{dtype}-pair-{kind}") for n in names), (path, kind, dtype)
    for arch, subset in aot_check.SUBSET.items():
        assert set(subset) <= set(names), arch


def test_compile_subset_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "onepass.triton_kernels.aot_check", "--jobs", "2", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    compiled = {(r["variant"], r["arch"]) for r in rows}
    assert compiled == {(n, a) for a, subset in aot_check.SUBSET.items() for n in subset}
    for r in rows:
        assert "error" not in r, r
        assert r["registers"] > 0 and r["shared"] <= aot_check.MAX_SHARED[r["arch"]]
        if r["arch"] == 90 and r["dtype"] == "bf16":
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        if r["variant"].startswith("linear_") and r["dtype"] == "bf16" and r["kernel"] != "_vocab_stats_merge_kernel":
            # the fused-linear GEMM runs on the tensor cores: wgmma on Hopper, mma.sync on Ampere
            assert r["dot"] == ("wgmma" if r["arch"] == 90 else "mma"), r
