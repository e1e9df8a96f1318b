"""The kernel contract (docs/vocab_stats.md), one test for every backend's vocab-stats launchers: cpu,
cuda (GPU), triton (GPU, or the interpreter on CPU) and torch, against a float64 PyTorch statement of
the same semantics (tests/_vocab_stats_ref.py) with gradients by autograd.  The Triton interpreter is
slow: it runs the grid on small vocabularies and float32/float16 only (``_grid``)."""
from __future__ import annotations

import math

import pytest
import torch

from onepass import _contract
from onepass._contract import Grad, Kind, Stat
from onepass._dispatch import Cap, has, launcher

from _helpers import backend_cases
from _vocab_stats_ref import as_map, assert_close, make_inputs, reference, uniform_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KINDS = list(Kind)
BACKENDS = backend_cases()
D = [Stat.LSE_A, Stat.LSE_B, Stat.LOGP_A, Stat.LOGP_B, Stat.ENTROPY, Stat.DIV]  # the reference's columns


def _id(x):
    if isinstance(x, torch.dtype):
        return str(x).split(".")[-1]
    if isinstance(x, Kind):
        return x.name.lower()
    return str(x)


def _grid(*axes, names):
    """pytest params of (backend, device) x the product of ``axes`` (lists of values), without the
    combinations a backend does not take (float64 on the GPU kernels) or that are too slow for the
    Triton interpreter (vocabularies > 300, bfloat16, float64)."""
    import itertools

    out = []
    for bp in BACKENDS:
        backend, device = bp.values
        for combo in itertools.product(*axes):
            kw = dict(zip(names, combo))
            dtype = kw.get("dtype", torch.float32)
            if dtype == torch.float64 and not has("vocab_stats", backend, Cap.FLOAT64):
                continue
            if backend == "triton" and device == "cpu" and (kw.get("v", 0) > 300 or dtype in (torch.bfloat16,
                                                                                               torch.float64)):
                continue
            out.append(pytest.param(backend, device, *combo, marks=bp.marks,
                                    id="-".join([bp.id] + [_id(c) for c in combo])))
    return out


def _mod(backend):
    return launcher("vocab_stats", backend)


def tol_for(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}[dtype]


def grad_tol_for(dtype):
    # fp16/bf16 gradients are rounded to the input dtype on output
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]


def run_case(backend, device, n, v, dtype, kind, inv_temp, beta=0.5, alpha=0.5, *, with_targets=True, seed=0,
             with_ninf=True):
    mod = _mod(backend)
    a, b, targets, grads = make_inputs(n, v, dtype, seed=seed, with_ninf=with_ninf)
    if not with_targets:
        targets = None
        grads[:, [Grad.LOGP_A, Grad.LOGP_B]] = 0
    use_b = kind != Kind.NONE or seed % 2 == 0
    bb = b if use_b else None
    if bb is None:
        grads[:, Grad.LOGP_B] = 0
    if kind == Kind.NONE:
        grads[:, Grad.DIV] = 0
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    a_d, b_d, t_d = dev(a), dev(bb), dev(targets)
    stats = mod.vocab_stats_fwd(a_d, b_d, t_d, as_map(inv_temp), kind, beta, alpha, True)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.shape == (n, _contract.NUM_STATS) and stats.dtype == sd and stats.device == a_d.device
    ref_stats, ref_ga, ref_gb = reference(a, bb, targets, inv_temp, kind, beta, alpha, grads)
    tol = tol_for(dtype)
    assert_close(stats[:, D], ref_stats, tol, f"stats kind={kind}")
    if not has("vocab_stats", backend, Cap.AUTOGRAD):  # the backward workspace of the kernels
        if kind == Kind.REVERSE_KL:
            assert torch.equal(stats[:, Stat.SUM_A], stats[:, Stat.DIV]) and torch.all(stats[:, Stat.SUM_B] == 0)
        if kind == Kind.FORWARD_KL:
            assert torch.equal(stats[:, Stat.SUM_B], stats[:, Stat.DIV]) and torch.all(stats[:, Stat.SUM_A] == 0)
    if kind == Kind.NONE:
        assert torch.all(stats[:, Stat.DIV:] == 0)
    if targets is not None:
        assert torch.all(stats[t_d < 0] == 0)
    ga, gb = mod.vocab_stats_bwd(a_d, b_d, t_d, stats, grads.to(device, sd), as_map(inv_temp), kind, beta, alpha,
                                 True, bb is not None)
    assert ga.dtype == dtype and ga.shape == a.shape
    gtol = grad_tol_for(dtype)
    assert_close(ga, ref_ga, gtol, f"grad_a kind={kind}")
    if bb is not None:
        assert gb.dtype == dtype
        assert_close(gb, ref_gb, gtol, f"grad_b kind={kind}")
    else:
        assert gb is None
    if targets is not None:
        assert torch.all(ga[t_d < 0] == 0)
    return stats, ga, gb


