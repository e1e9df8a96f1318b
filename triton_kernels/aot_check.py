"""Ahead-of-time compile check of every Triton kernel for real NVIDIA targets, without a GPU.

Each variant calls one of the registered triton launchers (``onepass._dispatch.launcher(family,
"triton")`` for the families ``vocab_stats``, ``sinkhorn``, ``advantages``) with
``meta`` tensors of the headline shapes (N=16384, D=4096, V=151,936: nothing is allocated) while a
driver stub reports ``GPUTarget("cuda", arch, 32)`` and every ``JITFunction.run`` is forced into
warmup (compile-only) mode.  So the kernels compiled are exactly those the launchers would launch
(block sizes, constexpr switches, argument specialization), through Triton's real NVIDIA backend
down to a cubin by the ptxas Triton bundles.  ``TRITON_DUMP_PTXAS_LOG`` makes Triton print the
``ptxas -v`` report, from which registers, stack frame and spill bytes are read; the shared memory
is the compiled kernel's metadata.

The check fails (exit status 1) on a compile error, on shared memory over the target's limit, and on
any spill in a bf16 kernel compiled for sm_90.  sm_80 spills are reported, not failed: Triton 3.9's
bundled ptxas limits some large kernels to few registers on sm_80 (DESIGN.md §4).

    python -m onepass.triton_kernels.aot_check              # representative subset (CI)
    python -m onepass.triton_kernels.aot_check --full       # every dtype x kind x bias x path variant
    python -m onepass.triton_kernels.aot_check --full --jobs 16 --json out.json --match linear

It must run without ``TRITON_INTERPRET`` (the kernels are defined at import time); it removes that
variable from the workers' environment itself.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from onepass._contract import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, NUM_GRADS, NUM_STATS, Cost, Kind, LogitMap
from onepass._dispatch import launcher

#: The headline shape of the fused-linear op (docs/vocab_stats.md); meta tensors cost nothing.
HEAD_N, HEAD_D, HEAD_V = 16384, 4096, 151936
#: Rows of the split-vocabulary forward variants (too few to fill the GPU: the launcher splits V) and
#: the SM count their split is chosen for (H200, H100 SXM).
SPLIT_N, SPLIT_SMS = 2048, 132
#: Sinkhorn group size and the advantages batch used for their variants.
SINKHORN_G, ADV_GROUPS, ADV_GROUP_SIZE = 64, 1024, 16
#: Largest dynamic shared memory a block can opt into, bytes (CUDA programming guide, per arch).
MAX_SHARED = {90: 232448, 80: 166912}
ARCHS = (90, 80)
KIND_NAMES = {kind: kind.name.lower() for kind in Kind}
DIVERGENCE_KINDS = tuple(kind for kind in Kind if kind != Kind.NONE)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launcher call: ``name`` is unique, ``dtype`` the input dtype name, ``call`` builds meta
    inputs and calls the launcher (which may launch more than one kernel)."""
    name: str
    dtype: str
    call: Callable[[], object]


# ------------------------------------------------------------------------------------------------
# The variant matrix.
# ------------------------------------------------------------------------------------------------
def _meta(*shape, dtype):
    import torch
    return torch.empty(shape, dtype=dtype, device="meta")


def _torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


def _linear_inputs(dtype: str, pair: bool, bias: bool, n: int = HEAD_N):
    import torch
    dt = _torch_dtype(dtype)
    h, w = _meta(n, HEAD_D, dtype=dt), _meta(HEAD_V, HEAD_D, dtype=dt)
    b = _meta(HEAD_V, dtype=dt) if bias else None
    hb, wb, bb = (_meta(n, HEAD_D, dtype=dt), _meta(HEAD_V, HEAD_D, dtype=dt),
                  _meta(HEAD_V, dtype=dt) if bias else None) if pair else (None, None, None)
    targets = _meta(n, dtype=torch.int64)
    return h, w, b, hb, wb, bb, targets


def _stats_inputs():
    import torch
    return _meta(HEAD_N, NUM_STATS, dtype=torch.float32), _meta(HEAD_N, NUM_GRADS, dtype=torch.float32)


def _linear_fwd(dtype, pair, kind, bias):
    def call():
        vs = launcher("vocab_stats", "triton")
        h, w, b, hb, wb, bb, t = _linear_inputs(dtype, pair, bias)
        return vs.linear_vocab_stats_fwd(h, w, b, hb, wb, bb, t, LogitMap(), kind, 0.5, 0.5, True)
    return call


