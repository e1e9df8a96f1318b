"""Outputs of a benchmark run: ratios and verdicts, the stdout tables, ``results.json``, ``results.md`` and
``plot.png``.  rich (tables, progress bar) and matplotlib (plot) are the ``bench`` extra, imported lazily:
without rich the tables are plain text, without matplotlib there is no plot."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections import OrderedDict

import torch

from .registry import FLOOR_PROVIDER, get_family

MiB = 2**20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str):
    """Installed version of a distribution (without importing it), or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
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
        "liger_kernel": _version("liger-kernel"),
        "trl": _version("trl"),
        "pot": _version("pot"),
        "cut_cross_entropy": _version("cut-cross-entropy") if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "peers": {k: {"available": v[0], "reason": v[1]} for k, v in peers.items()},
        "args": args,
    }
    return meta



# ------------------------------------------------------------------------------------------------
# Ratios and verdicts
# ------------------------------------------------------------------------------------------------
def round_ratios(a: list, b: list) -> dict | None:
    """a ÷ b per interleaved round: median, min, max and the verdict ("faster" when every round's ratio is
    below 1, "slower" when every one is above, else "unresolved")."""
    rs = [x / y for x, y in zip(a, b) if y > 0]
    if not rs:
        return None
    lo, hi = min(rs), max(rs)
    verdict = "faster" if hi < 1.0 else ("slower" if lo > 1.0 else "unresolved")
    return {"median": statistics.median(rs), "min": lo, "max": hi, "verdict": verdict, "rounds": len(rs)}


def add_ratios(rows: list) -> None:
    """Per row: median/min/max time of its rounds, time and memory ratio to the naive row of the same case
    (``time_ratio*``: median and range of the per-round ratios), and for onepass rows the ratio to the floor."""
    by_case: dict = {}
    for r in rows:
        if "error" not in r and r.get("times_ms"):
            t = r["times_ms"]
            r.update(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), rounds=len(t))
            by_case.setdefault(r["case_id"], {})[r["provider"]] = r
    for r in rows:
        mine = by_case.get(r["case_id"], {})
        naive, r["time_ratio"], r["mem_ratio"] = mine.get("naive"), None, None
        if naive is None or "median_ms" not in r:
            continue
        st = round_ratios(r["times_ms"], naive["times_ms"])
        if st:
            r.update(time_ratio=st["median"], time_ratio_min=st["min"], time_ratio_max=st["max"],
                     time_verdict=st["verdict"])
        if r.get("peak_extra_bytes") is not None and naive.get("peak_extra_bytes"):
            r["mem_ratio"] = r["peak_extra_bytes"] / naive["peak_extra_bytes"]
        floor = mine.get(FLOOR_PROVIDER)
        if r["provider"] == "onepass" and floor is not None:
            st = round_ratios(r["times_ms"], floor["times_ms"])
            if st:
                r.update(floor_ratio=st["median"], floor_ratio_min=st["min"], floor_ratio_max=st["max"])


def verdicts(rows: list) -> list:
    """Per case and pass: onepass against naive and against every other provider of the case (time: median of
    the per-round ratios with min-max and verdict; memory: ratio of peak extra bytes) and against its floor."""
    cases: OrderedDict = OrderedDict()
    for r in rows:
        if "median_ms" in r:
            key = (r["family"], r["op"], r["shape"], r["dtype"])
            cases.setdefault(key, OrderedDict()).setdefault(r["pass"], {})[r["provider"]] = r
    out = []
    for (fam, op, shape, dtype), passes in cases.items():
        entry = {"family": fam, "op": op, "shape": shape, "dtype": dtype, "passes": {}}
        for pass_, provs in passes.items():
            mine = provs.get("onepass")
            if mine is None:
                continue
            vs = {}
            for other, r in provs.items():
                if other in ("onepass", FLOOR_PROVIDER):
                    continue
                st = round_ratios(mine["times_ms"], r["times_ms"])
                if st is None:
                    continue
                peak, other_peak = mine.get("peak_extra_bytes"), r.get("peak_extra_bytes")
                st["memory"] = peak / other_peak if peak is not None and other_peak else None
                vs[other] = st
            fl = provs.get(FLOOR_PROVIDER)
            entry["passes"][pass_] = {
                "vs": vs, "floor": round_ratios(mine["times_ms"], fl["times_ms"]) if fl else None,
                "load_before": mine.get("load_before"), "load_after": mine.get("load_after")}
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------
# Text output
# ------------------------------------------------------------------------------------------------
def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _ratio_cell(r: dict) -> str:
    if r.get("time_ratio") is None:
        return "—"
    return f"{r['time_ratio']:.2f} [{r['time_ratio_min']:.2f}–{r['time_ratio_max']:.2f}]"