# ----------------------------------------------------------------------------- tests
P = "backend,device"


@pytest.mark.parametrize(P + ",v,dtype,kind", _grid([1, 127, 1000], DTYPES, KINDS, names=("v", "dtype", "kind")))
def test_all_kinds_dtypes_vocab(backend, device, v, dtype, kind):
    run_case(backend, device, 5, v, dtype, kind, 1 / 0.7, beta=0.5, alpha=0.5, seed=v)


@pytest.mark.parametrize(P + ",dtype,kind", _grid([torch.float32, torch.bfloat16], KINDS, names=("dtype", "kind")))
def test_temperature_13(backend, device, dtype, kind):
    run_case(backend, device, 4, 300, dtype, kind, 1 / 1.3, beta=0.5, alpha=2.0, seed=1)


@pytest.mark.parametrize(P + ",dtype,beta", _grid(DTYPES, [0.1, 0.5], names=("dtype", "beta")))
def test_jsd_beta(backend, device, dtype, beta):
    run_case(backend, device, 4, 257, dtype, Kind.JSD, 1.0, beta=beta, seed=2)


@pytest.mark.parametrize(P + ",dtype,alpha", _grid(DTYPES, [1e-4, 0.5, 0.9999, 2.0], names=("dtype", "alpha")))
def test_alpha(backend, device, dtype, alpha):
    run_case(backend, device, 4, 257, dtype, Kind.ALPHA, 1 / 0.7, alpha=alpha, seed=3)


@pytest.mark.parametrize(P + ",v,dtype,kind", _grid([32000], [torch.float32, torch.bfloat16],
                                                     [Kind.NONE, Kind.REVERSE_KL, Kind.JSD, Kind.ALPHA],
                                                     names=("v", "dtype", "kind")))
def test_vocab_32000(backend, device, v, dtype, kind):
    run_case(backend, device, 3, v, dtype, kind, 1 / 0.7, beta=0.1, alpha=0.5, seed=5)


@pytest.mark.parametrize(P + ",kind", _grid(KINDS, names=("kind",)))
def test_no_targets(backend, device, kind):
    run_case(backend, device, 4, 200, torch.float32, kind, 1.0, with_targets=False, seed=6)
    a, b, _, _ = make_inputs(4, 200, torch.float32, seed=6)
    stats = _mod(backend).vocab_stats_fwd(a.to(device), b.to(device), None, uniform_map(), kind, 0.5, 0.5, True)
    assert torch.all(stats[:, [Stat.LOGP_A, Stat.LOGP_B]] == 0)


@pytest.mark.parametrize(P + ",dtype,kind", _grid([torch.float32, torch.float64], KINDS, names=("dtype", "kind")))
def test_n1_no_ninf(backend, device, dtype, kind):
    run_case(backend, device, 1, 333, dtype, kind, 1 / 0.7, with_ninf=False, seed=8)


@pytest.mark.parametrize(P + ",dtype,kind", _grid(DTYPES, KINDS[1:], names=("dtype", "kind")))
def test_identical_inputs_exact_zero(backend, device, dtype, kind):
    mod = _mod(backend)
    a, _, targets, grads = make_inputs(5, 300, dtype, seed=9)
    a, targets = a.to(device), targets.to(device)
    b = a.clone()
    # the kernels' φ forms give exactly 0; the plain-torch formulas round (a few ulps of the terms)
    exact = not has("vocab_stats", backend, Cap.AUTOGRAD)
    zero = (lambda x: torch.all(x == 0)) if exact else (lambda x: x.abs().max() <= 1e-6)  # noqa: E731
    stats = mod.vocab_stats_fwd(a, b, targets, uniform_map(1 / 0.7), kind, 0.3, 0.7, True)
    assert zero(stats[:, Stat.DIV:]), stats[:, Stat.DIV:]
    assert torch.equal(stats[:, Stat.LSE_A], stats[:, Stat.LSE_B])
    assert torch.equal(stats[:, Stat.LOGP_A], stats[:, Stat.LOGP_B])
    g = torch.zeros_like(stats[:, :_contract.NUM_GRADS])
    g[:, Grad.DIV] = grads[:, Grad.DIV].to(g)
    ga, gb = mod.vocab_stats_bwd(a, b, targets, stats, g, uniform_map(1 / 0.7), kind, 0.3, 0.7, True, True)
    assert zero(ga.float()) and zero(gb.float())


