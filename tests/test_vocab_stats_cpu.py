"""Kernel-level tests of the CPU vocab-stats launchers (onepass.backends.cpu) against a float64
PyTorch implementation of the same semantics (docs/vocab_stats.md), with gradients by autograd."""
from __future__ import annotations

import math

import pytest
import torch

from onepass.backends import cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KINDS = list(range(8))
KIND_NAMES = ["none", "reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "chi2", "alpha"]


from _vocab_stats_ref import assert_close, make_inputs, reference  # noqa: E402


def tol_for(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}[dtype]


def grad_tol_for(dtype):
    # fp16/bf16 gradients are rounded to the input dtype on output
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]


def run_case(n, v, dtype, kind, inv_temp, beta=0.5, alpha=0.5, *, with_targets=True, seed=0, with_ninf=True):
    a, b, targets, grads = make_inputs(n, v, dtype, seed=seed, with_ninf=with_ninf)
    if not with_targets:
        targets = None
        grads[:, :2] = 0
    use_b = kind != 0 or seed % 2 == 0
    bb = b if use_b else None
    if bb is None:
        grads[:, 1] = 0
    if kind == 0:
        grads[:, 3] = 0
    stats = cpu.vocab_stats_fwd(a, bb, targets, inv_temp, kind, beta, alpha, True)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.shape == (n, 8) and stats.dtype == sd
    ref_stats, ref_ga, ref_gb = reference(a, bb, targets, inv_temp, kind, beta, alpha, grads)
    tol = tol_for(dtype)
    assert_close(stats[:, :6], ref_stats, tol, f"stats kind={kind}")
    if kind == 1:
        assert torch.equal(stats[:, 6], stats[:, 5]) and torch.all(stats[:, 7] == 0)
    if kind == 2:
        assert torch.equal(stats[:, 7], stats[:, 5]) and torch.all(stats[:, 6] == 0)
    if kind == 0:
        assert torch.all(stats[:, 5:] == 0)
    if targets is not None:
        assert torch.all(stats[targets < 0] == 0)
    ga, gb = cpu.vocab_stats_bwd(a, bb, targets, stats, grads.to(sd), inv_temp, kind, beta, alpha, True, bb is not None)
    assert ga.dtype == dtype and ga.shape == a.shape
    gtol = grad_tol_for(dtype)
    assert_close(ga, ref_ga, gtol, f"grad_a kind={kind}")
    if bb is not None:
        assert gb.dtype == dtype
        assert_close(gb, ref_gb, gtol, f"grad_b kind={kind}")
    else:
        assert gb is None
    if targets is not None:
        assert torch.all(ga[targets < 0] == 0)
    return stats, ga, gb


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: KIND_NAMES[k])
@pytest.mark.parametrize("v", [1, 127, 1000])
def test_all_kinds_dtypes_vocab(dtype, kind, v):
    run_case(5, v, dtype, kind, 1 / 0.7, beta=0.5, alpha=0.5, seed=v)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: KIND_NAMES[k])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_temperature_13(kind, dtype):
    run_case(4, 300, dtype, kind, 1 / 1.3, beta=0.5, alpha=2.0, seed=1)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_jsd_beta(beta, dtype):
    run_case(4, 257, dtype, 3, 1.0, beta=beta, seed=2)


