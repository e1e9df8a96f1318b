"""GPU smoke test: every Triton vocab-stats kernel variant launched once, against the float64 reference.

One case per (path, model/kind): the logits path (``vocab_stats_fwd``/``_bwd``) and the fused-linear
path (``linear_vocab_stats_fwd``/``linear_vocab_grad_logits``), one model or two with each divergence
kind; the dtype and the bias rotate over the cases so that every dtype and both bias settings appear
for every path.  This is the quick check ``benchmarks/gpu_check.sh`` runs on a borrowed GPU (about 40
kernel compiles instead of the ~230 of ``pytest -m gpu``); the full GPU suite stays the thorough one.

Sizes are odd (N=37, D=200, V=1040: masked row, D and vocab tails) with -inf logits on the logits
path.  Tolerances: stats 1e-4 relative to the largest value (fp32 accumulation; the GPU's fp32 dot is
exact here, the bf16/fp16 products are exact in fp32), dL/dlogits as tests/test_vocab_stats_cuda.py.
"""
from __future__ import annotations

import pytest
import torch

from _vocab_stats_ref import assert_close, make_inputs, reference

from onepass._contract import Grad, Kind, LogitMap

MODELS = [("single", False, Kind.NONE)] + [(f"pair-{k.name.lower()}", True, k) for k in Kind]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STATS_TOL = 1e-4
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
N, D, V = 37, 200, 1040


def _cases():
    cases = []
    for path in ("logits", "linear"):
        for i, (label, pair, kind) in enumerate(MODELS):
            dtype = DTYPES[i % 3]
            bias = path == "linear" and i % 2 == 1
            cases.append(pytest.param(path, pair, kind, dtype, bias, marks=pytest.mark.gpu,
                                      id=f"{path}-{label}-{str(dtype)[6:]}{'-bias' if bias else ''}"))
    return cases


def _linear_logits(h, w, bias):
    z = h.double() @ w.double().T
    return z + bias.double() if bias is not None else z


def smoke_case(path, pair, kind, dtype, bias, device):
    """Launch the forward and the backward kernel of one variant on ``device`` and compare with the
    float64 reference on CPU."""
    from onepass.triton_kernels import vocab_stats as vs
    g = torch.Generator().manual_seed(1000 + 10 * kind + pair)
    # the policy's logits soft-capped, the second model's at another temperature without a cap
    logit_map, beta, alpha = LogitMap(0.7, 4.0, 0.9, 0.0), 0.3, 0.6 if kind != Kind.ALPHA else 1.7
    a, b, targets, grads = make_inputs(N, V, dtype, seed=kind, with_ninf=path == "logits")
    if not pair:
        b = None
        grads[:, Grad.LOGP_B] = 0
    if kind == Kind.NONE:
        grads[:, Grad.DIV] = 0
    dev = torch.device(device)
    td, gd = targets.to(dev), grads.to(dev, torch.float32)
    if path == "logits":
        za, zb = a, b
        ad, bd = a.to(dev), b.to(dev) if b is not None else None
        stats = vs.vocab_stats_fwd(ad, bd, td, logit_map, kind, beta, alpha, True)
        ga, gb = vs.vocab_stats_bwd(ad, bd, td, stats, gd, logit_map, kind, beta, alpha, True, pair)
    else:
        def model():
            h = (torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype)
            w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 2.0 / D ** 0.5).to(dtype)
            bb = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
            return h, w, bb
        ha, wa, bias_a = model()
        hb, wb, bias_b = model() if pair else (None, None, None)
        za = _linear_logits(ha, wa, bias_a)
        zb = _linear_logits(hb, wb, bias_b) if pair else None
        on = lambda x: x.to(dev) if x is not None else None  # noqa: E731
        stats = vs.linear_vocab_stats_fwd(on(ha), on(wa), on(bias_a), on(hb), on(wb), on(bias_b), td, logit_map,
                                          kind, beta, alpha, True)
        ga, gb = vs.linear_vocab_grad_logits(on(ha), on(wa), on(bias_a), on(hb), on(wb), on(bias_b), td, stats,
                                             gd, logit_map, kind, beta, alpha, True, pair)
    ref_stats, ref_ga, ref_gb = reference(za, zb, targets, logit_map, kind, beta, alpha, grads)
    what = f"{path} kind={kind} pair={pair} {dtype} bias={bias}"
    assert stats.shape == (N, 8) and stats.dtype == torch.float32
    assert_close(stats[:, :6], ref_stats, STATS_TOL, f"stats {what}")
    assert ga.dtype == dtype and ga.shape == (N, V)
    assert_close(ga, ref_ga, GRAD_TOL[dtype], f"grad_a {what}")
    if pair:
        assert_close(gb, ref_gb, GRAD_TOL[dtype], f"grad_b {what}")
    else:
        assert gb is None
    ignored = (targets < 0).to(dev)
    assert torch.all(ga[ignored] == 0) and torch.all(stats[ignored] == 0)


@pytest.mark.parametrize("path,pair,kind,dtype,bias", _cases())
def test_kernel_variant(path, pair, kind, dtype, bias):
    smoke_case(path, pair, kind, dtype, bias, "cuda")