@pytest.mark.parametrize(P, BACKENDS)
def test_need_entropy_and_grad_selection(backend, device):
    mod = _mod(backend)
    a, b, targets, grads = (x.to(device) for x in make_inputs(4, 100, torch.float32, seed=10))
    s1 = mod.vocab_stats_fwd(a, b, targets, uniform_map(), Kind.JSD, 0.5, 0.5, True)
    s0 = mod.vocab_stats_fwd(a, b, targets, uniform_map(), Kind.JSD, 0.5, 0.5, False)
    assert torch.all(s0[:, Stat.ENTROPY] == 0)
    others = [c for c in Stat if c != Stat.ENTROPY]
    assert torch.equal(s0[:, others], s1[:, others])
    g = grads.float()
    ga, gb = mod.vocab_stats_bwd(a, b, targets, s1, g, uniform_map(), Kind.JSD, 0.5, 0.5, True, True)
    ga2, gb2 = mod.vocab_stats_bwd(a, b, targets, s1, g, uniform_map(), Kind.JSD, 0.5, 0.5, True, False)
    ga3, gb3 = mod.vocab_stats_bwd(a, b, targets, s1, g, uniform_map(), Kind.JSD, 0.5, 0.5, False, True)
    assert gb2 is None and ga3 is None
    assert torch.equal(ga, ga2) and torch.equal(gb, gb3)


@pytest.mark.parametrize(P, BACKENDS)
def test_nan_and_all_ninf_rows_stay_local(backend, device):
    mod = _mod(backend)
    a, b, targets, grads = (x.to(device) for x in make_inputs(6, 150, torch.float32, seed=11, ignored=False))
    args = (uniform_map(), Kind.JSD, 0.5, 0.5)
    clean = mod.vocab_stats_fwd(a, b, targets, *args, True)
    ga_c, gb_c = mod.vocab_stats_bwd(a, b, targets, clean, grads.float(), *args, True, True)
    a2, b2 = a.clone(), b.clone()
    a2[2, 7] = float("nan")
    a2[4, :] = float("-inf")
    b2[4, :] = float("-inf")
    s = mod.vocab_stats_fwd(a2, b2, targets, *args, True)
    assert torch.isnan(s[2, Stat.LSE_A]) and torch.isnan(s[2, Stat.DIV]) and torch.isnan(s[4, Stat.DIV])
    assert s[4, Stat.LSE_A] == float("-inf")
    ok = [0, 1, 3, 5]
    torch.testing.assert_close(s[ok], clean[ok], rtol=0, atol=0)
    ga, gb = mod.vocab_stats_bwd(a2, b2, targets, s, grads.float(), *args, True, True)
    torch.testing.assert_close(ga[ok], ga_c[ok], rtol=0, atol=0)
    torch.testing.assert_close(gb[ok], gb_c[ok], rtol=0, atol=0)
    # an all -inf row as the first blocks of a row, NaN later in an all -inf region
    a3 = torch.full((1, 200), float("-inf"), device=device)
    a3[0, 150] = float("nan")
    s3 = mod.vocab_stats_fwd(a3, None, None, uniform_map(), Kind.NONE, 0.5, 0.5, True)
    assert torch.isnan(s3[0, Stat.LSE_A])


@pytest.mark.parametrize(P + ",dtype", _grid([torch.float32, torch.float64], names=("dtype",)))
def test_leading_ninf_blocks_and_large_logits(backend, device, dtype):
    # the first 130 entries are -inf (no NaN from the rescale), then huge logits
    a = torch.randn(3, 1000, dtype=torch.float64) * 3 + 500.0
    a[:, :130] = float("-inf")
    b = a + torch.randn(3, 1000, dtype=torch.float64) * 0.5
    b[:, :130] = float("-inf")
    targets = torch.tensor([200, 500, 999])
    grads = torch.randn(3, 4, dtype=torch.float64)
    mod = _mod(backend)
    aa, bb = a.to(dtype), b.to(dtype)
    for kind in (Kind.REVERSE_KL, Kind.FORWARD_KL, Kind.JSD, Kind.ALPHA):
        stats = mod.vocab_stats_fwd(aa.to(device), bb.to(device), targets.to(device), uniform_map(), kind, 0.5, 0.5,
                                    True)
        ref, ga_r, gb_r = reference(aa, bb, targets, uniform_map(), kind, 0.5, 0.5, grads)
        assert torch.isfinite(stats).all()
        # float32: logits ~500 carry an absolute rounding error of ~3e-5 on every entry
        tol = 1e-10 if dtype == torch.float64 else 2e-4
        assert_close(stats[:, D], ref, tol, f"kind {kind}")
        ga, gb = mod.vocab_stats_bwd(aa.to(device), bb.to(device), targets.to(device), stats,
                                     grads.to(device, stats.dtype), uniform_map(), kind, 0.5, 0.5, True, True)
        assert_close(ga, ga_r, tol, "grad_a")
        assert_close(gb, gb_r, tol, "grad_b")


