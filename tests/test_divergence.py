"""divergence / linear_divergence for every kind on every backend here vs the float64 reference."""
import math

import pytest
import torch

import onepass
from onepass.reference import vocab as ref

from _helpers import DTYPES, assert_tolerance, backend_cases, interpreted, max_err

BACKENDS = backend_cases()
KIND_PARAMS = [
    ("reverse_kl", {}), ("forward_kl", {}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 1.0}),
    ("tv", {}), ("hellinger", {}), ("chi2", {}),
    ("alpha", {"alpha": 1e-4}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 0.9999}), ("alpha", {"alpha": 2.0}),
]
KP_IDS = [k + "".join(f"-{n}{v}" for n, v in p.items()) for k, p in KIND_PARAMS]


def _pair(lead, v, dtype, device, s_scale=2.0, t_scale=2.0, corr=0.5):
    a = torch.randn(*lead, v, dtype=torch.float64) * s_scale
    b = corr * a + (1 - corr) * torch.randn(*lead, v, dtype=torch.float64) * t_scale
    return a.to(dtype).to(device), b.to(dtype).to(device)


def _run(backend, device, a, b, kind, params, T=1.0, targets=None, grad_teacher=True):
    dtype = a.dtype
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_(grad_teacher)
    d = onepass.divergence(xa, xb, kind=kind, temperature=T, targets=targets, backend=backend, **params)
    assert d.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ra, rb = a.detach().double().cpu().requires_grad_(), b.detach().double().cpu().requires_grad_()
    tc = targets.cpu() if targets is not None else None
    rd = ref.divergence(ra, rb, kind=kind, temperature=T, targets=tc, **params)
    na, nb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    nd = ref.divergence(na, nb, kind=kind, temperature=T, targets=targets, **params)  # fp32 naive
    scale = max(1.0, rd.detach().abs().max().item())
    assert_tolerance(d, rd, nd, dtype, f"{kind} value", scale)
    g = torch.randn(d.shape, dtype=torch.float64)
    (d * g.to(device).to(d.dtype)).sum().backward()
    (rd * g).sum().backward()
    (nd * g.to(device).to(nd.dtype)).sum().backward()
    gscale = max(1.0, ra.grad.abs().max().item())
    assert_tolerance(xa.grad, ra.grad, na.grad, dtype, f"{kind} grad student", gscale)
    if grad_teacher:
        assert_tolerance(xb.grad, rb.grad, nb.grad, dtype, f"{kind} grad teacher", max(1.0, rb.grad.abs().max().item()))
    else:
        assert xb.grad is None
    return d


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,params", KIND_PARAMS, ids=KP_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_divergence_random(backend, device, kind, params, dtype):
    a, b = _pair((2, 3), 1000, dtype, device)
    _run(backend, device, a, b, kind, params, T=1.3)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,params", KIND_PARAMS, ids=KP_IDS)