def _linear_fwd_split(dtype, pair, kind, bias):
    """The split-vocabulary forward at N = SPLIT_N: split sweep(s) and merge(s), S as on SPLIT_SMS SMs."""
    def call():
        vs = launcher("vocab_stats", "triton")
        h, w, b, hb, wb, bb, t = _linear_inputs(dtype, pair, bias, SPLIT_N)
        splits = vs.choose_num_splits(SPLIT_N, HEAD_V, HEAD_D, kind, SPLIT_SMS)
        return vs.linear_vocab_stats_fwd(h, w, b, hb, wb, bb, t, LogitMap(), kind, 0.5, 0.5, True, num_splits=splits)
    return call


def _linear_grad(dtype, pair, kind, bias, write_b):
    def call():
        vs = launcher("vocab_stats", "triton")
        h, w, b, hb, wb, bb, t = _linear_inputs(dtype, pair, bias)
        stats, grads = _stats_inputs()
        return vs.linear_vocab_grad_logits(h, w, b, hb, wb, bb, t, stats, grads, LogitMap(), kind, 0.5, 0.5, True,
                                           write_b)
    return call


def _linear_bwd(dtype, pair, kind, bias):
    """The fused-linear backward (every gradient wanted): its row and vocab passes over the dz slab."""
    def call():
        vs = launcher("vocab_stats", "triton")
        h, w, b, hb, wb, bb, t = _linear_inputs(dtype, pair, bias)
        stats, grads = _stats_inputs()
        return vs.linear_vocab_stats_bwd(h, w, b, hb, wb, bb, t, stats, grads, LogitMap(), kind, 0.5, 0.5, (True,) * 6)
    return call


def _logits_inputs(dtype: str, pair: bool):
    import torch
    dt = _torch_dtype(dtype)
    a = _meta(HEAD_N, HEAD_V, dtype=dt)
    b = _meta(HEAD_N, HEAD_V, dtype=dt) if pair else None
    return a, b, _meta(HEAD_N, dtype=torch.int64)


def _logits_fwd(dtype, pair, kind):
    def call():
        vs = launcher("vocab_stats", "triton")
        a, b, t = _logits_inputs(dtype, pair)
        return vs.vocab_stats_fwd(a, b, t, LogitMap(), kind, 0.5, 0.5, True)
    return call


def _logits_bwd(dtype, pair, kind):
    def call():
        vs = launcher("vocab_stats", "triton")
        a, b, t = _logits_inputs(dtype, pair)
        stats, grads = _stats_inputs()
        return vs.vocab_stats_bwd(a, b, t, stats, grads, LogitMap(), kind, 0.5, 0.5, True, pair)
    return call


def _sinkhorn(dtype, kind, grad):
    def call():
        import torch
        sk = launcher("sinkhorn", "triton")
        dt, f32 = _torch_dtype(dtype), torch.float32
        n = 4 * SINKHORN_G
        a, b = _meta(n, HEAD_V, dtype=dt), _meta(n, HEAD_V, dtype=dt)
        lse = _meta(n, dtype=f32)
        if grad:
            return sk.sinkhorn_grad(a, b, lse, lse, _meta(n, SINKHORN_G, dtype=f32), lse, lse, 1.0, SINKHORN_G,
                                    kind)
        return sk.sinkhorn_cost(a, b, lse, lse, 1.0, SINKHORN_G, kind)
    return call


def _advantages(dtype, estimator, scale):
    def call():
        import torch
        adv = launcher("advantages", "triton")
        b = ADV_GROUPS * ADV_GROUP_SIZE
        rewards = _meta(b, dtype=_torch_dtype(dtype))
        offsets = _meta(ADV_GROUPS + 1, dtype=torch.int64)
        return adv.group_advantages(rewards, _meta(b, dtype=torch.int64), offsets, ADV_GROUP_SIZE,
                                    ADVANTAGE_ESTIMATORS.index(estimator), ADVANTAGE_SCALES.index(scale), 1e-6)
    return call


def _models():
    """(label, pair, kind): one model (kind 0), and two models with every kind."""
    return [("single", False, 0)] + [(f"pair-{KIND_NAMES[k]}", True, k) for k in (0, *DIVERGENCE_KINDS)]


