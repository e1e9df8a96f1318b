"""Smoke test of the benchmark CLI: ``python -m onepass.bench --quick`` on the CPU writes its outputs."""
import json

from onepass.bench.registry import get_family
import os
import subprocess
import sys


def test_bench_cli_quick(tmp_path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""            # CPU run even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "onepass.bench", "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "results.md", "plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert str(out) in proc.stdout                # the output paths are printed

    data = json.loads((out / "results.json").read_text())
    meta, rows = data["meta"], data["rows"]
    for key in ("device_name", "torch", "triton", "onepass", "date", "cpu_model"):
        assert key in meta, key
    assert meta["device"] == "cpu"
    ok = [r for r in rows if "error" not in r]
    families = {r["family"] for r in rows}
    assert {"logprobs", "linear_logprobs", "divergence", "linear_divergence", "policy_ref", "grpo_loss",
            "opd_loss"} <= families
    for fam in families:
        for provider in ("onepass", "naive"):
            mine = [r for r in ok if r["family"] == fam and r["provider"] == provider]
            assert {r["pass"] for r in mine} == set(get_family(fam).passes), (fam, provider)
            for r in mine:
                assert r["median_ms"] > 0 and r["peak_extra_bytes"] >= 0
                assert r["time_ratio"] is not None
    naive = [r for r in ok if r["provider"] == "naive"]
    assert all(abs(r["time_ratio"] - 1.0) < 1e-9 for r in naive)

    md = (out / "results.md").read_text()
    assert "| op |" in md and "onepass" in md and "naive" in md and meta["device_name"] in md
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
