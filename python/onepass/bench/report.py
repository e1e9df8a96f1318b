"""Outputs of a benchmark run: the stdout table, ``results.json``, ``results.md`` and ``plot.png``."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict

import torch

MiB = 2**20
PROVIDER_COLORS = {"onepass": "tab:green", "naive": "tab:red", "torch.compile(naive)": "tab:orange",
                   "liger": "tab:blue", "cce": "tab:purple"}
COLUMNS = ("op", "shape", "dtype", "pass", "provider", "median ms", "peak extra MiB", "scratch MiB", "time/naive",
           "mem/naive", "% of floor", "runs", "note")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str):
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def metadata(device: str, args: dict, peers: dict) -> dict:
    import onepass

    cuda = device.startswith("cuda")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onepass": getattr(onepass, "__version__", "unknown"),
        "onepass_commit": _git_commit(),
        "onepass_backends": onepass.available_backends(device),
        "liger_kernel": _version("liger_kernel") if cuda else None,
        "cut_cross_entropy": _version("cut_cross_entropy") if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "peers": {k: {"available": v[0], "reason": v[1]} for k, v in peers.items()},
        "args": args,
    }
    return meta


def add_ratios(rows: list) -> None:
    """time/naive and mem/naive of every row against the naive row of the same case."""
    naive = {r["case_id"]: r for r in rows if r["provider"] == "naive" and "error" not in r}
    for r in rows:
        n = naive.get(r["case_id"])
        if n is None or "error" in r:
            r["time_ratio"] = r["mem_ratio"] = None
            continue
        r["time_ratio"] = r["median_ms"] / n["median_ms"] if n["median_ms"] > 0 else None
        r["mem_ratio"] = r["peak_extra_bytes"] / n["peak_extra_bytes"] if n["peak_extra_bytes"] > 0 else None


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def cells(r: dict, gpu: bool) -> list:
    err = r.get("error")
    if err:
        return [r["op"], r["shape"], r["dtype"], r["pass"], r["provider"], "error", "", "", "", "", "", "",
                err[:80]]
    pct = r.get("pct_floor")
    return [r["op"], r["shape"], r["dtype"], r["pass"], r["provider"], _fmt(r["median_ms"], ".1f"),
            _fmt(r["peak_extra_bytes"] / MiB, ".1f"),
            _fmt(max(0, r["peak_extra_bytes"] - r["result_bytes"]) / MiB if "result_bytes" in r else None, ".1f"),
            _fmt(r.get("time_ratio"), ".2f"),
            _fmt(r.get("mem_ratio"), ".3f"), (_fmt(pct, ".0f") + ("%" if pct is not None else "")) if gpu else "n/a",
            str(r.get("runs", "")), r.get("note", "")]


def header_lines(meta: dict) -> list:
    lines = [
        f"device: {meta['device']} — {meta['device_name']}",
        f"date: {meta['date']}; onepass {meta['onepass']} ({meta.get('onepass_commit') or 'no git'}), "
        f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}"
        + (f", CUDA {meta['cuda']}" if meta.get("cuda") else ""),
        f"CPU: {meta['cpu_model']} ({meta['cpu_count']} cores, torch threads {meta['torch_threads']}); "
        f"load average at start {', '.join(f'{x:.1f}' for x in meta['load_average_start'])}"
        + (f", at end {', '.join(f'{x:.1f}' for x in meta['load_average_end'])}" if meta.get("load_average_end")
           else ""),
        f"onepass backend: {meta['args'].get('backend')} (available: {', '.join(meta['onepass_backends'])})",
    ]
    if meta.get("copy_bandwidth_GBps"):
        lines.append(f"measured device copy bandwidth: {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    missing = [f"{k} ({v['reason']})" for k, v in meta["peers"].items() if not v["available"]]
    if missing:
        lines.append("peers not listed: " + "; ".join(missing))
    lines.append("time/naive, mem/naive: provider ÷ naive on the same case (lower is better); peak extra = "
                 "peak memory during the call minus what the inputs already held; scratch = peak extra minus the "
                 "bytes of the outputs and input gradients the call returns; % of floor = floor time ÷ "
                 "measured time (GPU only)")
    return lines


def print_table(rows: list, meta: dict) -> None:
    gpu = meta["device"].startswith("cuda")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        print("\n".join(header_lines(meta)))
        print(" | ".join(COLUMNS))
        for r in rows:
            print(" | ".join(cells(r, gpu)))
        return
    console = Console(width=max(190, Console().width))
    for line in header_lines(meta):
        console.print(line, highlight=False, markup=False)
    table = Table(show_lines=False)
    for c in COLUMNS:
        table.add_column(c, justify="right" if c not in ("op", "shape", "dtype", "pass", "provider", "note")
                         else "left", overflow="fold", no_wrap=c in ("op", "shape"))
    from rich.markup import escape

    for r in rows:
        table.add_row(*(escape(c) for c in cells(r, gpu)))
    console.print(table)


def write_json(path: str, rows: list, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


def write_markdown(path: str, rows: list, meta: dict) -> None:
    gpu = meta["device"].startswith("cuda")
    out = ["# onepass benchmark results", ""]
    out += [f"- {line}" for line in header_lines(meta)]
    out += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells(r, gpu)) + " |")
    out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_plot(path: str, rows: list, meta: dict) -> bool:
    """Time and peak extra memory against the vocabulary size, one column per family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if "error" not in r and "V" in r["shape_dict"]]
    fams = list(dict.fromkeys(r["family"] for r in ok))
    if not fams:
        return False
    fig, axes = plt.subplots(2, len(fams), figsize=(4.2 * len(fams), 7), squeeze=False)
    for j, fam in enumerate(fams):
        series = defaultdict(list)
        for r in ok:
            if r["family"] != fam:
                continue
            other = tuple((k, v) for k, v in r["shape_dict"].items() if k != "V")
            label = f"{r['provider']} {r['pass']}" + (f" {r['variant_label']}" if r["variant_label"] else "")
            series[(label, other, r["provider"], r["pass"])].append(
                (r["shape_dict"]["V"], r["median_ms"], max(r["peak_extra_bytes"] / MiB, 1e-2)))
        others = sorted({k[1] for k in series})
        variants = sorted({k[0].split(" ", 2)[2] if k[0].count(" ") >= 2 else "" for k in series})
        for (label, other, provider, pass_), pts in sorted(series.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            style = "-" if pass_ == "fwd+bwd" else "--"
            var = label.split(" ", 2)[2] if label.count(" ") >= 2 else ""
            marker = "osD^v"[variants.index(var) % 5]
            color = PROVIDER_COLORS.get(provider)
            lab = label + ("" if len(others) == 1 else " " + " ".join(f"{k}={v}" for k, v in other))
            for i, y in ((0, [p[1] for p in pts]), (1, [p[2] for p in pts])):
                axes[i][j].plot(xs, y, style, marker=marker, color=color, label=lab)
        shape_txt = " ".join(f"{k}={v}" for k, v in others[0]) if len(others) == 1 else ""
        dtype = next(r["dtype"] for r in ok if r["family"] == fam)
        axes[0][j].set_title(f"{fam} ({shape_txt}, {dtype})" if shape_txt else f"{fam} ({dtype})", fontsize=9)
        axes[0][j].set_ylabel("median time [ms]")
        axes[1][j].set_ylabel("peak extra memory [MiB]")
        for i in (0, 1):
            axes[i][j].set_xlabel("vocabulary size V")
            axes[i][j].set_yscale("log")
            axes[i][j].grid(True, which="both", alpha=0.3)
        axes[0][j].legend(fontsize=6)
    fig.suptitle(f"onepass benchmarks — {meta['device_name']} — {meta['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