@pytest.mark.parametrize("alpha", [1e-4, 0.5, 0.9999, 2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_alpha(alpha, dtype):
    run_case(4, 257, dtype, 7, 1 / 0.7, alpha=alpha, seed=3)


def test_alpha_limits_match_kl():
    a, b, targets, _ = make_inputs(4, 500, torch.float32, seed=4)
    rkl = cpu.vocab_stats_fwd(a, b, targets, 1.0, 1, 0.5, 0.5, False)[:, 5]
    fkl = cpu.vocab_stats_fwd(a, b, targets, 1.0, 2, 0.5, 0.5, False)[:, 5]
    a1 = cpu.vocab_stats_fwd(a, b, targets, 1.0, 7, 0.5, 1 - 1e-5, False)[:, 5]
    a0 = cpu.vocab_stats_fwd(a, b, targets, 1.0, 7, 0.5, 1e-5, False)[:, 5]
    torch.testing.assert_close(a1, rkl, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(a0, fkl, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", [0, 1, 3, 7], ids=lambda k: KIND_NAMES[k])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_vocab_32000(kind, dtype):
    run_case(3, 32000, dtype, kind, 1 / 0.7, beta=0.1, alpha=0.5, seed=5)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: KIND_NAMES[k])
def test_no_targets(kind):
    run_case(4, 200, torch.float32, kind, 1.0, with_targets=False, seed=6)
    a, b, _, _ = make_inputs(4, 200, torch.float32, seed=6)
    stats = cpu.vocab_stats_fwd(a, b, None, 1.0, kind, 0.5, 0.5, True)
    assert torch.all(stats[:, 2:4] == 0)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: KIND_NAMES[k])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_n1_no_ninf(kind, dtype):
    run_case(1, 333, dtype, kind, 1 / 0.7, with_ninf=False, seed=8)


@pytest.mark.parametrize("kind", range(1, 8), ids=lambda k: KIND_NAMES[k])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_identical_inputs_exact_zero(kind, dtype):
    a, _, targets, grads = make_inputs(5, 300, dtype, seed=9)
    b = a.clone()
    stats = cpu.vocab_stats_fwd(a, b, targets, 1 / 0.7, kind, 0.3, 0.7, True)
    assert torch.all(stats[:, 5:] == 0), stats[:, 5:]
    assert torch.equal(stats[:, 0], stats[:, 1]) and torch.equal(stats[:, 2], stats[:, 3])
    g = torch.zeros_like(stats[:, :4])
    g[:, 3] = grads[:, 3].to(g.dtype)
    ga, gb = cpu.vocab_stats_bwd(a, b, targets, stats, g, 1 / 0.7, kind, 0.3, 0.7, True, True)
    assert torch.all(ga == 0) and torch.all(gb == 0)


def test_need_entropy_and_grad_selection():
    a, b, targets, grads = make_inputs(4, 100, torch.float32, seed=10)
    s1 = cpu.vocab_stats_fwd(a, b, targets, 1.0, 3, 0.5, 0.5, True)
    s0 = cpu.vocab_stats_fwd(a, b, targets, 1.0, 3, 0.5, 0.5, False)
    assert torch.all(s0[:, 4] == 0)
    assert torch.equal(torch.cat([s0[:, :4], s0[:, 5:]], 1), torch.cat([s1[:, :4], s1[:, 5:]], 1))
    g = grads.float()
    ga, gb = cpu.vocab_stats_bwd(a, b, targets, s1, g, 1.0, 3, 0.5, 0.5, True, True)
    ga2, gb2 = cpu.vocab_stats_bwd(a, b, targets, s1, g, 1.0, 3, 0.5, 0.5, True, False)
    ga3, gb3 = cpu.vocab_stats_bwd(a, b, targets, s1, g, 1.0, 3, 0.5, 0.5, False, True)
    assert gb2 is None and ga3 is None
    assert torch.equal(ga, ga2) and torch.equal(gb, gb3)


def test_nan_and_all_ninf_rows_stay_local():
    a, b, targets, grads = make_inputs(6, 150, torch.float32, seed=11, ignored=False)
    clean = cpu.vocab_stats_fwd(a, b, targets, 1.0, 3, 0.5, 0.5, True)
    ga_c, gb_c = cpu.vocab_stats_bwd(a, b, targets, clean, grads.float(), 1.0, 3, 0.5, 0.5, True, True)
    a2, b2 = a.clone(), b.clone()
    a2[2, 7] = float("nan")
    a2[4, :] = float("-inf")
    b2[4, :] = float("-inf")
    s = cpu.vocab_stats_fwd(a2, b2, targets, 1.0, 3, 0.5, 0.5, True)
    assert torch.isnan(s[2, 0])
    assert s[4, 0] == float("-inf")
    ok = [0, 1, 3, 5]
    assert torch.equal(s[ok], clean[ok])
    ga, gb = cpu.vocab_stats_bwd(a2, b2, targets, s, grads.float(), 1.0, 3, 0.5, 0.5, True, True)
    assert torch.equal(ga[ok], ga_c[ok]) and torch.equal(gb[ok], gb_c[ok])
    # an all -inf row as the first blocks of a row, NaN later in an all -inf region
    a3 = torch.full((1, 200), float("-inf"))
    a3[0, 150] = float("nan")
    s3 = cpu.vocab_stats_fwd(a3, None, None, 1.0, 0, 0.5, 0.5, True)
    assert torch.isnan(s3[0, 0])


def test_leading_ninf_blocks_and_large_logits():
    # the first 130 entries are -inf (no NaN from the rescale), then huge logits
    a = torch.randn(3, 1000, dtype=torch.float64) * 3 + 500.0
    a[:, :130] = float("-inf")
    b = a + torch.randn(3, 1000, dtype=torch.float64) * 0.5
    b[:, :130] = float("-inf")
    targets = torch.tensor([200, 500, 999])
    grads = torch.randn(3, 4, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        aa, bb = a.to(dtype), b.to(dtype)
        for kind in (1, 2, 3, 7):
            stats = cpu.vocab_stats_fwd(aa, bb, targets, 1.0, kind, 0.5, 0.5, True)
            ref, ga_r, gb_r = reference(aa, bb, targets, 1.0, kind, 0.5, 0.5, grads)
            assert torch.isfinite(stats).all()
            # float32: logits ~500 carry an absolute rounding error of ~3e-5 on every entry
            tol = 1e-10 if dtype == torch.float64 else 2e-4
            assert_close(stats[:, :6], ref, tol, f"kind {kind}")
            sd = stats.dtype
            ga, gb = cpu.vocab_stats_bwd(aa, bb, targets, stats, grads.to(sd), 1.0, kind, 0.5, 0.5, True, True)
            assert_close(ga, ga_r, tol, "grad_a")
            assert_close(gb, gb_r, tol, "grad_b")


def test_empty_and_errors():
    a = torch.zeros(0, 10)
    stats = cpu.vocab_stats_fwd(a, None, None, 1.0, 0, 0.5, 0.5, True)
    assert stats.shape == (0, 8)
    ga, gb = cpu.vocab_stats_bwd(a, None, None, stats, torch.zeros(0, 4), 1.0, 0, 0.5, 0.5, True, False)
    assert ga.shape == (0, 10) and gb is None
    from onepass import _C

    x = torch.zeros(2, 10)
    st = torch.zeros(2, 8)
    with pytest.raises(ValueError):
        _C.vocab_stats_fwd_cpu(x.data_ptr(), x.data_ptr(), 0, st.data_ptr(), 2, 10, 0, 1.0, 8, 0.5, 0.5, True)
    with pytest.raises(ValueError):
        _C.vocab_stats_fwd_cpu(x.data_ptr(), x.data_ptr(), 0, st.data_ptr(), 2, 10, 7, 1.0, 1, 0.5, 0.5, True)


def test_inf_kl_where_q_is_zero():
    # b = -inf where a is finite: reverse KL and chi2 are +inf, never NaN
    a = torch.zeros(1, 8)
    b = torch.zeros(1, 8)
    b[0, 3] = float("-inf")
    for kind in (1, 6):
        s = cpu.vocab_stats_fwd(a, b, None, 1.0, kind, 0.5, 0.5, False)
        assert s[0, 5] == math.inf, (kind, s)
    s = cpu.vocab_stats_fwd(a, b, None, 1.0, 2, 0.5, 0.5, False)
    assert math.isfinite(s[0, 5].item())
