"""Timing and peak-memory measurement of one (case, provider).

CPU
    Time: ``time.perf_counter`` around each call, median of up to ``repeat`` calls (stopping early once
    ``max_time`` seconds of calls were spent; the number of calls is reported).  Libraries and thread
    pools are warmed up first by one call of the same provider on a tiny shape; the first call at the
    real shape is timed too (on CPU every call faults its big buffers in afresh, so it is representative).
    Peak extra memory: Linux resident-set high-water mark.  Before the call, Python garbage is collected,
    ``malloc_trim(0)`` hands freed heap pages back to the kernel and ``/proc/self/clear_refs`` ("5") resets
    the high-water mark; baseline = VmRSS then (inputs and upstream gradient already resident); peak extra
    = VmHWM after the call − baseline.  It counts everything the call touches: outputs, gradients,
    temporaries, allocator slack.  By default each (case, provider) runs in a fresh subprocess
    (``python -m onepass.bench._worker``), so no earlier case's heap layout leaks into the numbers.
GPU (CUDA)
    Time: CUDA events around each call, after a warm-up (≥ 3 calls and ≥ 25 ms), with a 256 MiB L2 flush
    before every call; median of ``repeat`` calls.  Peak extra memory: ``torch.cuda.max_memory_allocated``
    during one call after ``reset_peak_memory_stats``, minus ``memory_allocated`` before it.

"fwd" runs the provider under ``torch.no_grad()``; "fwd+bwd" runs it on inputs that require grad and back-
propagates Σ_k Σ_i out_k[i]·u[k, i] with a fixed random upstream gradient u (every output that requires
grad, entropy included); parameter ``.grad`` is reset to None before each call (outside the timing).
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time

import torch

from .registry import UPSTREAM_ROWS, Case, get_family, provider_fn

# ------------------------------------------------------------------------------------------------
# Resident-set helpers (Linux)
# ------------------------------------------------------------------------------------------------
_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssPeak:
    """Peak extra resident memory (bytes) of the code run inside ``with``."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.reset_ok = _reset_hwm()
        self.base = _status_kib("VmRSS")
        if not self.reset_ok:       # no reset possible: the HWM so far is a lower bound for the baseline
            self.base = max(self.base, _status_kib("VmHWM"))
        return self

    def __exit__(self, *exc):
        self.peak = max(0, _status_kib("VmHWM") - self.base) * 1024
        return False


# ------------------------------------------------------------------------------------------------
# Building the call
# ------------------------------------------------------------------------------------------------
def flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten(v)]
    return []


def weighted_loss(out, upstream: torch.Tensor):
    loss = None
    for k, o in enumerate(flatten(out)):
        if not o.requires_grad:
            continue
        u = upstream[k % UPSTREAM_ROWS, : o.numel()].view(o.shape).to(torch.float32)
        term = (o.to(torch.float32) * u).sum()
        loss = term if loss is None else loss + term
    return loss


class Call:
    """Inputs of a case and the provider call for one pass: ``prep()`` (untimed) then ``run()``."""

    def __init__(self, case: Case, provider: str, device: str, seed: int = 0, shape: dict | None = None):
        fam = get_family(case.family)
        self.fam, self.case, self.device = fam, case, device
        shape = shape or case.shape_dict
        gen = torch.Generator(device=device).manual_seed(seed)
        self.inputs = fam.make_inputs(shape, case.dtype, device, gen)
        self.train = case.pass_ == "fwd+bwd"
        self.leaves = [self.inputs[k] for k in fam.grad_inputs] if self.train else []
        for t in self.leaves:
            t.requires_grad_(True)
        self.upstream = torch.randn((UPSTREAM_ROWS, fam.rows(shape)), generator=gen, device=device) \
            if self.train else None
        self.fn = provider_fn(fam, provider, device)
        self.variant = case.variant_dict

    def prep(self) -> None:
        for t in self.leaves:
            t.grad = None

    def run(self):
        if not self.train:
            with torch.no_grad():
                return self.fn(self.inputs, **self.variant)
        out = self.fn(self.inputs, **self.variant)
        loss = weighted_loss(out, self.upstream)
        if loss is None:
            raise RuntimeError("no output requires grad: nothing to backpropagate")
        loss.backward()
        return out

    def result_bytes(self, out) -> int:
        """Bytes of what the call hands back: outputs and the gradients of the leaves."""
        ts = flatten(out) + [t.grad for t in self.leaves if t.grad is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inputs.values() if isinstance(t, torch.Tensor))


def warm_shape(case: Case) -> dict:
    """A tiny shape of the same family (library/thread-pool warm-up on CPU)."""
    small = {"N": 16, "V": 128, "D": 16, "B": 2, "T": 8, "G": 4}
    return {k: min(v, small.get(k, v)) for k, v in case.shape}


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------
def measure_cpu(case: Case, provider: str, *, repeat: int = 5, max_time: float = 60.0, seed: int = 0) -> dict:
    warm = Call(case, provider, "cpu", seed=seed, shape=warm_shape(case))
    warm.prep()
    warm.run()
    del warm
    call = Call(case, provider, "cpu", seed=seed)
    times = []
    call.prep()
    with RssPeak() as mem:
        t0 = time.perf_counter()
        out = call.run()
        times.append(time.perf_counter() - t0)
    result = call.result_bytes(out)
    del out
    while len(times) < repeat and sum(times) < max_time:
        call.prep()
        gc.collect()
        t0 = time.perf_counter()
        out = call.run()
        times.append(time.perf_counter() - t0)
        del out
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": len(times),
            "peak_extra_bytes": mem.peak, "result_bytes": result, "input_bytes": call.input_bytes(),
            "memory_method": "rss-hwm" if mem.reset_ok else "rss-hwm (no reset: lower bound)"}


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------
_L2_FLUSH = {}


def _flush_l2(device) -> None:
    buf = _L2_FLUSH.get(str(device))
    if buf is None:
        buf = _L2_FLUSH[str(device)] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    buf.zero_()


def time_cuda(fn, prep=None, *, repeat: int = 20, warmup_ms: float = 25.0, flush: bool = True,
              device="cuda") -> list:
    """Per-call times (ms) of ``fn`` with CUDA events (``triton.testing.do_bench`` style)."""
    prep = prep or (lambda: None)
    torch.cuda.synchronize(device)
    t0, n = time.perf_counter(), 0
    while n < 3 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        prep()
        fn()
        torch.cuda.synchronize(device)
        n += 1
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for i in range(repeat):
        prep()
        if flush:
            _flush_l2(device)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def measure_cuda(case: Case, provider: str, *, repeat: int = 20, seed: int = 0, device: str = "cuda") -> dict:
    call = Call(case, provider, device, seed=seed)
    try:
        times = time_cuda(lambda: call.run(), call.prep, repeat=repeat, device=device)
        call.prep()
        gc.collect()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = call.run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        result = call.result_bytes(out)
        del out
        return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times),
                "peak_extra_bytes": peak, "result_bytes": result, "input_bytes": call.input_bytes(),
                "memory_method": "cuda max_memory_allocated"}
    finally:
        call.prep()
        del call
        gc.collect()
        torch.cuda.empty_cache()