def full_matrix() -> list[Variant]:
    """Every launcher variant: dtype x model/kind x bias x path (+ sinkhorn kinds, advantages modes)."""
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for label, pair, kind in _models():
            for bias in (False, True):
                tag = f"{dtype}-{label}-{'bias' if bias else 'nobias'}"
                out.append(Variant(f"linear_fwd-{tag}", dtype, _linear_fwd(dtype, pair, kind, bias)))
                out.append(Variant(f"linear_fwd_split-{tag}", dtype, _linear_fwd_split(dtype, pair, kind, bias)))
                out.append(Variant(f"linear_grad-{tag}", dtype, _linear_grad(dtype, pair, kind, bias, False)))
                out.append(Variant(f"linear_bwd-{tag}", dtype, _linear_bwd(dtype, pair, kind, bias)))
                if pair:
                    out.append(Variant(f"linear_grad_ab-{tag}", dtype, _linear_grad(dtype, pair, kind, bias, True)))
            out.append(Variant(f"logits_fwd-{dtype}-{label}", dtype, _logits_fwd(dtype, pair, kind)))
            out.append(Variant(f"logits_bwd-{dtype}-{label}", dtype, _logits_bwd(dtype, pair, kind)))
        for cost in Cost:
            out.append(Variant(f"sinkhorn_cost-{dtype}-{cost.name.lower()}", dtype, _sinkhorn(dtype, cost, False)))
            out.append(Variant(f"sinkhorn_grad-{dtype}-{cost.name.lower()}", dtype, _sinkhorn(dtype, cost, True)))
    estimators = [("grpo-group", "grpo", "group"), ("grpo-batch", "grpo", "batch"), ("grpo-none", "grpo", "none"),
                  ("rloo", "rloo", "group"), ("reinforce_pp", "reinforce_pp", "group")]
    for dtype in ("fp32", "fp64"):
        for label, est, scale in estimators:
            out.append(Variant(f"advantages-{dtype}-{label}", dtype, _advantages(dtype, est, scale)))
    return out


#: The CI subset (a few bf16 variants per target; ``--full`` compiles all of them): one and two models,
#: one- and two-sweep divergence kinds, the logits and fused-linear paths, forward (whole-vocabulary and
#: split: both sweeps and merges), dL/dlogits and the fused-linear backward (``linear_vocab_stats_bwd``,
#: whose two-model form was the one spilling on sm_90).
SUBSET = {
    90: ("linear_fwd-bf16-single-nobias", "linear_fwd-bf16-pair-jsd-bias", "linear_fwd_split-bf16-pair-jsd-bias",
         "linear_bwd-bf16-pair-reverse_kl-nobias", "logits_fwd-bf16-pair-tv", "logits_bwd-bf16-single"),
    80: ("linear_fwd-bf16-pair-jsd-nobias", "linear_bwd-bf16-single-nobias", "logits_bwd-bf16-pair-reverse_kl"),
}


# ------------------------------------------------------------------------------------------------
# Compiling one variant in a worker process.
# ------------------------------------------------------------------------------------------------
class _StubDriver:
    """Just enough of Triton's driver interface for compile-only ``JITFunction.run``: a target, a
    device id (the arch, so each target gets its own per-device kernel cache) and a stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("meta")

    def is_active(self):
        return True


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log (one entry function)."""
    regs = _PTXAS_REGS.search(log)
    frame = _PTXAS_FRAME.search(log)
    if regs is None or frame is None:
        raise ValueError(f"no ptxas -v report in the log: {log[:500]!r}")
    return {"registers": int(regs.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3))}


