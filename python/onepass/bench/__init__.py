"""Benchmarks of onepass: ``python -m onepass.bench`` (CLI) and the pytest-benchmark suites in ``benchmarks/``.

One registry defines every case once; the CLI and the suites both read it.  The CLI's tables, progress bar
and plot use the ``bench`` extra (rich, matplotlib), imported lazily; the peers come from the ``peers``
extra and are imported only by the measuring processes.

Cases
    family x variant x shape x dtype x pass x provider.  Passes: ``"fwd"`` (under ``torch.no_grad()``) and
    ``"fwd+bwd"`` (forward, then backward of Σ_k Σ_i out_k[i]·u[k, i] with a fixed random upstream gradient u
    over every output that requires grad, entropy included).  Providers: ``"onepass"`` (the public function,
    ``backend="auto"`` unless ``--backend``), ``"naive"`` (``onepass.reference``: plain PyTorch that
    materializes the [N, V] logits and fp32 copies), the installed peers that run on the device
    (``registry.PEERS``: "torch.compile(naive)", "trl", "liger-chunked", "pot" on CPU and GPU; "liger" and
    "cce" on GPU), and on the CPU the "floor" of the fused-linear families (their GEMMs alone, torch.mm).
    A missing peer is not listed; the run says so once.

Shapes
    The default run measures one representative shape per family (``default=``, else the first of the
    sweep); ``--full`` runs the sweeps (``shapes=``); ``--quick`` the tiny "quick" shapes.

Families now (one module each, ``cases_<family>.py``)
    ``logprobs``, ``linear_logprobs``, ``divergence`` (reverse_kl, jsd), ``linear_divergence`` (reverse_kl),
    ``policy_ref``, ``grpo_loss``, ``opd_loss``, ``sinkhorn``, ``group_advantages``.

Adding a family
    Create ``python/onepass/bench/cases_<family>.py`` exposing ``FAMILIES = [family(...)]``; it is found
    automatically (every ``cases_*`` module of this package is imported).  Add a two-line
    ``benchmarks/test_bench_<op>.py`` suite (a test checks that every family has one)::

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
            providers={"onepass": run_onepass, "naive": run_naive},   # + peers by registry.PEERS key
            shapes={"cpu": [{"N": 4096, "D": 1024, "V": 32000}],       # the --full sweeps; every shape
                    "cuda": [{"N": 16384, "D": 4096, "V": 151936}],    # holds "N" (rows of the upstream
                    "quick": [{"N": 64, "D": 32, "V": 256}]},          # gradient) or "B","T" or "G"
            default={"cpu": {"N": 1024, "D": 512, "V": 32000}},       # optional: the default run's shape
            grad_inputs=("hidden", "weight"),                 # leaves that require grad in fwd+bwd
            variants=[{}],                                    # e.g. [{"kind": "jsd"}]: kwargs of the providers
            floor=lambda shape, dtype, pass_, variant: Floor(gemms=linear_gemms(...)),   # optional
            notes={"liger-chunked": "what differs in the peer's work"}, order=60,
        )]

    ``Floor(gemms=...)`` is a sum of GEMMs (measured with cuBLAS on a GPU, and on the CPU as the "floor"
    provider without the recompute GEMMs); ``Floor(bytes=...)`` is bytes over the measured device copy
    bandwidth (GPU only).  Optional peers go in ``providers`` under their ``registry.PEERS`` key and import
    their package inside the function.

Measurement (``measure.py``, ``_worker.py``)
    The providers of one case are timed interleaved (round r calls each once, order rotated by r) after an
    untimed warm-up (at the real shape for peers that compile); at least ``--rounds`` (3) rounds, more up to
    ``--max-rounds`` (9) while the next is expected to end within the case's budget ``--max-time`` (1.5 s;
    3 s with ``--full``).  Ratios are medians of per-round ratios with
    min-max; "unresolved" when that range crosses 1.  CPU time: ``time.perf_counter``; CPU peak extra memory:
    Linux RSS high-water mark (garbage collected, ``malloc_trim(0)``, ``/proc/self/clear_refs`` reset of VmHWM,
    baseline VmRSS with the inputs resident, VmHWM after the call minus the baseline), each (case, provider)
    in a fresh process forked from a forkserver that preloaded torch, onepass and the peers (``--isolate
    case``, the CPU default; ``--quick`` measures in-process).  GPU: CUDA-event timing after a warm-up, L2
    flushed before each call, median of ``--repeat`` calls per round; peak extra memory =
    ``max_memory_allocated`` during one call minus ``memory_allocated`` before it; "% of floor" = floor time ÷
    measured time.

Outputs (``--out``, default ``bench_out/``)
    tables on stdout (results and verdicts, ≤ 120 columns), ``results.json`` (rows with per-round times,
    verdicts, device, CPU model / GPU name, versions, date, load averages), ``results.md`` and ``plot.png``
    (one panel per family, ≤ 3 per row: bars of time and memory ÷ naive for a single shape, lines against
    the sweep otherwise).
"""
from .registry import PEERS, Case, Family, Floor, Gemm, cases, families, family, get_family, providers_for  # noqa: F401