@pytest.mark.parametrize(P, BACKENDS)
def test_empty(backend, device):
    mod = _mod(backend)
    a = torch.zeros(0, 10, device=device)
    stats = mod.vocab_stats_fwd(a, None, None, uniform_map(), Kind.NONE, 0.5, 0.5, True)
    assert stats.shape == (0, _contract.NUM_STATS)
    ga, gb = mod.vocab_stats_bwd(a, None, None, stats, torch.zeros(0, _contract.NUM_GRADS, device=device),
                                 uniform_map(), Kind.NONE, 0.5, 0.5, True, False)
    assert ga.shape == (0, 10) and gb is None


@pytest.mark.parametrize(P, BACKENDS)
def test_inf_kl_where_q_is_zero(backend, device):
    # b = -inf where a is finite: reverse KL and chi2 are +inf, never NaN
    a = torch.zeros(1, 8, device=device)
    b = torch.zeros(1, 8, device=device)
    b[0, 3] = float("-inf")
    mod = _mod(backend)
    for kind in (Kind.REVERSE_KL, Kind.CHI2):
        s = mod.vocab_stats_fwd(a, b, None, uniform_map(), kind, 0.5, 0.5, False)
        assert s[0, Stat.DIV] == math.inf, (kind, s)
    s = mod.vocab_stats_fwd(a, b, None, uniform_map(), Kind.FORWARD_KL, 0.5, 0.5, False)
    assert math.isfinite(s[0, Stat.DIV].item())


def test_alpha_limits_match_kl():
    a, b, targets, _ = make_inputs(4, 500, torch.float32, seed=4)
    fwd = _mod("cpu").vocab_stats_fwd
    rkl = fwd(a, b, targets, uniform_map(), Kind.REVERSE_KL, 0.5, 0.5, False)[:, Stat.DIV]
    fkl = fwd(a, b, targets, uniform_map(), Kind.FORWARD_KL, 0.5, 0.5, False)[:, Stat.DIV]
    a1 = fwd(a, b, targets, uniform_map(), Kind.ALPHA, 0.5, 1 - 1e-5, False)[:, Stat.DIV]
    a0 = fwd(a, b, targets, uniform_map(), Kind.ALPHA, 0.5, 1e-5, False)[:, Stat.DIV]
    torch.testing.assert_close(a1, rkl, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(a0, fkl, rtol=1e-3, atol=1e-4)


def test_compiled_bounds_checks():
    from onepass import _C

    x = torch.zeros(2, 10)
    st = torch.zeros(2, _contract.NUM_STATS)
    with pytest.raises(ValueError):  # a kind past the table
        _C.vocab_stats_fwd_cpu(x.data_ptr(), x.data_ptr(), 0, st.data_ptr(), 2, 10, 0, 1.0, 0.0, 1.0, 0.0,
                               _contract.NUM_KINDS, 0.5, 0.5, True)
    with pytest.raises(ValueError):  # an unknown dtype code
        _C.vocab_stats_fwd_cpu(x.data_ptr(), x.data_ptr(), 0, st.data_ptr(), 2, 10, 7, 1.0, 0.0, 1.0, 0.0,
                               Kind.REVERSE_KL, 0.5, 0.5, True)


def test_compiled_contract_matches_python():
    """csrc/common.h mirrors onepass._contract: the compiled enum values equal the Python ones."""
    from onepass import _C

    compiled = _C.contract
    for enum in (_contract.DType, _contract.Kind, _contract.Stat, _contract.Grad):
        assert compiled[enum.__name__] == {m.name: int(m) for m in enum}, enum.__name__
    assert compiled["sizes"] == {"NUM_KINDS": _contract.NUM_KINDS, "NUM_STATS": _contract.NUM_STATS,
                                 "NUM_GRADS": _contract.NUM_GRADS}
