"""The benchmark: ``python -m onepass.bench --quick`` on the CPU (smoke test of the whole CLI), the ratio and
verdict rules, the registry's default/full shapes, and a pytest-benchmark suite for every family."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onepass.bench import report
from onepass.bench.measure import interleave
from onepass.bench.registry import FLOOR_PROVIDER, cases, families, get_family, providers_for, runs_in

REPO = Path(__file__).resolve().parents[1]


def test_bench_cli_quick(tmp_path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""            # CPU run even on a GPU machine
    # the peers of the `peers` extra import in 10-40 s (trl, liger-kernel): not part of the smoke test
    providers = "onepass,naive,pot," + FLOOR_PROVIDER
    proc = subprocess.run([sys.executable, "-m", "onepass.bench", "--quick", "--device", "cpu", "--out", str(out),
                           "--providers", providers], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "results.md", "plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert str(out) in proc.stdout                # the output paths are printed
    table = [line for line in proc.stdout.splitlines() if not line.startswith("outputs: ")]
    assert max(len(line) for line in table) <= 120, "the tables must fit 120 columns"
    assert "verdict" in proc.stdout

    data = json.loads((out / "results.json").read_text())
    meta, rows, verdicts = data["meta"], data["rows"], data["verdicts"]
    for key in ("device_name", "torch", "triton", "onepass", "date", "cpu_model", "load_average_start",
                "load_average_end", "elapsed_s"):
        assert key in meta, key
    assert meta["device"] == "cpu"
    ok = [r for r in rows if "error" not in r]
    fams = {r["family"] for r in rows}
    assert set(families()) <= fams
    for fam in fams:
        for provider in ("onepass", "naive"):
            mine = [r for r in ok if r["family"] == fam and r["provider"] == provider]
            assert {r["pass"] for r in mine} == set(get_family(fam).passes), (fam, provider)
            for r in mine:
                assert len(r["times_ms"]) >= 2 and r["median_ms"] > 0 and r["peak_extra_bytes"] >= 0
                assert r["time_ratio_min"] <= r["time_ratio"] <= r["time_ratio_max"]
                assert r["load_before"] >= 0 and r["load_after"] >= 0
    naive = [r for r in ok if r["provider"] == "naive"]
    assert all(abs(r["time_ratio"] - 1.0) < 1e-9 for r in naive)
    # every provider of a case ran the same interleaved rounds
    for r in ok:
        n = next(x for x in naive if x["case_id"] == r["case_id"])
        assert len(r["times_ms"]) == len(n["times_ms"])
    # the fused-linear families have their CPU GEMM floor, and onepass its ratio to it
    for fam in ("linear_logprobs", "grpo_loss"):
        assert any(r["family"] == fam and r["provider"] == FLOOR_PROVIDER for r in ok), fam
        assert all(r.get("floor_ratio", 0) > 0 for r in ok if r["family"] == fam and r["provider"] == "onepass")
    assert {v["family"] for v in verdicts} == fams
    for v in verdicts:
        for pv in v["passes"].values():
            assert pv["vs"]["naive"]["verdict"] in ("faster", "slower", "unresolved")

    md = (out / "results.md").read_text()
    assert "| op |" in md and "onepass" in md and "naive" in md and meta["device_name"] in md
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("a,b,verdict", [
    ([1.0, 1.1, 0.9], [2.0, 2.0, 2.0], "faster"),
    ([3.0, 2.5, 2.2], [2.0, 2.0, 2.0], "slower"),
    ([1.0, 2.5, 1.9], [2.0, 2.0, 2.0], "unresolved"),     # the rounds disagree: no verdict
])
def test_round_ratios(a, b, verdict):
    st = report.round_ratios(a, b)
    ratios = sorted(x / y for x, y in zip(a, b))
    assert st["verdict"] == verdict
    assert (st["min"], st["median"], st["max"]) == (ratios[0], ratios[1], ratios[2])


class FakeClock:
    """A clock that only moves when a fake provider "runs": deterministic round lengths."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def provider(self, name, seconds, calls):
        def sample():
            calls.append(name)
            self.now += seconds
            return seconds * 1e3
        return sample


@pytest.mark.parametrize("rounds,max_rounds,budget_s,expected", [
    (2, 9, 1.0, 2),     # rounds of 0.375 s: a 3rd would end at 1.125 s > 1.0 (the old "started before 1.0" rule ran it)
    (2, 9, 1.125, 3),   # ... and with a budget of exactly 1.125 s it runs (binary-exact times)
    (3, 9, 0.1, 3),     # the minimum rounds run even past the budget
    (2, 5, 100.0, 5),   # never more than max_rounds
])
def test_rounds_are_capped_by_the_time_budget(rounds, max_rounds, budget_s, expected):
    clock, calls = FakeClock(), []
    samplers = {"a": clock.provider("a", 0.125, calls), "b": clock.provider("b", 0.25, calls)}
    times = interleave(samplers, rounds=rounds, max_rounds=max_rounds, budget_s=budget_s, clock=clock)
    assert times == {"a": [125.0] * expected, "b": [250.0] * expected}
    assert calls == (["a", "b", "b", "a"] * expected)[: 2 * expected]      # order rotated every round
    assert clock.now - 100.0 == 0.375 * expected


def test_progress_eta_is_the_estimated_work_left_at_the_pace_so_far(capsys):
    clock = FakeClock()
    with report.progress(100.0) as prog:
        prog.clock, prog.t0 = clock, clock()
        assert prog.eta_s() is None
        clock.now += 10.0
        prog.advance(25.0)                  # 25 estimated seconds done in 10 s: the machine is 2.5x faster
        assert prog.eta_s() == 30.0
        prog.advance(100.0)                 # more than estimated: nothing left
        assert prog.eta_s() == 0.0


def test_default_run_is_one_shape_per_family_and_full_is_the_sweep():
    default = cases("cpu", full=False)
    full = cases("cpu", full=True)
    for name, fam in families().items():
        shapes = {c.shape for c in default if c.family == name}
        assert len(shapes) == 1, name
        sweep = {c.shape for c in full if c.family == name}
        assert len(sweep) == len(fam.shapes["cpu"]), name
    # --quick drops the peers that compile; the default CPU run compiles naive only where the family asks
    fam = get_family("linear_logprobs")
    assert "torch.compile(naive)" not in providers_for(fam, "cpu", quick=True)
    assert ("torch.compile(naive)" in providers_for(fam, "cpu", full=False)) == bool(fam.compile_default)
    # ... and only in the passes it lists; --full (default_cpu=False) compiles in every pass
    for pass_ in fam.passes:
        assert runs_in("torch.compile(naive)", pass_, fam, default_cpu=True) == (pass_ in fam.compile_default)
        assert runs_in("torch.compile(naive)", pass_, fam)
    assert fam.compile_default == ("fwd+bwd",)
    assert "torch.compile(naive)" not in providers_for(get_family("logprobs"), "cpu", full=False)


def test_every_family_has_a_pytest_benchmark_suite():
    suites = "".join(p.read_text() for p in (REPO / "benchmarks").glob("test_bench_*.py"))
    covered = set(re.findall(r'params\("([^"]+)"\)', suites))
    assert set(families()) <= covered, sorted(set(families()) - covered)


def test_importing_onepass_does_not_import_the_bench_extra():
    code = "import sys, onepass, onepass.bench; print(sorted({'matplotlib', 'rich'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