def _mem(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 0.1 else f"{x:.2f}"


TABLE_COLUMNS = ("case", "pass", "provider", "ms", "×naive [min–max]", "MiB", "mem×naive", "×floor", "n")


def table_rows(rows: list) -> tuple:
    """(cells, starts) of the main table: the case (op, variant, shape, dtype) is written over the first rows of
    a case; ``starts[i]`` says that row i begins a case."""
    out, starts, seen = [], [], {}
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"])
        i = seen.setdefault(key, 0)
        seen[key] += 1
        parts = [r["op"].split("[")[0]] + ([f"[{r['variant_label']}]"] if r["variant_label"] else []) \
            + [r["shape"], r["dtype"]]
        label = parts[i] if i < len(parts) else ""
        if "error" in r:
            cells = [label, r["pass"], r["provider"], "error", "", "", "", "", ""]
        else:
            fl = r.get("floor_ratio")
            cells = [label, r["pass"], r["provider"], _fmt(r.get("median_ms"), ".1f"), _ratio_cell(r),
                     _fmt(r.get("peak_extra_mib"), ".1f"), _mem(r.get("mem_ratio")),
                     "" if fl is None else f"{fl:.2f}", str(r.get("rounds", ""))]
        out.append(cells)
        starts.append(i == 0)
    return out, starts


def _drop_empty(columns, body):
    keep = [j for j in range(len(columns)) if any(row[j] not in ("", "—") for row in body)]
    return [columns[j] for j in keep], [[row[j] for j in keep] for row in body]


VERDICT_PEERS = ("naive", "torch.compile(naive)", "trl", "liger-chunked", "liger", "cce", "pot")


def verdict_table(vds: list) -> tuple:
    """(columns, body) of the verdict table: onepass time ÷ each provider (median, verdict), memory ÷ naive,
    time ÷ floor."""
    others = [p for p in VERDICT_PEERS if any(p in pv["vs"] for v in vds for pv in v["passes"].values())]
    short = {"torch.compile(naive)": "compile"}
    cols = ["op", "pass", "naive", "mem"] + [short.get(p, p) for p in others[1:]] + ["floor"]
    body = []
    for v in vds:
        base, _, variant = v["op"].partition("[")
        labels = [base] + ([f"[{variant}"] if variant else [])
        for i, (pass_, pv) in enumerate(v["passes"].items()):
            cells = [labels[i] if i < len(labels) else "", pass_]
            for p in others:
                st = pv["vs"].get(p)
                cells.append("" if st is None else
                             ("unresolved" if st["verdict"] == "unresolved" else f"{st['median']:.2f} {st['verdict']}"))
                if p == "naive":
                    cells.append("" if st is None else _mem(st["memory"]))
            cells.append("" if pv["floor"] is None else f"{pv['floor']['median']:.2f}")
            body.append(cells)
    return _drop_empty(cols, body)


def notes(rows: list) -> list:
    """Notes printed under the tables: what each peer computes, compile times, errors."""
    out = []
    for fam_name in dict.fromkeys(r["family"] for r in rows):
        fam = get_family(fam_name)
        provs = {r["provider"] for r in rows if r["family"] == fam_name}
        for p, text in fam.notes.items():
            if p in provs:
                out.append(f"{fam.op} / {p}: {text}")
    comp = [(r["op"], r["pass"], r["provider"], r["compile_s"]) for r in rows if r.get("compile_s")]
    if comp:
        out.append("first call (compile) of compiling peers, s: "
                   + "; ".join(f"{o} {pa} {p} {s:.1f}" for o, pa, p, s in comp))
    for r in rows:
        if "error" in r:
            out.append(f"error: {r['op']} {r['shape']} {r['pass']} {r['provider']}: {r['error'][:160]}")
    return out


LEGEND = ("ms: median of the n interleaved rounds; ×naive: provider time ÷ naive time, median of the per-round "
          "ratios [min–max]; MiB: peak memory of one call above what its inputs held (fresh process); mem×naive: "
          "MiB ÷ naive MiB; "
          "×floor: onepass ÷ its GEMMs alone (torch.mm, same rounds; CPU: fwd 1 GEMM, fwd+bwd 3 per trained "
          "head, 1 per frozen head). Verdict table: onepass time ÷ each provider's (median of the per-round ratios); "
          "'faster'/'slower' only when every round agrees, else 'unresolved'; mem: onepass MiB ÷ naive MiB; floor: "
          "onepass ÷ floor.")


def header_lines(meta: dict) -> list:
    lines = [
        f"device: {meta['device']} — {meta['device_name']}; {meta['date']}",
        f"onepass {meta['onepass']} ({meta.get('onepass_commit') or 'no git'}), torch {meta['torch']}, "
        f"triton {meta['triton']}, python {meta['python']}" + (f", CUDA {meta['cuda']}" if meta.get("cuda") else ""),
        f"CPU: {meta['cpu_model']} ({meta['cpu_count']} cores, torch threads {meta['torch_threads']}); load average "
        f"{meta['load_average_start'][0]:.1f} at start"
        + (f", {meta['load_average_end'][0]:.1f} at end" if meta.get("load_average_end") else "")
        + (f"; {meta['elapsed_s']:.0f} s wall ({meta.get('startup_s', 0):.0f} s of it imports), {meta['cpu_s']:.0f} s "
           "CPU" if meta.get("elapsed_s") else ""),
        f"onepass backend: {meta['args'].get('backend')} (available: {', '.join(meta['onepass_backends'])}); peers: "
        + ", ".join(f"{k} {v}" for k, v in (("liger-kernel", meta.get("liger_kernel")), ("trl", meta.get("trl")),
                                            ("pot", meta.get("pot")), ("cce", meta.get("cut_cross_entropy"))) if v),
    ]
    if meta.get("copy_bandwidth_GBps"):
        lines.append(f"measured device copy bandwidth: {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    missing = [f"{k} ({v['reason']})" for k, v in meta["peers"].items() if not v["available"]]
    if missing:
        lines.append("peers not run: " + "; ".join(missing))
    return lines


WIDTH = 120


def _wrap(text: str, indent: str = "") -> list:
    import textwrap

    return textwrap.wrap(text, WIDTH, subsequent_indent=indent) or [""]


def print_table(rows: list, vds: list, meta: dict) -> None:
    cells, starts = table_rows(rows)
    cols, body = _drop_empty(list(TABLE_COLUMNS), cells)
    vcols, vbody = verdict_table(vds)
    vstarts = [bool(row[0]) and not row[0].startswith("[") for row in vbody]
    foot = [line for n in notes(rows) for line in _wrap("- " + n, "  ")] + _wrap(LEGEND)
    try:
        from rich import box
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # the bench extra is not installed: plain text
        for line in header_lines(meta):
            print(line)
        for c, b in ((cols, body), (vcols, vbody)):
            print(" | ".join(c))
            for row in b:
                print(" | ".join(row))
        print("\n".join(foot))
        return
    console = Console(width=WIDTH, highlight=False)
    for line in header_lines(meta):
        console.print(escape(line))
    for title, c, b, st in (("results", cols, body, starts),
                            ("verdict: onepass time ÷ each provider's", vcols, vbody, vstarts)):
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
        for name in c:
            left = name in ("case", "op", "pass", "provider")
            table.add_column(name, justify="left" if left else "right", overflow="fold",
                             no_wrap=name not in ("case", "op"), max_width=23 if name == "case" else None)
        for i, row in enumerate(b):
            if st[i] and i:
                table.add_section()
            table.add_row(*(escape(x) for x in row))
        console.print(table)
    for line in foot:
        console.print(escape(line))


def write_json(path: str, rows: list, vds: list, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "verdicts": vds, "rows": rows}, f, indent=1, default=str)


def _md_table(cols, body) -> list:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    return out


def write_markdown(path: str, rows: list, vds: list, meta: dict) -> None:
    out = ["# onepass benchmark results", ""] + [f"- {line}" for line in header_lines(meta)]
    out += ["", "## Verdict: onepass ÷ each provider", ""] + _md_table(*verdict_table(vds))
    out += ["", "## Results", ""] + _md_table(*_drop_empty(list(TABLE_COLUMNS), table_rows(rows)[0]))
    out += ["", "## Notes", ""] + [f"- {n}" for n in notes(rows)] + ["", LEGEND, ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


# ------------------------------------------------------------------------------------------------
# Progress bar
# ------------------------------------------------------------------------------------------------
class progress:
    """``with progress(total) as p``: a rich progress bar with ETA on stderr (plain lines without rich).
    ``total`` and ``p.advance(amount)`` are in estimated seconds of work (the jobs' priors): the ETA is the work
    left divided by the pace measured so far.  ``p.describe(text)`` says what runs, ``p.log(text)`` prints
    above the bar."""

    def __init__(self, total: float):
        import time

        self.total, self.done, self.clock, self.t0 = total, 0.0, time.perf_counter, time.perf_counter()

    def __enter__(self):
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn
        except ImportError:
            self.bar = None
            return self
        if not Console(stderr=True).is_terminal:    # a log file: plain lines (``describe``)
            self.bar = None
            return self
        self.bar = Progress(TextColumn("{task.description}", style="bold"), BarColumn(bar_width=24),
                            TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(elapsed_when_finished=True),
                            console=Console(stderr=True, width=WIDTH), transient=False)
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def eta_s(self) -> float | None:
        """Seconds left at the pace so far (None before any work is done)."""
        if self.done <= 0:
            return None
        return max(0.0, self.total - self.done) * (self.clock() - self.t0) / self.done

    def describe(self, text: str) -> None:
        if self.bar is None:
            eta = self.eta_s()
            print(f"  [{self.clock() - self.t0:4.0f} s, {100 * self.done / self.total:3.0f}%, ETA "
                  f"{'?' if eta is None else f'{eta:.0f} s'}] {text}", file=sys.stderr, flush=True)
        else:
            self.bar.update(self.task, description=text[:60])

    def advance(self, amount: float) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.advance(self.task, amount)

    def log(self, text: str) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
        else:
            from rich.markup import escape

            self.bar.console.print(escape(text[:WIDTH * 2]))


# ------------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------------
#: colour and marker per provider (lines of the sweep panels)
PROVIDER_STYLE = {"onepass": ("#1b9e77", "o"), "naive": ("#d95f02", "s"), "torch.compile(naive)": ("#7570b3", "^"),
                  "trl": ("#e7298a", "v"), "liger-chunked": ("#66a61e", "D"), "liger": ("#1f78b4", "P"),
                  "cce": ("#a6761d", "X"), "pot": ("#e6ab02", "h"), FLOOR_PROVIDER: ("#666666", "*")}
#: colour and hatch per (metric, pass) of the bar panels
BAR_STYLE = {("time", "fwd"): ("#9ecae1", ""), ("time", "fwd+bwd"): ("#3182bd", ""),
             ("memory", "fwd"): ("#fdae6b", "//"), ("memory", "fwd+bwd"): ("#e6550d", "//")}
PANELS_PER_ROW = 3


def _panels(ok: list) -> list:
    """(kind, family, rows) per panel: one "bars" panel per family measured at one shape, else a "time" and a
    "memory" panel against the shapes of its sweep."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in ok):
        mine = [r for r in ok if r["family"] == fam]
        if len({r["shape"] for r in mine}) == 1:
            out.append(("bars", fam, mine))
            continue
        for variant in dict.fromkeys(r["variant_label"] for r in mine):
            rows = [r for r in mine if r["variant_label"] == variant]
            out += [("time", fam, rows), ("memory", fam, rows)]
    return out


def _bars(ax, rows: list) -> None:
    """Time (median, min-max whiskers) and memory ratio to naive per provider and pass, log scale."""
    groups = list(dict.fromkeys((r["variant_label"], r["provider"]) for r in rows if r["provider"] != "naive"))
    series = [k for k in BAR_STYLE if any(r["pass"] == k[1] for r in rows)]
    width = 0.8 / max(1, len(series))
    for j, (metric, pass_) in enumerate(series):
        colour, hatch = BAR_STYLE[(metric, pass_)]
        for i, (variant, prov) in enumerate(groups):
            r = next((r for r in rows if r["variant_label"] == variant and r["provider"] == prov
                      and r["pass"] == pass_), None)
            if r is None:
                continue
            y = r.get("time_ratio") if metric == "time" else r.get("mem_ratio")
            if y is None or y <= 0:
                continue
            x = i - 0.4 + width * (j + 0.5)
            err = None
            if metric == "time":
                err = [[y - r["time_ratio_min"]], [r["time_ratio_max"] - y]]
            ax.bar(x, y, width, color=colour, hatch=hatch, edgecolor="black", linewidth=0.4, yerr=err,
                   error_kw={"elinewidth": 0.8, "capsize": 2})
            top = r["time_ratio_max"] if metric == "time" else y          # above the whisker
            ax.annotate(f"{y:.2g}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=6.5)
    ax.axhline(1.0, color="#d95f02", linewidth=1.2, linestyle="--")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([(p if p != FLOOR_PROVIDER else "floor (GEMMs)") + (f"\n{v}" if v else "")
                        for v, p in groups], fontsize=7.5, rotation=0)
    ax.set_ylabel("÷ naive (lower is better)", fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.25)


def _plain_log_ticks(ax) -> None:
    """Tick labels of a log y axis as plain numbers (0.5, 2, 1e-05); minor ones too: all of them within one
    decade, those at 2 and 5 within two decades (else a decade's ticks can leave an axis with one label)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = ax.get_ylim()
    plain = FuncFormatter(lambda y, _: f"{y:g}")

    def two_five(y, _):
        lead = round(y / 10 ** math.floor(math.log10(y))) if y > 0 else 0
        return f"{y:g}" if lead in (2, 5) else ""

    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else FuncFormatter(two_five) if hi / lo < 100
                                 else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=6.5)


def _sweep(ax, rows: list, metric: str) -> None:
    """Time [ms] or peak extra memory [MiB] against the shapes of the sweep: log axes where they span decades."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    dicts = {r["shape"]: r["shape_dict"] for r in rows}
    varying = [k for k in dicts[shapes[0]] if len({dicts[s][k] for s in shapes}) > 1]
    numeric = len(varying) == 1
    for key in dict.fromkeys((r["provider"], r["pass"], r["variant_label"]) for r in rows):
        prov, pass_, variant = key
        pts = [r for r in rows if (r["provider"], r["pass"], r["variant_label"]) == key]
        xs = [r["shape_dict"][varying[0]] if numeric else shapes.index(r["shape"]) for r in pts]
        ys = [r["median_ms"] if metric == "time" else max(r.get("peak_extra_mib") or 0.0, 1e-2) for r in pts]
        colour, marker = PROVIDER_STYLE.get(prov, ("black", "o"))
        ax.plot(xs, ys, "-" if pass_ == "fwd+bwd" else ":", color=colour, marker=marker, markersize=5,
                linewidth=1.3, markerfacecolor=colour if pass_ == "fwd+bwd" else "white")
    if numeric:
        vals = sorted({dicts[s][varying[0]] for s in shapes})
        if vals[-1] / max(vals[0], 1) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(vals, [f"{v:,}" for v in vals], fontsize=7.5)
        ax.set_xticks([], minor=True)
        ax.set_xlabel(varying[0], fontsize=8)
    else:
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(["\n".join(f"{k}={dicts[s][k]}" for k in varying) for s in shapes], fontsize=7)
    ys = [r["median_ms"] if metric == "time" else max(r.get("peak_extra_mib") or 0.0, 1e-2) for r in rows]
    if max(ys) / max(min(ys), 1e-9) >= 10:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    ax.set_ylabel("median time [ms]" if metric == "time" else "peak extra memory [MiB]", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)


def write_plot(path: str, rows: list, meta: dict) -> bool:
    """One panel per family in a grid (≤ 3 per row): a bar chart of time and memory ÷ naive per provider when
    the family ran at one shape, else time and memory against its sweep; legends below the panels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        print("onepass.bench: no plot (matplotlib missing: pip install -e \".[bench]\")", file=sys.stderr)
        return False
    ok = [r for r in rows if "error" not in r and r.get("median_ms") is not None]
    panels = _panels(ok)
    if not panels:
        return False
    ncols = min(PANELS_PER_ROW, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.6 * nrows + 1.3), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (kind, fam, mine) in zip(axes.flat, panels):
        if kind == "bars":
            _bars(ax, mine)
        else:
            _sweep(ax, mine, kind)
        shape = mine[0]["shape"] if kind == "bars" else ""
        ax.set_title((mine[0]["op"].split("[")[0] if kind == "bars" else f"{mine[0]['op']} — {kind}")
                     + f"\n{shape} {mine[0]['dtype']}".rstrip(), fontsize=9)
        ax.tick_params(labelsize=7.5)
    handles = []
    if any(k == "bars" for k, _, _ in panels):
        handles += [Patch(facecolor=c, hatch=h, edgecolor="black", linewidth=0.4, label=f"{m} ÷ naive, {p}")
                    for (m, p), (c, h) in BAR_STYLE.items() if any(r["pass"] == p for r in ok)]
        handles.append(Line2D([], [], color="#d95f02", linestyle="--", label="naive = 1"))
    if any(k != "bars" for k, _, _ in panels):
        provs = list(dict.fromkeys(r["provider"] for r in ok))
        handles += [Line2D([], [], color=PROVIDER_STYLE.get(p, ("black", "o"))[0], marker=PROVIDER_STYLE.get(
            p, ("black", "o"))[1], linestyle="-", label=p) for p in provs]
        handles += [Line2D([], [], color="black", linestyle=ls, marker="o", markerfacecolor=fc, label=lab)
                    for ls, fc, lab in (("-", "black", "fwd+bwd"), (":", "white", "fwd"))]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8,
               handlelength=3.2, frameon=False)
    fig.suptitle(f"onepass vs naive and peers — {meta['device_name']} — {meta['date'][:10]} "
                 "(whiskers: min–max over interleaved rounds)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
