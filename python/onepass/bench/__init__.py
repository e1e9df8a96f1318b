"""Benchmarks of onepass: ``python -m onepass.bench`` (CLI) and the pytest-benchmark suites in ``benchmarks/``.

One registry defines every case once; the CLI and the suites both read it.

Cases
    family x variant x shape x dtype x pass x provider.  Passes: ``"fwd"`` (under ``torch.no_grad()``) and
    ``"fwd+bwd"`` (forward, then backward of Σ_k Σ_i out_k[i]·u[k, i] with a fixed random upstream gradient u
    over every output that requires grad, entropy included).  Providers: ``"onepass"`` (the public function,
    ``backend="auto"`` unless ``--backend``), ``"naive"`` (``onepass.reference``: plain PyTorch that
    materializes the [N, V] logits and fp32 copies), and on a CUDA device only, when importable,
    ``"torch.compile(naive)"``, ``"liger"`` (liger_kernel) and ``"cce"`` (cut_cross_entropy).  A missing peer
    is not listed; the run says so once.

Families now (one module each, ``cases_<family>.py``)
    ``logprobs`` (token_logprobs + entropy), ``linear_logprobs`` (linear_token_logprobs + entropy),
    ``divergence`` (reverse_kl, jsd), ``linear_divergence`` (reverse_kl), ``policy_ref``
    (linear_policy_ref_stats).

Adding a family (grpo_loss, opd_loss, sinkhorn, group_advantages, ...)
    Create ``python/onepass/bench/cases_<family>.py`` exposing ``FAMILIES = [family(...)]``; it is found
    automatically (every ``cases_*`` module of this package is imported).  Nothing else needs editing,
    except a two-line ``benchmarks/test_bench_<op>.py`` if the op wants its own pytest-benchmark suite::

        from onepass.bench.registry import family, randn, targets, onepass_backend, Floor, linear_gemms
        import onepass
        from onepass import reference

        def make_inputs(shape, dtype, device, gen):          # plain leaf tensors; never zeros
            n, d, v = shape["N"], shape["D"], shape["V"]
            return {"hidden": randn((n, d), dtype, device, gen), ...}

        def run_onepass(x, **variant):                      # -> tensor, tuple or dict of tensors
            return onepass.grpo_loss(x["hidden"], ..., backend=onepass_backend())

        def run_naive(x, **variant):
            return reference.grpo_loss(...)

        FAMILIES = [family(
            "grpo_loss", op="grpo_loss", make_inputs=make_inputs,
            providers={"onepass": run_onepass, "naive": run_naive},   # + "liger": fn (GPU, optional)
            shapes={"cpu": [{"N": 4096, "D": 1024, "V": 32000}],       # every shape holds "N" (rows
                    "cuda": [{"N": 16384, "D": 4096, "V": 151936}],    # of the upstream gradient)
                    "quick": [{"N": 64, "D": 32, "V": 256}]},
            grad_inputs=("hidden", "weight"),                 # leaves that require grad in fwd+bwd
            variants=[{}],                                    # e.g. [{"kind": "jsd"}]: kwargs of the providers
            floor=lambda shape, dtype, pass_, variant: Floor(gemms=linear_gemms(...)),   # GPU, optional
            notes={"liger": "what differs in the peer's work"}, order=60,
        )]

    ``Floor(gemms=...)`` is a sum of measured cuBLAS GEMMs; ``Floor(bytes=...)`` is bytes over the measured
    device copy bandwidth.  Shapes without "V" are fine (the plot only draws families with a "V" sweep).
    Optional peers go in ``providers`` under "liger" / "cce" and import their package inside the function.

Measurement (``measure.py``)
    CPU time: ``time.perf_counter``, median of up to ``--repeat`` calls (default 3) after a warm-up call on
    a tiny shape; repetition stops early once ``--max-time`` seconds (default 60) were spent; the number
    of calls is reported.  CPU peak extra memory: Linux RSS high-water mark — garbage collected,
    ``malloc_trim(0)``, ``/proc/self/clear_refs`` reset of VmHWM, baseline VmRSS with the inputs resident,
    then VmHWM after the call minus the baseline (outputs, gradients, temporaries, allocator slack all
    count).  Each (case, provider) runs in a fresh subprocess (``--isolate case``, the CPU default;
    ``--quick`` measures in-process).  GPU: CUDA-event timing after a warm-up, L2 flushed before each
    call, median of ``--repeat`` calls (default 20); peak extra memory = ``max_memory_allocated`` during
    one call minus ``memory_allocated`` before it.  GPU floors (``floors.py``): linear ops against the
    measured GEMMs (fwd+bwd: logits, recompute, dH = dZ@W, dW = dZ.T@h, the 4-GEMM floor), logits-input
    ops against inputs-read-once + outputs-written-once bytes (backward: read again + write the gradient)
    over the measured copy bandwidth; "% of floor" = floor time ÷ measured time.

Outputs (``--out``, default ``bench_out/``)
    a table on stdout, ``results.json`` (rows + device name, CPU model / GPU name, versions, date, load
    average), ``results.md`` (same header + table) and ``plot.png`` (time and peak extra memory against V,
    one column per family).
"""
from .registry import Case, Family, Floor, Gemm, cases, families, family, get_family, providers_for  # noqa: F401
