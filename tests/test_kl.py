"""kl_penalty (sampled-token KL estimators) against their formulas, and linear_policy_ref_stats on every
backend here vs the float64 reference."""
import math

import pytest
import torch

import onepass
from onepass.reference import vocab as ref

from _helpers import assert_tolerance, backend_cases

BACKENDS = backend_cases()
ESTIMATORS = ["k1", "k2", "k3", "abs"]


def _formula(x, est):
    """verl / OpenRLHF: k1 = log r, k2 = (log r)^2 / 2, k3 = r^-1 - 1 + log r (x = log p - log p_ref)."""
    if est == "k1":
        return x
    if est == "k2":
        return 0.5 * x * x
    if est == "k3":
        return torch.exp(-x) + x - 1
    return x.abs()


def _dformula(x, est):
    if est == "k1":
        return torch.ones_like(x)
    if est == "k2":
        return x
    if est == "k3":
        return 1 - torch.exp(-x)
    return torch.sign(x)


def _pair(shape, dtype, scale=2.0):
    logp = (-torch.rand(shape, dtype=torch.float64) * 5).to(dtype)
    ref_logp = (logp.double() + torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    return logp, ref_logp


# ---------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("est", ESTIMATORS + [e + "+" for e in ESTIMATORS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kl_penalty_value_and_grad(est, dtype):
    base, straight = est.rstrip("+"), est.endswith("+")
    logp, ref_logp = _pair((4, 9), dtype)
    a, b = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    out = onepass.kl_penalty(a, b, estimator=est)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == logp.shape
    x = logp.double() - ref_logp.double()  # exact log-ratio of the (rounded) inputs; |x| << 20 here
    want = _formula(x, base)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g.to(out.dtype)).sum().backward()
    dx = g * (x if straight else _dformula(x, base))  # straight-through: gradient of k2 = x
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    gtol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(a.grad.double(), dx.to(dtype).double(), rtol=gtol, atol=gtol)
    torch.testing.assert_close(b.grad.double(), (-dx).to(dtype).double(), rtol=gtol, atol=gtol)


