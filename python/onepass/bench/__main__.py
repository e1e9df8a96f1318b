"""``python -m onepass.bench``: fused (onepass) vs naive PyTorch, and vs the installed peers, on this machine.

The default run measures every op family at one representative shape (a few minutes on two CPU cores)
and ends with a verdict per family; ``--full`` runs the shape sweeps; ``--quick`` is a seconds-long smoke
test on tiny shapes.  Providers of one case are timed interleaved (A B A B ..., several rounds): a ratio is
the median of the per-round ratios, with its min-max, and "unresolved" when that range crosses 1.0.

Examples::

    python -m onepass.bench                       # default: one shape per family, verdicts, plot
    python -m onepass.bench --full                # the shape sweeps (CPU: ~30 min)
    python -m onepass.bench --quick --out /tmp/b  # tiny shapes: smoke test, seconds
    python -m onepass.bench --families linear_logprobs --rounds 5
    python -m onepass.bench --list                # the cases and providers, without running them
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import OrderedDict

import torch

from . import report
from .registry import cases, compiles, families, get_family, peer_status, providers_for, runs_in, \
    set_onepass_backend

MiB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m onepass.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N "
                   "(default: %(default)s)")
    p.add_argument("--families", default=None,
                   help=f"comma-separated families (default: all): {', '.join(families())}")
    p.add_argument("--providers", default=None, help="comma-separated providers to keep (default: all available)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma-separated passes (default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny shapes, no compiling peers, in-process: smoke "
                      "test, seconds")
    size.add_argument("--full", action="store_true", help="the shape sweep of every family instead of one shape")
    p.add_argument("--out", default="bench_out", help="output directory (default: %(default)s/)")
    p.add_argument("--rounds", type=int, default=None,
                   help="minimum interleaved rounds per case (default: 3; 2 with --quick)")
    p.add_argument("--max-rounds", type=int, default=9,
                   help="more rounds, up to this many, while they fit in --max-time (default: %(default)s)")
    p.add_argument("--max-time", type=float, default=None,
                   help="time budget of a case's rounds, s: after --rounds, a round starts only when it is "
                        "expected to end within it (default: 1.5; 3 with --full, 0.2 with --quick)")
    p.add_argument("--repeat", type=int, default=10,
                   help="CUDA: event-timed calls per provider per round, median (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on CPU, "
                   "bfloat16 on GPU)")
    p.add_argument("--backend", default="auto", help="backend of the onepass provider (default: %(default)s)")
    p.add_argument("--isolate", choices=("case", "none"), default=None,
                   help="CPU: 'case' = each measurement in a fresh forked process (default), 'none' = "
                        "in-process (default with --quick and on CUDA)")
    p.add_argument("--list", action="store_true", help="list the cases and providers, run nothing")
    return p.parse_args(argv)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return name


def group_cases(cs):
    """Cases that differ only in the pass, in order."""
    groups = OrderedDict()
    for c in cs:
        groups.setdefault((c.family, c.variant, c.shape, c.dtype), []).append(c)
    return list(groups.values())


def base_row(case, provider: str) -> dict:
    return {"family": case.family, "op": case.op_label, "variant": case.variant_dict,
            "variant_label": ",".join(str(v) for _, v in case.variant), "shape": case.shape_label,
            "shape_dict": case.shape_dict, "dtype": case.dtype, "pass": case.pass_, "provider": provider,
            "case_id": case.id}


class Runner:
    """Runs the memory and timing jobs of a case group: forked (CPU ``--isolate case``) or in-process."""

    def __init__(self, args, device: str, peers: list):
        self.args, self.device = args, device
        self.cuda = device.startswith("cuda")
        self.isolated = args.isolate == "case" and not self.cuda
        self.peers = peers

    def start(self, progress) -> float:
        """CPU, isolated: start the forkserver and wait until it has imported torch, onepass and the peers (trl
        and liger-kernel take seconds to import).  Returns the seconds waited."""
        if not self.isolated:
            return 0.0
        from . import _worker

        progress.describe("starting: importing torch, onepass and the peers once (forkserver)")
        t0 = time.perf_counter()
        _worker.start(self.peers)
        _worker.run_isolated(_worker.ready)
        progress.advance(STARTUP_S)
        return time.perf_counter() - t0

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of this process and, when isolated, the forkserver and its jobs: on idle
        cores the run takes about this much wall time divided by the cores the jobs keep busy."""
        t = os.times()
        own = t.user + t.system
        if not self.isolated:
            return own
        from . import _worker

        return own + _worker.cpu_seconds()

    def memory(self, group, provider) -> list:
        if self.cuda:
            from .measure import measure_memory_cuda

            out = []
            for c in group:
                try:
                    out.append(measure_memory_cuda(c, provider, device=self.device))
                except Exception as exc:  # reported as the row's error
                    from .measure import error_text

                    torch.cuda.empty_cache()
                    out.append({"error": "out of memory" if isinstance(exc, torch.OutOfMemoryError)
                                else error_text(exc)})
            return out
        from . import _worker

        spec = [c.to_json() for c in group]
        if self.isolated:
            res = _worker.run_isolated(_worker.memory_job, spec, provider, self.args.backend)
        else:
            res = _worker.memory_job(spec, provider, self.args.backend)
        return [res] * len(group) if isinstance(res, dict) else res

    def timing(self, case, providers) -> dict:
        a = self.args
        kw = {"rounds": a.rounds, "max_rounds": max(a.rounds, a.max_rounds), "max_time": a.max_time}
        if self.cuda:
            from .measure import time_interleaved

            return time_interleaved(case, providers, device=self.device, repeat=a.repeat, **kw)
        from . import _worker

        if self.isolated:
            res = _worker.run_isolated(_worker.timing_job, case.to_json(), providers, a.backend, **kw)
        else:
            res = _worker.timing_job(case.to_json(), providers, a.backend, **kw)
        if "error" in res:      # the whole job failed
            return {"times": {p: {"error": res["error"]} for p in providers}, "memory": {}}
        return res


