"""Isolated CPU measurements: every job runs in a fresh process forked from a ``multiprocessing`` forkserver
that imported torch, onepass and the installed peers once (``start``).  A fork costs milliseconds where a
fresh interpreter costs seconds (torch) to tens of seconds (trl, liger-kernel); the forkserver itself runs
no computation, so each child starts with no OpenMP thread pool and no heap history of earlier cases.

Jobs (also called in-process by ``--isolate none``):
    ``memory_job(cases, provider, backend)``: peak extra memory of one call per case (``measure_memory_cpu``).
    ``timing_job(case, providers, backend, **kw)``: interleaved per-round times (``time_interleaved``).
"""
from __future__ import annotations

import gc
import importlib.util
import multiprocessing
import os

from .measure import error_text, measure_memory_cpu, time_interleaved
from .registry import PEERS, Case, set_onepass_backend

#: what the forkserver imports before forking (the peers only when installed)
PEER_MODULES = {"trl": "trl.trainer.utils", "liger-chunked": "liger_kernel.chunked_loss", "pot": "ot"}


def _prepare(backend: str) -> None:
    """Per job: the onepass backend, and ``gc.freeze()`` so that the ``gc.collect()`` before each measured call
    only scans what the job created (a full collection of a heap holding torch._dynamo, transformers and trl
    takes about a second)."""
    set_onepass_backend(backend)
    gc.freeze()


def memory_job(cases: list, provider: str, backend: str) -> list:
    _prepare(backend)
    out = []
    for c in cases:
        try:
            out.append(measure_memory_cpu(Case.from_json(c), provider))
        except Exception as exc:  # reported as the row's error
            out.append({"error": error_text(exc)})
    return out


def timing_job(case: dict, providers: list, backend: str, **kw) -> dict:
    _prepare(backend)
    return time_interleaved(Case.from_json(case), providers, device="cpu", **kw)


def ready() -> dict:
    """A job that does nothing: returns once the forkserver has finished its imports."""
    return {}


_CTX = []


def start(peers: list) -> None:
    """Start the forkserver (in the background) with torch, onepass and the given peers' modules preloaded."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")    # no compile-worker pool on a few cores
    ctx = multiprocessing.get_context("forkserver")
    mods = ["onepass.bench._worker"] + [PEER_MODULES[p] for p in peers
                                        if p in PEER_MODULES and p in PEERS
                                        and importlib.util.find_spec(PEER_MODULES[p].split(".")[0])]
    ctx.set_forkserver_preload(mods)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    _CTX[:] = [ctx]


#: CPU seconds (user + system) of the isolated jobs so far, and of the forkserver (its imports)
CPU_SECONDS = [0.0]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _child(conn, fn, args, kw) -> None:
    start = _cpu()
    try:
        res = fn(*args, **kw)
    except BaseException as exc:  # noqa: BLE001 - sent back as the job's error
        res = {"error": error_text(exc)}
    conn.send((res, _cpu() - start))
    conn.close()


def cpu_seconds() -> float:
    """CPU seconds of the forkserver (its imports) and of every isolated job so far."""
    from multiprocessing import forkserver

    total = CPU_SECONDS[0]
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime
    except (OSError, IndexError, ValueError):
        pass
    return total


def run_isolated(fn, *args, timeout: float = 1800.0, **kw):
    """``fn(*args, **kw)`` in a process forked from the forkserver; {"error": ...} if it fails or dies."""
    ctx = _CTX[0]
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kw), daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            res, cpu = recv.recv()
            CPU_SECONDS[0] += cpu
            return res
        proc.kill()
        return {"error": f"worker timed out after {timeout:.0f} s"}
    except EOFError:
        proc.join(10)
        return {"error": f"worker died (exit code {proc.exitcode})"}
    except BaseException:       # interrupted (Ctrl-C, SIGTERM): do not leave the job running
        proc.kill()
        raise
    finally:
        proc.join(10)
        recv.close()