@pytest.mark.parametrize("v", [1, 127, 4099])
def test_divergence_vocab_sizes_and_masking(backend, device, kind, params, v):
    a, b = _pair((5,), v, torch.float32, device)
    targets = torch.tensor([3 % v, -100, 0, -100, 1 % v], device=device)
    d = _run(backend, device, a, b, kind, params, T=0.7, targets=targets, grad_teacher=False)
    assert torch.all(d.detach().cpu()[targets.cpu() == -100] == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,params", KIND_PARAMS, ids=KP_IDS)
def test_identical_distributions_give_exact_zero(backend, device, kind, params):
    a, _ = _pair((4,), 333, torch.float32, device)
    a[:, 5] = float("-inf")
    xa, xb = a.clone().requires_grad_(), a.clone().requires_grad_()
    d = onepass.divergence(xa, xb, kind=kind, backend=backend, **params)
    d.sum().backward()
    if backend == "torch":  # the plain reference (logsumexp mixtures, autograd) leaves rounding residue
        assert d.abs().max() < 1e-6
        assert xa.grad.abs().max() < 1e-7 and xb.grad.abs().max() < 1e-7
    else:  # the kernels' φ, φ_a, φ_b vanish exactly at p = q
        assert torch.all(d == 0), d
        assert torch.all(xa.grad == 0) and torch.all(xb.grad == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,params", KIND_PARAMS, ids=KP_IDS)
def test_adversarial_distributions(backend, device, kind, params):
    """Peaked, flat, masked (−inf on both sides) and a teacher with near-zero tail mass."""
    v = 700
    a, b = _pair((6,), v, torch.float32, device)
    a[0] *= 25.0  # very peaked student
    # very peaked teacher; for chi2 and alpha > 1 (Σ p^α q^(1−α) with q → 0) a 25× peak puts the true value
    # near 1e83, beyond float32 (documented: the value is then inf and its gradient not finite)
    b[1] *= 5.0 if kind == "chi2" or params.get("alpha", 0.5) > 1 else 25.0
    a[2] *= 0.01  # flat
    b[2] *= 0.01
    a[3, ::7] = float("-inf")  # masked vocabulary, both sides
    b[3, ::7] = float("-inf")
    b[4, 100:] = b[4, 100:] - 25.0  # teacher tail with mass ~e^-25 (chi2's hard case)
    _run(backend, device, a, b, kind, params, T=1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_jsd_matches_trl_formula(backend, device, beta):
    """TRL GKD generalized_jsd_loss re-stated: β=0 → KL(teacher‖student), β=1 → KL(student‖teacher)."""
    a, b = _pair((3, 4), 257, torch.float32, device)
    s = torch.log_softmax(a.double().cpu() / 2.0, -1)
    t = torch.log_softmax(b.double().cpu() / 2.0, -1)
    if beta == 0:
        want = torch.nn.functional.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        want = torch.nn.functional.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        kl_t = torch.nn.functional.kl_div(m, t, reduction="none", log_target=True).sum(-1)
        kl_s = torch.nn.functional.kl_div(m, s, reduction="none", log_target=True).sum(-1)
        want = beta * kl_t + (1 - beta) * kl_s
    got = onepass.divergence(a, b, kind="jsd", beta=beta, temperature=2.0, backend=backend)
    assert max_err(got, want) < 2e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_alpha_is_continuous_at_the_kl_ends(backend, device):
    a, b = _pair((4,), 500, torch.float32, device)
    rkl = onepass.divergence(a, b, kind="reverse_kl", backend=backend)
    fkl = onepass.divergence(a, b, kind="forward_kl", backend=backend)
    near1 = onepass.divergence(a, b, kind="alpha", alpha=1 - 1e-6, backend=backend)
    near0 = onepass.divergence(a, b, kind="alpha", alpha=1e-6, backend=backend)
    assert max_err(near1, rkl) < 1e-4 * max(1.0, rkl.abs().max().item())
    assert max_err(near0, fkl) < 1e-4 * max(1.0, fkl.abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", "torch"])  # the GPU kernels compute in fp32
@pytest.mark.parametrize("kind,params", KIND_PARAMS, ids=KP_IDS)
def test_gradcheck_float64(backend, kind, params):
    a = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    f = lambda x, y: onepass.divergence(x, y, kind=kind, temperature=1.3, backend=backend, **params)  # noqa
    assert torch.autograd.gradcheck(f, (a, b))


# ---------------------------------------------------------------------------------------------
# Fused linear (student and teacher LM heads in one vocabulary loop)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,params", KIND_PARAMS, ids=KP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_divergence(backend, device, kind, params, dtype):
    n, ds, dt, v = (9, 32, 48, 259) if interpreted(backend, device) else (19, 32, 48, 1029)
    hs = torch.randn(n, ds, dtype=torch.float64).to(dtype).to(device)
    ws = (torch.randn(v, ds, dtype=torch.float64) / 3).to(dtype).to(device)
    bs = torch.randn(v, dtype=torch.float64).to(dtype).to(device)
    ht = torch.randn(n, dt, dtype=torch.float64).to(dtype).to(device)
    wt = (torch.randn(v, dt, dtype=torch.float64) / 3).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), device=device)
    targets[::5] = -100
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs, ht, wt)]
    d = onepass.linear_divergence(leaves[0], leaves[1], leaves[3], leaves[4], student_bias=leaves[2], kind=kind,
                                  temperature=0.9, targets=targets, backend=backend, **params)
    rl = [x.detach().double().cpu().requires_grad_() for x in (hs, ws, bs, ht, wt)]
    rd = ref.linear_divergence(rl[0], rl[1], rl[3], rl[4], student_bias=rl[2], kind=kind, temperature=0.9,
                               targets=targets.cpu(), **params)
    nl = [x.detach().clone().requires_grad_() for x in (hs, ws, bs, ht, wt)]
    nd = ref.divergence(nl[0] @ nl[1].T + nl[2], nl[3] @ nl[4].T, kind=kind, temperature=0.9, targets=targets,
                        **params)
    assert_tolerance(d, rd, nd, dtype, "value", max(1.0, rd.detach().abs().max().item()))
    g = torch.randn(n, dtype=torch.float64)
    (d * g.to(device).float()).sum().backward()
    (rd * g).sum().backward()
    (nd * g.to(device).float()).sum().backward()
    for name, mine, want, naive in zip(("hs", "ws", "bs", "ht", "wt"), leaves, rl, nl):
        assert_tolerance(mine.grad, want.grad, naive.grad, dtype, f"grad {name}",
                         max(1.0, want.grad.abs().max().item()))
