"""Timing and peak-memory measurement of the providers of one case.

Time (``time_interleaved``)
    The providers of a case share one set of inputs and are timed interleaved: round r calls every provider
    once, in an order rotated by r (A B C, B C A, ...), so a change of the machine's load hits all of them
    and shows as spread of the per-round ratios rather than as a bias.  Before the rounds every provider is
    warmed up once, untimed (``warm_up``: a tiny shape of the family, or the real shape for peers that
    compile).  CPU: ``time.perf_counter`` around one call (after ``gc.collect()``, grads reset, untimed).
    CUDA: one sample = median of ``repeat`` CUDA-event-timed calls with an L2 flush before each.
Peak extra memory
    CPU (``measure_memory_cpu``, run in a fresh forked process per (case, provider)): Linux resident-set
    high-water mark.  Before the call, Python garbage is collected, ``malloc_trim(0)`` hands freed heap
    pages back to the kernel and ``/proc/self/clear_refs`` ("5") resets the high-water mark; baseline = VmRSS
    then (inputs and upstream gradient already resident); peak extra = VmHWM after the call − baseline.  It
    counts everything the call touches: outputs, gradients, temporaries, allocator slack.  CUDA
    (``measure_memory_cuda``): ``max_memory_allocated`` during one call minus ``memory_allocated`` before.

"fwd" runs the provider under ``torch.no_grad()``; "fwd+bwd" runs it on inputs that require grad and back-
propagates Σ_k Σ_i out_k[i]·u[k, i] with a fixed random upstream gradient u (every output that requires
grad, entropy included); parameter ``.grad`` is reset to None before each call (outside the timing).
The "floor" provider runs the family's CPU floor GEMMs (``Floor.cpu_gemms``) with ``torch.mm``.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import statistics
import time

import torch

from .registry import FLOOR_PROVIDER, UPSTREAM_ROWS, Case, compiles, get_family, provider_fn, torch_dtype

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


def make_inputs(case: Case, device: str, seed: int = 0, shape: dict | None = None) -> dict:
    """The inputs of a case (shared by all its providers; floats are plain leaves)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return get_family(case.family).make_inputs(shape or case.shape_dict, case.dtype, device, gen)


class Call:
    """Inputs of a case and the provider call for one pass: ``prep()`` (untimed) then ``run()``.

    ``inputs`` (optional) are shared with the other providers of the same case (built by ``make_inputs``
    with the same seed otherwise).  The "floor" provider runs the family's CPU floor GEMMs with ``torch.mm``
    into preallocated outputs (random operands of the same shapes and dtype; no backward)."""

    def __init__(self, case: Case, provider: str, device: str, seed: int = 0, shape: dict | None = None,
                 inputs: dict | None = None):
        fam = get_family(case.family)
        self.fam, self.case, self.device, self.provider = fam, case, device, provider
        shape = shape or case.shape_dict
        self.variant = case.variant_dict
        if provider == FLOOR_PROVIDER:
            self.inputs, self.leaves, self.upstream, self.train = {}, [], None, False
            self.fn = floor_runner(fam.floor(shape, case.dtype, case.pass_, self.variant).cpu_gemms, case.dtype,
                                   device, seed)
            return
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.inputs = inputs if inputs is not None else make_inputs(case, device, seed, shape)
        self.train = case.pass_ == "fwd+bwd"
        self.leaves = [self.inputs[k] for k in fam.grad_inputs] if self.train else []
        for t in self.leaves:
            t.requires_grad_(True)
        self.upstream = torch.randn((UPSTREAM_ROWS, fam.rows(shape)), generator=gen, device=device) \
            if self.train else None
        self.fn = provider_fn(fam, provider, device)

    def prep(self) -> None:
        for t in self.leaves:
            t.grad = None

    def run(self):
        if self.provider == FLOOR_PROVIDER:
            return self.fn()
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