def _matrix_instruction(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


#: id(compiled kernel) -> (kernel, its ptxas log), for the kernels this process compiled.
_PTXAS_LOGS: dict[int, tuple[object, str]] = {}


@contextlib.contextmanager
def _compile_only(arch: int, records: list):
    """Route every JITFunction launch to a compile (warmup) for ``arch``, recording each kernel with
    the ptxas log Triton printed while compiling it.  The stub driver stays active afterwards (there
    may be no real one to go back to: this runs in a worker process of its own)."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        if id(kernel) not in _PTXAS_LOGS:  # a kernel compiled before by this process prints nothing
            _PTXAS_LOGS[id(kernel)] = (kernel, log.getvalue())
        if all(k is not kernel for _, k, _ in records):  # a launcher may launch one kernel many times
            records.append((self.__name__, kernel, _PTXAS_LOGS[id(kernel)][1]))
        return kernel

    driver.set_active(_StubDriver(arch))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def compile_variant(name: str, arch: int) -> dict:
    """Compile the variant ``name`` for sm_``arch``; a row per kernel it launches (or one error row)."""
    variant = {v.name: v for v in full_matrix()}[name]
    records: list = []
    t0 = time.perf_counter()
    try:
        with _compile_only(arch, records):
            variant.call()
    except Exception as exc:  # noqa: BLE001 - a compile error is a result of this check
        return [{"variant": name, "arch": arch, "dtype": variant.dtype, "kernel": "?",
                 "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}]
    seconds = (time.perf_counter() - t0) / max(1, len(records))
    rows = []
    for kernel_name, kernel, log in records:
        row = {"variant": name, "arch": arch, "dtype": variant.dtype, "kernel": kernel_name,
               "shared": int(kernel.metadata.shared), "num_warps": int(kernel.metadata.num_warps),
               "num_stages": int(kernel.metadata.num_stages), "dot": _matrix_instruction(kernel.asm["ptx"]),
               "seconds": round(seconds, 1)}
        try:
            row.update(parse_ptxas_log(log))
        except ValueError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


def _worker_init():
    # a cache of its own per process: a kernel found in another worker's cache would print no log
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(os.environ["TRITON_CACHE_DIR"], str(os.getpid()))


def problems(row: dict) -> list[str]:
    """Why a compiled kernel fails the check (empty when it passes)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["shared"] > MAX_SHARED[row["arch"]]:
        out.append(f"shared memory {row['shared']} B > {MAX_SHARED[row['arch']]} B")
    if row["arch"] == 90 and row["dtype"] == "bf16" and (row["spill_stores"] or row["spill_loads"]):
        out.append(f"bf16 kernel spills on sm_90 ({row['spill_stores']} B stores, {row['spill_loads']} B loads)")
    return out


def format_table(rows: list[dict]) -> str:
    head = ("variant", "arch", "kernel", "regs", "stack", "spill st/ld", "smem", "warps", "stages", "dot", "s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | sm_{r['arch']} | {r['kernel']} | ERROR: {r['error'][:200]} |")
            continue
        lines.append(f"| {r['variant']} | sm_{r['arch']} | {r['kernel']} | {r['registers']} | {r['stack']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['dot']} | {r['seconds']} |")
    return "\n".join(lines)


def select(full: bool, archs, match: str | None) -> list[tuple[str, int]]:
    names = [v.name for v in full_matrix()]
    jobs = []
    for arch in archs:
        chosen = names if full else [n for n in SUBSET.get(arch, ()) if n in names]
        jobs += [(n, arch) for n in chosen if match is None or re.search(match, n)]
    return jobs


def run_check(jobs: list[tuple[str, int]], workers: int) -> list[dict]:
    """Compile ``jobs`` ((variant, arch) pairs) in ``workers`` fresh processes, each with a private
    Triton cache (so ptxas runs and reports) and without TRITON_INTERPRET."""
    with tempfile.TemporaryDirectory(prefix="onepass-aot-") as cache:
        saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG",
                                                "TRITON_DEFAULT_FP_FUSION")}
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1")
        try:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_worker_init) as pool:
                futures = [pool.submit(compile_variant, n, a) for n, a in jobs]
                return [row for f in futures for row in f.result()]
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every variant (default: the CI subset)")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="target(s); default: both")
    p.add_argument("--match", help="only variants whose name matches this regular expression")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--list", action="store_true", help="list the selected variants and exit")
    args = p.parse_args(argv)
    jobs = select(args.full, args.arch or ARCHS, args.match)
    if args.list:
        print("\n".join(f"sm_{a} {n}" for n, a in jobs))
        return 0
    import triton
    t0 = time.perf_counter()
    rows = run_check(jobs, args.jobs)
    print(format_table(rows))
    failed = [(r, msg) for r in rows for msg in problems(r)]
    print(f"\n{len(jobs)} variants, {len(rows)} kernels compiled by triton {triton.__version__} in "
          f"{time.perf_counter() - t0:.0f} s; {len(failed)} problems")
    for r, msg in failed:
        print(f"FAIL sm_{r['arch']} {r['variant']} {r['kernel']}: {msg}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