#: prior seconds of one job on two idle cores, the weights of the progress bar (its ETA rescales them by the
#: pace measured so far): the forkserver's imports, a memory job (one call per pass in a fresh process), a
#: compile of a peer
STARTUP_S = 20.0
MEMORY_JOB_S = 1.0
COMPILE_S = 10.0


def memory_jobs(runs: dict, cuda: bool) -> list:
    """The providers of a case group (``runs``: {case id: providers measured}) whose peak memory is measured in a
    job of their own (on the CPU, compiling peers are measured by the timing job, right after their compile)."""
    return [p for p in dict.fromkeys(p for ps in runs.values() for p in ps) if cuda or not compiles(p)]


def measured(case, providers: list, args, cuda: bool) -> list:
    """The providers measured in ``case``'s pass."""
    fam = get_family(case.family)
    return [p for p in providers if runs_in(p, case.pass_, fam, default_cpu=not (cuda or args.full or args.quick))]


def timing_estimate_s(providers: list, max_time: float) -> float:
    """Prior seconds of the timing job of a case measuring ``providers``."""
    return max_time + COMPILE_S * sum(compiles(p) for p in providers)


def estimate_s(groups: list, args, cuda: bool) -> float:
    """Prior seconds of the whole run (the progress bar's total)."""
    total = STARTUP_S if args.isolate == "case" and not cuda else 0.0
    for group, providers in groups:
        runs = {c.id: measured(c, providers, args, cuda) for c in group}
        total += MEMORY_JOB_S * len(memory_jobs(runs, cuda))
        total += sum(timing_estimate_s(ps, args.max_time) for ps in runs.values())
    return total