@pytest.mark.parametrize("est", ESTIMATORS + [e + "+" for e in ESTIMATORS])
def test_kl_penalty_extreme_log_ratios(est):
    """±1000 log-ratios: the default clamp (20) is applied before exp: finite values, zero gradient."""
    base = est.rstrip("+")
    logp = torch.tensor([-1000.0, 0.0, -1.0, -3.0, -25.0, -0.5], requires_grad=True)
    ref_logp = torch.tensor([0.0, -1000.0, -2.0, -3.0, 0.0, -0.5 - 19.5], requires_grad=True)
    out = onepass.kl_penalty(logp, ref_logp, estimator=est)
    assert torch.isfinite(out).all()
    x = (logp.detach() - ref_logp.detach()).double().clamp(-20, 20)
    torch.testing.assert_close(out.double(), _formula(x, base), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(logp.grad).all() and torch.isfinite(ref_logp.grad).all()
    clamped = torch.tensor([True, True, False, False, True, False])
    assert torch.all(logp.grad[clamped] == 0) and torch.all(ref_logp.grad[clamped] == 0)
    inside = ~clamped
    d = x if est.endswith("+") else _dformula(x, base)
    torch.testing.assert_close(logp.grad[inside].double(), d[inside], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_penalty_extreme_low_precision(dtype):
    logp = torch.tensor([-1000.0, 0.0, -60000.0], dtype=dtype, requires_grad=True)
    ref_logp = torch.tensor([0.0, -1000.0, 0.0], dtype=dtype, requires_grad=True)
    out = onepass.kl_penalty(logp, ref_logp, estimator="k3")
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.all(logp.grad == 0) and torch.all(ref_logp.grad == 0)


def test_kl_penalty_custom_clamp_and_none():
    logp = torch.tensor([0.0, 0.0, 0.0])
    ref_logp = torch.tensor([-3.0, 1.0, 5.0])  # x = 3, -1, -5
    out = onepass.kl_penalty(logp, ref_logp, estimator="k1", clamp=2.0)
    assert out.tolist() == [2.0, -1.0, -2.0]
    out = onepass.kl_penalty(logp, ref_logp, estimator="k1", clamp=None)
    assert out.tolist() == [3.0, -1.0, -5.0]


def test_kl_penalty_default_is_k3_and_zero_at_equal():
    logp, ref_logp = _pair((7,), torch.float32)
    torch.testing.assert_close(onepass.kl_penalty(logp, ref_logp), onepass.kl_penalty(logp, ref_logp, estimator="k3"))
    for est in ESTIMATORS:
        assert torch.all(onepass.kl_penalty(logp, logp, estimator=est) == 0)
    # k2, k3 and abs are non-negative
    for est in ("k2", "k3", "abs"):
        assert torch.all(onepass.kl_penalty(logp, ref_logp, estimator=est) >= 0)


@pytest.mark.parametrize("est", ESTIMATORS + ["k2+"])
def test_kl_penalty_gradcheck_float64(est):
    logp, ref_logp = _pair((3, 5), torch.float64, scale=1.0)
    if est == "abs":  # keep away from the kink at 0
        ref_logp = torch.where((logp - ref_logp).abs() < 0.1, ref_logp + 0.5, ref_logp)
    a, b = logp.requires_grad_(), ref_logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: onepass.kl_penalty(a, b, estimator=est, clamp=50.0), (a, b))


def test_kl_penalty_compile_fullgraph():
    logp, ref_logp = _pair((3, 6), torch.float32, scale=10.0)

    def f(a, b):
        return onepass.kl_penalty(a, b, estimator="k3") + 0.5 * onepass.kl_penalty(a, b, estimator="k1+", clamp=5.0)

    a1, b1 = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    a2, b2 = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    eager = f(a1, b1)
    compiled = torch.compile(f, fullgraph=True)(a2, b2)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn(eager.shape)
    (eager * g).sum().backward()
    (compiled * g).sum().backward()
    torch.testing.assert_close(a2.grad, a1.grad)
    torch.testing.assert_close(b2.grad, b1.grad)


# ---------------------------------------------------------------------------------------------
# linear_policy_ref_stats
# ---------------------------------------------------------------------------------------------
def _prs_inputs(n, d, dr, v, dtype, device, bias=True, ignore_frac=0.25):
    h = torch.randn(n, d, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, dtype=torch.float64) / d ** 0.5 * 2).to(dtype)
    b = (torch.randn(v, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    rh = torch.randn(n, dr, dtype=torch.float64).to(dtype)
    rw = (torch.randn(v, dr, dtype=torch.float64) / dr ** 0.5 * 2).to(dtype)
    rb = (torch.randn(v, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v, (n,))
    t[torch.rand(n) < ignore_frac] = -100
    mv = lambda x: x.to(device) if x is not None else None  # noqa: E731
    return [mv(x) for x in (h, w, b, rh, rw, rb)], t.to(device)


KEYS = ("logp", "ref_logp", "entropy", "kl_full")


def _naive_same_dtype(h, w, b, rh, rw, rb, t, T):
    """What a user would write in the input dtype (the error baseline of the tolerance rule)."""
    z = (h @ w.T + (b if b is not None else 0)) / T
    with torch.no_grad():
        zr = (rh @ rw.T + (rb if rb is not None else 0)) / T
    logsm, ref_logsm = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    m = t != -100
    safe = t.clamp_min(0).unsqueeze(-1)
    p = logsm.exp()
    out = {"logp": logsm.gather(-1, safe).squeeze(-1), "ref_logp": ref_logsm.gather(-1, safe).squeeze(-1),
           "entropy": -(p * logsm).sum(-1), "kl_full": (p * (logsm - ref_logsm)).sum(-1)}
    # returned as float32 so that the baseline error is measured, not hidden by rounding the output to bf16
    return {k: torch.where(m, v, 0).float() for k, v in out.items()}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,dr,v,bias", [(13, 32, 48, 500, True), (6, 16, 24, 300, False)])
def test_linear_policy_ref_stats_matches_reference(backend, device, dtype, n, d, dr, v, bias):
    (h, w, b, rh, rw, rb), t = _prs_inputs(n, d, dr, v, dtype, device, bias)
    T = 0.9
    pol = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    refs = [x.clone().requires_grad_() if x is not None else None for x in (rh, rw, rb)]
    out = onepass.linear_policy_ref_stats(pol[0], pol[1], refs[0], refs[1], t, bias=pol[2], ref_bias=refs[2],
                                          temperature=T, backend=backend)
    assert set(out) >= set(KEYS)
    cpu64 = lambda x: x.detach().double().cpu().requires_grad_() if x is not None else None  # noqa: E731
    r_pol = [cpu64(x) for x in (h, w, b)]
    r_refs = [cpu64(x) for x in (rh, rw, rb)]
    want = ref.linear_policy_ref_stats(r_pol[0], r_pol[1], r_refs[0], r_refs[1], t.cpu(), bias=r_pol[2],
                                       ref_bias=r_refs[2], temperature=T)
    nv = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    naive = _naive_same_dtype(nv[0], nv[1], nv[2], rh, rw, rb, t, T)
    ignored = (t == -100).cpu()
    for k in KEYS:
        assert out[k].dtype == torch.float32 and out[k].shape == (n,)
        assert_tolerance(out[k], want[k], naive[k], dtype, k, scale=max(1.0, want[k].detach().abs().max().item()))
        assert torch.all(out[k].detach().cpu()[ignored] == 0), f"{k}: ignored rows must be 0"
    gs = {k: torch.randn(n, dtype=torch.float64) for k in KEYS}
    sum((out[k] * gs[k].to(device).float()).sum() for k in KEYS).backward()
    sum((want[k] * gs[k]).sum() for k in KEYS).backward()
    sum((naive[k] * gs[k].to(device).float()).sum() for k in KEYS).backward()
    for name, mine, exact, nai in zip(("hidden", "weight", "bias"), pol, r_pol, nv):
        if mine is None:
            continue
        assert mine.grad is not None and mine.grad.dtype == dtype
        assert_tolerance(mine.grad, exact.grad, nai.grad, dtype, f"grad {name}",
                         scale=max(1.0, exact.grad.abs().max().item()))
    assert torch.all(pol[0].grad.cpu()[ignored] == 0), "ignored rows must receive no gradient"
    for name, x in zip(("ref_hidden", "ref_weight", "ref_bias"), refs):
        if x is not None:
            assert x.grad is None, f"{name} must receive no gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_linear_policy_ref_stats_same_model_and_leading_shape(backend, device):
    """Policy == reference: ref_logp == logp and kl_full == 0; [B, T, D] leading shapes are kept."""
    (h, w, b, _, _, _), t = _prs_inputs(8, 24, 24, 333, torch.float32, device)
    h3, t3 = h.reshape(2, 4, 24), t.reshape(2, 4)
    out = onepass.linear_policy_ref_stats(h3, w, h3, w, t3, bias=b, ref_bias=b, backend=backend)
    for k in KEYS:
        assert out[k].shape == (2, 4)
    torch.testing.assert_close(out["ref_logp"], out["logp"], rtol=1e-6, atol=1e-6)
    assert out["kl_full"].abs().max().item() < 1e-5
    single = onepass.linear_token_logprobs(h3, w, t3, bias=b, return_entropy=True, backend=backend)
    torch.testing.assert_close(out["logp"], single[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["entropy"], single[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_linear_policy_ref_stats_gradcheck_float64(backend):
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    rh, rw = torch.randn(4, 7, dtype=torch.float64), torch.randn(11, 7, dtype=torch.float64)
    t = torch.tensor([0, 10, -100, 3])

    def f(h, w, b):
        o = onepass.linear_policy_ref_stats(h, w, rh, rw, t, bias=b, temperature=1.2, backend=backend)
        return tuple(o[k] for k in KEYS)

    assert torch.autograd.gradcheck(f, (h, w, b))
    assert math.isfinite(float(f(h, w, b)[3].sum()))