def floor_runner(gemms, dtype: str, device: str, seed: int = 0):
    """A callable running ``gemms`` (``registry.Gemm``) with ``torch.mm`` into preallocated outputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = torch_dtype(dtype)

    def rnd(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    products = []
    for g in gemms:
        if g.layout == "nt":          # A[m,k] @ B[n,k].T
            lhs, rhs = rnd(g.m, g.k), rnd(g.n, g.k).T
        elif g.layout == "nn":        # A[m,k] @ B[k,n]
            lhs, rhs = rnd(g.m, g.k), rnd(g.k, g.n)
        elif g.layout == "tn":        # A[k,m].T @ B[k,n]
            lhs, rhs = rnd(g.k, g.m).T, rnd(g.k, g.n)
        else:
            raise ValueError(f"unknown GEMM layout {g.layout!r}")
        products.append((lhs, rhs, torch.empty((g.m, g.n), dtype=dt, device=device)))

    def run():
        for lhs, rhs, out in products:
            torch.mm(lhs, rhs, out=out)
        return [out for _, _, out in products]

    return run


def warm_shape(case: Case) -> dict:
    """A tiny shape of the same family (library/thread-pool warm-up on CPU)."""
    small = {"N": 16, "V": 128, "D": 16, "B": 2, "T": 8, "G": 4}
    return {k: min(v, small.get(k, v)) for k, v in case.shape}


def warm_up(case: Case, provider: str, device: str, real: "Call") -> float:
    """One untimed call before measuring: at the real shape for providers that compile (so that the compile
    happens here, once: ``dynamic=False``), else at a tiny shape of the family.  Returns its seconds."""
    call = real if compiles(provider) else Call(case, provider, device, shape=warm_shape(case))
    call.prep()
    t0 = time.perf_counter()
    out = call.run()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    del out
    call.prep()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------
def _memory_of_call(call: Call) -> dict:
    """Peak extra resident memory of one call of an already warmed-up ``call`` (``RssPeak``)."""
    call.prep()
    with RssPeak() as mem:
        t0 = time.perf_counter()
        out = call.run()
        first = time.perf_counter() - t0
    result = call.result_bytes(out)
    del out
    call.prep()
    return {"peak_extra_bytes": mem.peak, "result_bytes": result, "input_bytes": call.input_bytes(),
            "memory_method": "rss-hwm" if mem.reset_ok else "rss-hwm (no reset: lower bound)", "first_s": first}


def measure_memory_cpu(case: Case, provider: str, seed: int = 0) -> dict:
    """Peak extra resident memory of one call of ``provider`` (run it in a fresh process: see the module
    docstring), after a warm-up call (``warm_up``)."""
    call = Call(case, provider, "cpu", seed=seed)
    warm = warm_up(case, provider, "cpu", call)
    res = _memory_of_call(call)
    if compiles(provider):
        res["compile_s"] = warm
    return res


def time_interleaved(case: Case, providers, *, device: str = "cpu", rounds: int = 3, max_rounds: int = 9,
                     max_time: float = 4.0, repeat: int = 5, seed: int = 0) -> dict:
    """Per-round times (ms) of every provider of one case, interleaved: each round calls every provider once,
    in an order rotated by one per round (A B C, B C A, ...), so that a load change hits all of them.
    At least ``rounds`` rounds; more, up to ``max_rounds``, while the next one is expected to end within
    ``max_time`` seconds of the rounds' start (``interleave``).  On CUDA one sample is the median of
    ``repeat`` event-timed calls (``time_cuda``).

    On the CPU the providers that compile are set up first, and their peak memory is measured right after
    their compile (warm-up at the real shape), before any other provider makes a real-shape call: as in a
    fresh process, without compiling twice.
    Returns {"times": {provider: [ms per round] or {"error": ...}}, "memory": {provider: memory result}}."""
    inputs = make_inputs(case, device, seed)
    calls, errors, memory = {}, {}, {}
    cpu = not device.startswith("cuda")
    for p in sorted(providers, key=lambda p: not compiles(p)):       # compiling providers first
        try:
            calls[p] = Call(case, p, device, seed=seed, inputs=inputs)
            warm = warm_up(case, p, device, calls[p])
            if cpu and compiles(p):
                memory[p] = {**_memory_of_call(calls[p]), "compile_s": warm}
        except Exception as exc:  # reported as that provider's error; the others still run
            calls.pop(p, None)
            errors[p] = error_text(exc)
    samplers = {p: functools.partial(_sample, calls[p], device, repeat) for p in providers if p in calls}
    times = interleave(samplers, rounds=rounds, max_rounds=max_rounds, budget_s=max_time)
    return {"times": {**times, **{p: {"error": e} for p, e in errors.items()}}, "memory": memory}


def interleave(samplers: dict, *, rounds: int, max_rounds: int, budget_s: float, clock=time.perf_counter) -> dict:
    """Interleaved rounds of ``samplers`` ({provider: () -> ms}): round r calls each once, in an order rotated
    by r (A B C, B C A, ...).  At least ``rounds`` rounds; after them a round starts only when it is expected
    to end within ``budget_s`` seconds of the first round's start (expected length: the mean of the rounds so
    far), and never more than ``max_rounds``.  Returns {provider: [ms per round]}."""
    order = list(samplers)
    times = {p: [] for p in order}
    t_start, r = clock(), 0
    while order and r < max_rounds:
        elapsed = clock() - t_start
        if r >= rounds and elapsed * (r + 1) / r > budget_s:
            break
        for p in order[r % len(order):] + order[: r % len(order)]:
            times[p].append(samplers[p]())
        r += 1
    return times


def _sample(call: Call, device: str, repeat: int) -> float:
    if device.startswith("cuda"):
        return statistics.median(time_cuda(call.run, call.prep, repeat=repeat, device=device))
    call.prep()
    gc.collect()
    t0 = time.perf_counter()
    out = call.run()
    ms = (time.perf_counter() - t0) * 1e3
    del out
    call.prep()
    return ms


def error_text(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:300]


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


def measure_memory_cuda(case: Case, provider: str, *, seed: int = 0, device: str = "cuda") -> dict:
    """Peak extra device memory of one call after a warm-up: ``max_memory_allocated`` during the call minus
    ``memory_allocated`` before it."""
    call = Call(case, provider, device, seed=seed)
    try:
        warm = warm_up(case, provider, device, call)
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
        res = {"peak_extra_bytes": peak, "result_bytes": result, "input_bytes": call.input_bytes(),
               "memory_method": "cuda max_memory_allocated"}
        if compiles(provider):
            res["compile_s"] = warm
        return res
    finally:
        call.prep()
        del call
        gc.collect()
        torch.cuda.empty_cache()
