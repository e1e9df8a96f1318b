"""The headline case of the fused-linear log-prob op on one GPU: accuracy, time against the cuBLAS
4-GEMM floor, memory, and where the backward's time goes.  Step 2 of ``benchmarks/gpu_check.sh``.

``linear_token_logprobs(h, w, t, return_entropy=True)`` forward and forward+backward with
h [N, D], w [V, D] bf16 (default N=16384, D=4096, V=151,936; 5% of the targets ignored) and a random
upstream gradient of log-probs and entropy:

- accuracy: log-probs and entropy of the first ``--check-rows`` rows, and dL/dh of those rows (the
  forward+backward of a loss on them alone), against float64 on the same bf16 inputs, as
  ||x − ref|| / ||ref||;
- time (device events, median): forward, forward+backward, and the floor = 2·(h @ wᵀ) + (dz @ w) +
  (dzᵀ @ h) measured with cuBLAS on the same shapes (bf16 operands, random data);
- memory: peak allocated during forward+backward beyond the inputs, minus the gradients dh, dw;
- the dW strategies for the chunked path: an fp32 ``addmm_`` of upcast chunks (plain fp32 GEMM),
  bf16 GEMMs with fp32 output (``out_dtype``), the same with TF32 allowed;
- a CUDA profile of one forward+backward, kernels sorted by time.

Runs on the CPU too with a small shape (``--device cpu --shape 64,32,1000``): the logic is checked
there, the numbers mean nothing.  Writes a JSON summary with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import onepass


def timer(device: torch.device):
    """ms of fn() (median of n after warm-up calls): device events on CUDA, perf_counter on CPU."""
    def measure(fn, n=3, warm=1):
        for _ in range(warm):
            fn()
        times = []
        for _ in range(n):
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return measure


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def reference_rows(h, w, t, u, rows):
    """float64 log-probs, entropy and dL/dh of the first ``rows`` rows (ignored targets: 0)."""
    hd = h[:rows].detach().double().requires_grad_()
    ls = torch.log_softmax(hd @ w.detach().double().T, -1)
    tt = t[:rows]
    live = tt >= 0
    logp = torch.where(live, ls.gather(1, tt.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(live, -(ls.exp() * ls).sum(-1), 0.0)
    (dh,) = torch.autograd.grad((logp * u[0, :rows]).sum() + (ent * u[1, :rows]).sum(), hd)
    return logp.detach(), ent.detach(), dh


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="16384,4096,151936", help="N,D,V")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--check-rows", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    N, D, V = (int(x) for x in args.shape.split(","))
    ev = timer(dev)
    out = {"shape": {"N": N, "D": D, "V": V}, "dtype": args.dtype, "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__}
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, D, device=dev, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=dev, generator=g) * (2.0 / D ** 0.5)).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    t[::20] = -100
    u = torch.randn(2, N, device=dev, generator=g)
    out["backend"] = onepass._dispatch.resolve_backend("auto", h, "vocab_stats", "linear_token_logprobs")
    print(f"auto backend: {out['backend']}", flush=True)

    def fwd():
        with torch.no_grad():
            return onepass.linear_token_logprobs(h, w, t, return_entropy=True)

    def step(hh=h, tt=t, uu=u):
        hh.grad = w.grad = None
        lp, ent = onepass.linear_token_logprobs(hh, w, tt, return_entropy=True)
        ((lp * uu[0]).sum() + (ent * uu[1]).sum()).backward()

    t0 = time.time()
    lp, ent = fwd()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out["first_fwd_s"] = round(time.time() - t0, 1)
    rows = min(args.check_rows, N)
    ref_lp, ref_ent, ref_dh = reference_rows(h, w, t, u, rows)
    h_rows = h.detach()[:rows].clone().requires_grad_()
    step(h_rows, t[:rows], u[:, :rows])
    out["rel_err"] = {"logp": rel_err(lp[:rows], ref_lp), "entropy": rel_err(ent[:rows], ref_ent),
                      "dh": rel_err(h_rows.grad, ref_dh)}
    out["any_nan"] = bool(lp.isnan().any() or ent.isnan().any())
    print(f"rel err ({rows} rows vs fp64) " + " ".join(f"{k} {v:.2e}" for k, v in out["rel_err"].items())
          + f"; any nan {out['any_nan']}", flush=True)
    del lp, ent
    out["fwd_ms"] = ev(fwd, n=args.repeat)
    print(f"onepass fwd {out['fwd_ms']:.2f} ms", flush=True)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.time()
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
        out["extra_mib"] = (torch.cuda.max_memory_allocated() - base - grads) / 2 ** 20
        print(f"first fwd+bwd {time.time() - t0:.1f} s; peak extra beyond dh, dw: {out['extra_mib']:.0f} MiB",
              flush=True)
    out["fwd_bwd_ms"] = ev(step, n=args.repeat, warm=0)
    print(f"onepass fwd+bwd {out['fwd_bwd_ms']:.2f} ms", flush=True)

    a = torch.randn(N, D, device=dev, generator=g).to(dtype)
    b = torch.randn(V, D, device=dev, generator=g).to(dtype)
    dz = torch.randn(N, V, device=dev, generator=g).to(dtype)
    gemm = {"h@W.T": ev(lambda: a @ b.T), "dz@W": ev(lambda: dz @ b), "dz.T@h": ev(lambda: dz.T @ a)}
    del dz
    out["gemm_ms"] = gemm
    out["floor_ms"] = floor = 2 * gemm["h@W.T"] + gemm["dz@W"] + gemm["dz.T@h"]
    out["fwd_bwd_over_floor"] = out["fwd_bwd_ms"] / floor
    out["fwd_over_gemm"] = out["fwd_ms"] / gemm["h@W.T"]
    print("cuBLAS " + ", ".join(f"{k} {v:.2f} ms ({2 * N * V * D / v / 1e9:.0f} TFLOP/s)" for k, v in gemm.items()))
    print(f"4-GEMM floor {floor:.2f} ms: fwd+bwd = {out['fwd_bwd_over_floor']:.2f}x floor; "
          f"fwd = {out['fwd_over_gemm']:.2f}x one GEMM", flush=True)

    # dW of the chunked path (one 256 MiB fp32 chunk of dz, scaled to N rows)
    rows_c = max(16, min(N, (256 * 2 ** 20) // (V * 4)))
    chunks = N / rows_c
    dzc, hc = torch.randn(rows_c, V, device=dev, generator=g).to(dtype), a[:rows_c]
    dw = torch.zeros(V, D, device=dev)
    dw_ms = {"fp32 addmm_ of upcast chunks": lambda: dw.addmm_(dzc.T.float(), hc.float()),
             "bf16 mm out_dtype=fp32 + add_": lambda: dw.add_(torch.mm(dzc.T, hc, out_dtype=torch.float32)),
             "bf16 addmm out_dtype=fp32 into dw": lambda: torch.addmm(dw, dzc.T, hc, out_dtype=torch.float32,
                                                                      out=dw)}
    out["dw_ms"] = {}
    for label, fn in dw_ms.items():
        try:
            out["dw_ms"][label] = ev(fn) * chunks
            print(f"dW {label} ({rows_c}-row chunks x {chunks:.1f}): {out['dw_ms'][label]:.0f} ms", flush=True)
        except (RuntimeError, TypeError) as exc:
            print(f"dW {label}: fails {type(exc).__name__}: {str(exc)[:150]}")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        out["dw_ms"]["fp32 addmm_ with TF32"] = ev(dw_ms["fp32 addmm_ of upcast chunks"]) * chunks
        out["fwd_bwd_tf32_ms"] = ev(step, n=2)
        print(f"dW fp32 addmm_ with TF32: {out['dw_ms']['fp32 addmm_ with TF32']:.0f} ms; onepass fwd+bwd with "
              f"allow_tf32 {out['fwd_bwd_tf32_ms']:.2f} ms = {out['fwd_bwd_tf32_ms'] / floor:.2f}x floor", flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
    del dzc, dw, a, b

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=70))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
