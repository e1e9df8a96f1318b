"""The Triton fused-linear backward (row pass for dh, vocab pass for dw/dbias over one bounded dz slab)
against float64 autograd, under the Triton interpreter on CPU (fp32 and fp16: bf16 is broken in the
interpreter) or on a GPU.

The slab is shrunk so that both passes run several chunks with ragged last chunks, and targets fall
on both sides of every vocab-chunk boundary.  Tolerance: max error ≤ tol · max |reference| with
tol 2e-5 (fp32), 4e-3 (fp16: dz and the GEMM operands are fp16) and 3e-2 (bf16, GPU only).
"""
from __future__ import annotations

import os

import pytest
import torch

from _vocab_stats_ref import ref_quantities

from onepass._contract import NUM_GRADS, Grad, Kind, LogitMap

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or the Triton interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
N, D, V = 19, 40, 150


def _cases():
    out = [pytest.param(False, Kind.NONE, torch.float32, False, False, id="single-fp32"),
           pytest.param(False, Kind.NONE, torch.float16, True, False, id="single-fp16-bias")]
    for k in Kind:
        dtype = torch.float32 if k % 2 == 0 else torch.float16
        out.append(pytest.param(True, k, dtype, k % 3 == 1, k in (Kind.JSD, Kind.ALPHA),
                                id=f"pair-{k.name.lower()}-{str(dtype)[6:]}{'-bias' if k % 3 == 1 else ''}"
                                   f"{'-grad_b' if k in (Kind.JSD, Kind.ALPHA) else ''}"))
    if torch.cuda.is_available():  # bf16 is broken in the interpreter only
        out += [pytest.param(False, Kind.NONE, torch.bfloat16, True, False, id="single-bf16-bias"),
                pytest.param(True, Kind.JSD, torch.bfloat16, False, True, id="pair-jsd-bf16-grad_b")]
    return out


def _model(g, dtype, bias):
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 1.5 / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    return [x.to(dtype) if x is not None else None for x in (h, w, b)]


@pytest.mark.parametrize("pair,kind,dtype,bias,grad_b", _cases())
def test_backward_matches_float64(monkeypatch, pair, kind, dtype, bias, grad_b):
    from onepass.triton_kernels import vocab_stats as vs
    slab = 2400  # fp32: 4 rows or 31 columns per chunk; fp16: 8 rows or 63 columns
    monkeypatch.setattr(vs, "DZ_SLAB_BYTES", slab)
    cols = slab // (N * torch.finfo(dtype).bits // 8)
    g = torch.Generator().manual_seed(100 + kind)
    ha, wa, ba = _model(g, dtype, bias)
    hb, wb, bb = _model(g, dtype, bias) if pair else (None, None, None)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[1, 5]] = -1
    targets[2], targets[3] = cols - 1, cols  # the two sides of a vocab-chunk boundary
    upstream = torch.randn(N, NUM_GRADS, generator=g, dtype=torch.float64)
    if not pair:
        upstream[:, Grad.LOGP_B] = 0
    if kind == Kind.NONE:
        upstream[:, Grad.DIV] = 0
    logit_map, beta, alpha = LogitMap(0.8, 3.0, 1.2, 0.0), 0.3, 1.6  # the policy soft-capped
    dev = lambda x: x.to(DEV) if x is not None else None  # noqa: E731
    stats = vs.linear_vocab_stats_fwd(dev(ha), dev(wa), dev(ba), dev(hb), dev(wb), dev(bb), dev(targets), logit_map,
                                      kind, beta, alpha, True)
    needs = [True, True, bias, pair and grad_b, pair and grad_b, pair and grad_b and bias]
    got = vs.linear_vocab_stats_bwd(dev(ha), dev(wa), dev(ba), dev(hb), dev(wb), dev(bb), dev(targets), stats,
                                    dev(upstream.float()), logit_map, kind, beta, alpha, needs)

    leaves = [x.double().requires_grad_() if x is not None else None for x in (ha, wa, ba, hb, wb, bb)]
    logits = lambda h, w, b: h @ w.T + (b if b is not None else 0.0)  # noqa: E731
    za = logits(*leaves[0:3])
    zb = logits(*leaves[3:6]) if pair else None
    qs = ref_quantities(za, zb, targets, logit_map, kind, beta, alpha)
    keep = (targets >= 0).double()
    loss = (keep * (upstream[:, 0] * qs[2] + upstream[:, 1] * qs[3] + upstream[:, 2] * qs[4]
                    + upstream[:, 3] * qs[5])).sum()
    wanted = [x for x, need in zip(leaves, needs) if need]
    refs = iter(torch.autograd.grad(loss, wanted))
    names = ["dh", "dw", "dbias", "dh_b", "dw_b", "dbias_b"]
    for name, need, x, out in zip(names, needs, leaves, got):
        if not need:
            assert out is None, name
            continue
        ref = next(refs)
        assert out.dtype == dtype and out.shape == x.shape, name
        err = (out.cpu().double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= TOL[dtype] * scale, f"{name}: max error {err:.3e} (max |ref| {scale:.3e})"
    assert torch.all(got[0][torch.tensor([1, 5])] == 0)  # ignored rows get no gradient