def run_group(runner: Runner, group, providers: list, progress) -> list:
    """Rows of one case group: peak memory per provider (isolated), then the interleaved timing per pass.
    Every row records the wall and CPU seconds of its jobs (``memory_job_s``, ``timing_job_s``, ``*_cpu_s``)."""
    runs = {c.id: measured(c, providers, runner.args, runner.cuda) for c in group}
    rows = {(c.id, p): base_row(c, p) for c in group for p in runs[c.id]}
    for p in memory_jobs(runs, runner.cuda):
        mine = [c for c in group if p in runs[c.id]]
        progress.describe(f"{group[0].family} {group[0].shape_label}: memory of {p}")
        t0, cpu0 = time.perf_counter(), runner.cpu_seconds()
        results = runner.memory(mine, p)
        spent = {"memory_job_s": time.perf_counter() - t0, "memory_job_cpu_s": runner.cpu_seconds() - cpu0}
        for c, res in zip(mine, results):
            rows[(c.id, p)].update(res, **spent)
        progress.advance(MEMORY_JOB_S)
    for c in group:
        progress.describe(f"{c.family} {c.shape_label} {c.pass_}: timing {len(runs[c.id])} providers interleaved")
        load_before, t0, cpu0 = os.getloadavg()[0], time.perf_counter(), runner.cpu_seconds()
        timing = runner.timing(c, runs[c.id])
        spent = {"load_before": load_before, "load_after": os.getloadavg()[0],
                 "timing_job_s": time.perf_counter() - t0, "timing_job_cpu_s": runner.cpu_seconds() - cpu0}
        for p in runs[c.id]:
            row = rows[(c.id, p)]
            row.update(**spent, **timing["memory"].get(p, {}))
            t = timing["times"].get(p, {"error": "not timed"})
            if isinstance(t, dict):
                row.setdefault("error", t["error"])
            else:
                row["times_ms"] = t
        progress.advance(timing_estimate_s(runs[c.id], runner.args.max_time))
    for row in rows.values():
        if "peak_extra_bytes" in row:
            row["peak_extra_mib"] = row["peak_extra_bytes"] / MiB
        if "error" in row:
            progress.log(f"{row['case_id']} | {row['provider']}: {row['error']}")
    return list(rows.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.max_time is None:
        args.max_time = 0.2 if args.quick else (3.0 if args.full else 1.5)
    if args.quick and not cuda:
        torch.set_num_threads(1)    # tiny shapes: threads only add contention on a busy machine
    args.isolate = args.isolate or ("none" if (args.quick or cuda) else "case")
    set_onepass_backend(args.backend)
    names = [n.strip() for n in args.families.split(",")] if args.families else None
    only = [p.strip() for p in args.providers.split(",")] if args.providers else None
    passes = tuple(p.strip() for p in args.passes.split(","))
    cs = cases(device, quick=args.quick, names=names, dtype=args.dtype, passes=passes, full=args.full)
    groups = [(g, list(providers_for(get_family(g[0].family), device, only, quick=args.quick, full=args.full)))
              for g in group_cases(cs)]
    if args.list:
        for group, providers in groups:
            for c in group:
                print(c.id, "->", ", ".join(measured(c, providers, args, cuda)))
        return 0
    peers = peer_status("cuda" if cuda else "cpu")
    used = {p for _, ps in groups for p in ps}
    if args.quick:
        peers = {k: (False, "compiles: not in --quick") if ok and compiles(k) else (ok, why)
                 for k, (ok, why) in peers.items()}
    missing = [f"{k} ({why})" for k, (ok, why) in peers.items() if not ok]
    if missing:
        print("onepass.bench: peers not run: " + "; ".join(missing), file=sys.stderr, flush=True)

    meta = report.metadata(device, {**vars(args), "device": device}, peers)
    if cuda:
        from .floors import copy_bandwidth

        meta["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))   # unwind: stop the running job
    t_start = time.perf_counter()
    runner = Runner(args, device, sorted(used))
    rows = []
    with report.progress(estimate_s(groups, args, cuda)) as prog:
        meta["startup_s"] = runner.start(prog)
        for group, providers in groups:
            rows += run_group(runner, group, providers, prog)
    if cuda:
        add_gpu_floors(rows, device)
    report.add_ratios(rows)
    meta["load_average_end"] = list(os.getloadavg())
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["cpu_s"] = runner.cpu_seconds()
    verdicts = report.verdicts(rows)

    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f) for k, f in
             (("json", "results.json"), ("md", "results.md"), ("plot", "plot.png"))}
    report.print_table(rows, verdicts, meta)
    report.write_json(paths["json"], rows, verdicts, meta)
    report.write_markdown(paths["md"], rows, verdicts, meta)
    if not report.write_plot(paths["plot"], rows, meta):
        paths.pop("plot")
    print("outputs: " + ", ".join(os.path.abspath(p) for p in paths.values()))
    bad = [r for r in rows if r["provider"] in ("onepass", "naive") and "error" in r]
    if bad:
        print(f"onepass.bench: {len(bad)} onepass/naive measurement(s) failed", file=sys.stderr)
        return 1
    return 0


def add_gpu_floors(rows: list, device: str) -> None:
    """GPU "% of floor" of every row: the family's measured floor (floors.py) ÷ the row's median time."""
    import statistics

    from .floors import floor_ms

    for row in rows:
        fam = get_family(row["family"])
        if fam.floor is None or "error" in row:
            continue
        fl = fam.floor(row["shape_dict"], row["dtype"], row["pass"], row["variant"])
        if fl is None:
            continue
        try:
            ms = floor_ms(fl, row["dtype"], device)
        except Exception as exc:  # e.g. the floor's GEMM operands do not fit
            row["floor_error"] = f"{type(exc).__name__}: {exc}"[:200]
            torch.cuda.empty_cache()
            continue
        row["floor_ms"], row["floor_kind"] = ms, fl.label
        row["pct_floor"] = 100.0 * ms / statistics.median(row["times_ms"])


if __name__ == "__main__":
    sys.exit(main())
