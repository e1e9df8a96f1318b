"""``python -m onepass.bench``: run the benchmark registry and write the table, JSON, markdown and plot.

Examples::

    python -m onepass.bench                       # default shapes of this machine (CPU or GPU)
    python -m onepass.bench --quick --out /tmp/b  # tiny shapes: smoke test, seconds
    python -m onepass.bench --families linear_logprobs --repeat 5
    python -m onepass.bench --list                # the cases, without running them
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict

import torch

from . import report
from .registry import Case, cases, families, get_family, peer_status, providers_for, set_onepass_backend

MiB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m onepass.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--families", default=None,
                   help=f"comma-separated families (default: all): {', '.join(families())}")
    p.add_argument("--providers", default=None, help="comma-separated providers to keep (default: all available)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma-separated passes: fwd, fwd+bwd")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke test; finishes in seconds)")
    p.add_argument("--out", default="bench_out", help="output directory (default: bench_out/)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per measurement (median); default 3 on CPU, 20 on GPU")
    p.add_argument("--max-time", type=float, default=None,
                   help="CPU: stop repeating once this many seconds of calls were spent (default 60; quick 5)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 GPU)")
    p.add_argument("--backend", default="auto", help="backend of the onepass provider (default auto)")
    p.add_argument("--isolate", choices=("case", "none"), default=None,
                   help="CPU: 'case' = fresh subprocess per (case, provider) (default), 'none' = in-process "
                        "(default with --quick)")
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


def run_worker(group, provider, args, timeout=3600):
    from ._worker import RESULT_TAG

    spec = {"cases": [c.to_json() for c in group], "provider": provider, "repeat": args.repeat,
            "max_time": args.max_time, "backend": args.backend}
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, "-m", "onepass.bench._worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"error": f"worker timed out after {timeout} s"} for _ in group]
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            if proc.returncode != 0:
                for r in res:
                    r.setdefault("warning", f"worker exited with code {proc.returncode} after reporting")
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    msg = f"worker exited with code {proc.returncode}: " + " / ".join(tail)
    return [{"error": msg[:300]} for _ in group]


def run_inprocess(group, provider, args, device):
    from ._worker import error_result
    from .measure import measure_cpu, measure_cuda

    out = []
    for c in group:
        try:
            if device.startswith("cuda"):
                out.append(measure_cuda(c, provider, repeat=args.repeat, device=device))
            else:
                out.append(measure_cpu(c, provider, repeat=args.repeat, max_time=args.max_time))
        except Exception as exc:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            res = error_result(exc)
            if isinstance(exc, torch.OutOfMemoryError):
                res["error"] = "out of memory"
            out.append(res)
    return out


def base_row(case: Case, provider: str) -> dict:
    fam = get_family(case.family)
    return {"family": case.family, "op": case.op_label, "variant": case.variant_dict,
            "variant_label": ",".join(str(v) for _, v in case.variant), "shape": case.shape_label,
            "shape_dict": case.shape_dict, "dtype": case.dtype, "pass": case.pass_, "provider": provider,
            "case_id": case.id, "note": fam.notes.get(provider, "")}


def add_floor(row: dict, case: Case, device: str) -> None:
    from .floors import floor_ms

    fam = get_family(case.family)
    if fam.floor is None or "error" in row:
        return
    fl = fam.floor(case.shape_dict, case.dtype, case.pass_, case.variant_dict)
    if fl is None:
        return
    try:
        ms = floor_ms(fl, case.dtype, device)
    except Exception as exc:  # e.g. the floor's GEMM operands do not fit
        row["floor_error"] = f"{type(exc).__name__}: {exc}"[:200]
        torch.cuda.empty_cache()
        return
    row["floor_ms"], row["floor_kind"] = ms, fl.label
    if fl.bytes:
        row["floor_bytes"] = fl.bytes
    row["pct_floor"] = 100.0 * ms / row["median_ms"] if row["median_ms"] > 0 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    if args.repeat is None:
        args.repeat = 20 if cuda else (1 if args.quick else 3)
    if args.max_time is None:
        args.max_time = 2.0 if args.quick else 60.0
    if args.quick and not cuda:
        torch.set_num_threads(1)    # tiny shapes: threads only add contention on a busy machine
    isolate = args.isolate or ("none" if (args.quick or cuda) else "case")
    set_onepass_backend(args.backend)
    names = [n.strip() for n in args.families.split(",")] if args.families else None
    only = [p.strip() for p in args.providers.split(",")] if args.providers else None
    passes = tuple(p.strip() for p in args.passes.split(","))
    cs = cases(device, quick=args.quick, names=names, dtype=args.dtype, passes=passes)
    peers = peer_status()
    if args.list:
        for c in cs:
            print(c.id, "->", ", ".join(providers_for(get_family(c.family), device, only)))
        return 0
    missing = [f"{k} ({why})" for k, (ok, why) in peers.items() if not ok]
    if missing:
        print("onepass.bench: peers not listed: " + "; ".join(missing), file=sys.stderr, flush=True)

    meta = report.metadata(device, {**vars(args), "device": device, "isolate": isolate}, peers)
    if cuda:
        from .floors import copy_bandwidth

        meta["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
    rows = []
    t_start = time.perf_counter()
    for group in group_cases(cs):
        fam = get_family(group[0].family)
        for provider in providers_for(fam, device, only):
            if isolate == "case" and not cuda:
                results = run_worker(group, provider, args)
            else:
                results = run_inprocess(group, provider, args, device)
            for case, res in zip(group, results):
                row = {**base_row(case, provider), **res}
                if "peak_extra_bytes" in row:
                    row["peak_extra_mib"] = row["peak_extra_bytes"] / MiB
                if cuda:
                    add_floor(row, case, device)
                rows.append(row)
                msg = row.get("error") or f"{row['median_ms']:.1f} ms, {row['peak_extra_mib']:.1f} MiB extra"
                print(f"  [{time.perf_counter() - t_start:6.0f}s] {case.id} | {provider}: {msg}",
                      file=sys.stderr, flush=True)
    report.add_ratios(rows)
    meta["load_average_end"] = list(os.getloadavg())
    meta["elapsed_s"] = time.perf_counter() - t_start

    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f) for k, f in
             (("json", "results.json"), ("md", "results.md"), ("plot", "plot.png"))}
    report.print_table(rows, meta)
    report.write_json(paths["json"], rows, meta)
    report.write_markdown(paths["md"], rows, meta)
    if not report.write_plot(paths["plot"], rows, meta):
        paths.pop("plot")
    print("outputs: " + ", ".join(os.path.abspath(p) for p in paths.values()))
    bad = [r for r in rows if r["provider"] in ("onepass", "naive") and "error" in r]
    if bad:
        print(f"onepass.bench: {len(bad)} onepass/naive measurement(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
