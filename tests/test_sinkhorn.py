"""onepass.sinkhorn_distance: vs POT, vs a re-statement of SinKD's loss, gradients, every backend."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import onepass  # noqa: E402
from onepass._dispatch import backend_status  # noqa: E402
from onepass.reference.sinkhorn import cost_matrix, log_sinkhorn  # noqa: E402
from onepass.reference.sinkhorn import sinkhorn_distance as ref_sinkhorn  # noqa: E402

sinkhorn_distance = getattr(onepass, "sinkhorn_distance", None)
if sinkhorn_distance is None:
    from onepass.sinkhorn import sinkhorn_distance  # noqa: E402

ot = pytest.importorskip("ot")

COSTS = ("l1", "sqeuclidean", "hellinger")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("cpu", "torch", "triton") if backend_status(b, torch.device(DEV).type)[0]]
F64_BACKENDS = [b for b in ("cpu", "torch") if backend_status(b, "cpu")[0]]


def _logits(n, v, dtype=torch.float32, scale=2.0, device=DEV):
    return (torch.randn(n, v, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _cost(a, b, cost, temperature=1.0):
    return cost_matrix(F.log_softmax(a.double() / temperature, -1), F.log_softmax(b.double() / temperature, -1), cost)


def _sinkd_loss(y_s, y_t, temperature, epsilon=0.1, n_iters=20):
    """SinKD's loss restated: softmax with T, torch.cdist p=1, row/column normalizations (log domain)."""
    p_s = F.softmax(y_s / temperature, dim=1)
    p_t = F.softmax(y_t / temperature, dim=1)
    w = torch.cdist(p_s, p_t, p=1)
    log_k = -w / epsilon
    for _ in range(n_iters):
        log_k = log_k - torch.logsumexp(log_k, dim=1, keepdim=True)
        log_k = log_k - torch.logsumexp(log_k, dim=0, keepdim=True)
    return torch.sum(log_k.exp() * w)


# ----------------------------------------------------------------------------------------------
# The G x G Sinkhorn vs POT.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("epsilon,n_iters", [(0.1, 20), (0.05, 7), (1e-3, 50)])
def test_plan_and_value_match_pot(cost, epsilon, n_iters):
    g = 7
    a, b = _logits(g, 50, torch.float64), _logits(g, 50, torch.float64)
    c = _cost(a.cpu(), b.cpu(), cost)
    value, plan, iters = log_sinkhorn(c, epsilon, n_iters)
    assert iters == n_iters
    w = torch.full((g,), 1.0 / g, dtype=torch.float64)
    # POT normalizes columns then rows; ours (SinKD's order) rows then columns: POT on C^T, transposed.
    pot_plan = ot.bregman.sinkhorn_log(w, w, c.T, epsilon, numItermax=n_iters, stopThr=-1.0, warn=False).T
    torch.testing.assert_close(plan, pot_plan, rtol=1e-9, atol=1e-12)
    pot_value = ot.sinkhorn2(w, w, c.T, epsilon, method="sinkhorn_log", numItermax=n_iters, stopThr=-1.0, warn=False)
    torch.testing.assert_close(value, torch.as_tensor(pot_value, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    # and the whole op (fused cost + the same iterations)
    for be in F64_BACKENDS:
        got = sinkhorn_distance(a.cpu(), b.cpu(), epsilon=epsilon, n_iters=n_iters, cost=cost, backend=be)
        torch.testing.assert_close(got, value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_marginals_fp32(backend):
    g = 8
    a, b = _logits(g, 64), _logits(g, 64)
    inv_temp = torch.tensor([1.0], dtype=torch.float64)
    planes, _ = torch.ops.onepass.sinkhorn_cost(a, b, inv_temp, g, 0, backend) if backend != "torch" else (None, None)
    c = planes[0].float().cpu() if planes is not None else _cost(a.cpu(), b.cpu(), "l1").float()
    _, plan, _ = log_sinkhorn(c, 0.1, 20)
    torch.testing.assert_close(plan.sum(0), torch.full((g,), 1.0 / g), rtol=0, atol=1e-5)  # last step: columns
    _, plan, iters = log_sinkhorn(c, 0.1, 1000, tol=1e-6)
    assert iters < 1000
    torch.testing.assert_close(plan.sum(0), torch.full((g,), 1.0 / g), rtol=0, atol=1e-5)
    torch.testing.assert_close(plan.sum(1), torch.full((g,), 1.0 / g), rtol=0, atol=1e-5)


def test_small_epsilon_approaches_emd():
    g = 6
    a, b = _logits(g, 40, torch.float64, device="cpu"), _logits(g, 40, torch.float64, device="cpu")
    c = _cost(a, b, "l1")
    w = torch.full((g,), 1.0 / g, dtype=torch.float64)
    emd = float(ot.emd2(w, w, c))
    errs = []
    for eps in (0.1, 1e-2, 1e-3):
        v = sinkhorn_distance(a, b, epsilon=eps, n_iters=5000, tol=1e-10, backend=F64_BACKENDS[0])
        assert math.isfinite(float(v))
        errs.append(abs(float(v) - emd))
    assert errs[2] < errs[0] and errs[2] < 5e-3, errs


# ----------------------------------------------------------------------------------------------
# The op vs SinKD's loss and vs the reference, every backend.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_sinkd_value_and_grad(backend):
    n, v, temperature = 9, 70, 2.0
    dt = torch.float32 if backend == "triton" else torch.float64
    a, b = _logits(n, v, dt).requires_grad_(), _logits(n, v, dt).requires_grad_()
    got = sinkhorn_distance(a, b, temperature=temperature, backend=backend)
    ga, gb = torch.autograd.grad(got, (a, b))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = _sinkd_loss(a64, b64, temperature) / n  # SinKD's marginals are 1, ours 1/G
    wa, wb = torch.autograd.grad(want, (a64, b64))
    tol = dict(rtol=1e-5, atol=1e-7) if dt == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got.double(), want, **tol)
    gtol = dict(rtol=1e-4, atol=1e-6) if dt == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga.double(), wa, **gtol)
    torch.testing.assert_close(gb.double(), wb, **gtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("group_size", [None, 4, 1])
def test_vs_reference_costs_groups(backend, cost, group_size):
    n, v = 10, 45  # 10 rows in groups of 4: 4 + 4 + 2
    a, b = _logits(n, v).requires_grad_(), _logits(n, v).requires_grad_()
    got = sinkhorn_distance(a, b, cost=cost, group_size=group_size, temperature=1.3, epsilon=0.05, backend=backend)
    ga, gb = torch.autograd.grad(got, (a, b))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = ref_sinkhorn(a64, b64, cost=cost, group_size=group_size, temperature=1.3, epsilon=0.05)
    wa, wb = torch.autograd.grad(want, (a64, b64))
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ga.double(), wa, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(gb.double(), wb, rtol=1e-4, atol=2e-6)
    if group_size is not None:  # mean over the independent groups
        parts = [ref_sinkhorn(a64[s:s + group_size], b64[s:s + group_size], cost=cost, temperature=1.3,
                              epsilon=0.05) for s in range(0, n, group_size)]
        torch.testing.assert_close(want, torch.stack(parts).mean())
    if group_size == 1:  # plan [[1]], value C_00
        c = torch.stack([_cost(a64[i:i + 1], b64[i:i + 1], cost, 1.3)[0, 0] for i in range(n)])
        torch.testing.assert_close(want, c.mean())


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("cost", COSTS)
def test_gradcheck_float64(backend, cost):
    a = _logits(5, 6, torch.float64, device="cpu").requires_grad_()
    b = _logits(5, 6, torch.float64, device="cpu").requires_grad_()
    fn = lambda x, y: sinkhorn_distance(x, y, cost=cost, group_size=3, epsilon=0.2, n_iters=5, temperature=1.5,  # noqa: E731
                                        backend=backend)
    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("cost", COSTS)
def test_symmetry_at_convergence(cost):
    a, b = _logits(6, 30, torch.float64, device="cpu"), _logits(6, 30, torch.float64, device="cpu")
    kw = dict(cost=cost, epsilon=0.1, n_iters=3000, tol=1e-12, backend=F64_BACKENDS[0])
    torch.testing.assert_close(sinkhorn_distance(a, b, **kw), sinkhorn_distance(b, a, **kw), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cost", COSTS)
def test_equal_distributions(backend, cost):
    a = _logits(6, 40).requires_grad_()
    b = a.detach().clone().requires_grad_()
    got = sinkhorn_distance(a, b, cost=cost, backend=backend)
    ga, gb = torch.autograd.grad(got, (a, b))
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    # only the entropic residue: off-diagonal mass exp(-C/eps) remains ...
    want = ref_sinkhorn(a.detach().double(), b.detach().double(), cost=cost)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    assert float(got.detach()) > 0
    # ... and vanishes with epsilon; a group of one row gives exactly 0
    small = sinkhorn_distance(a.detach(), b.detach(), cost=cost, epsilon=1e-3, n_iters=50, backend=backend)
    assert abs(float(small)) < 1e-6
    one = sinkhorn_distance(a.detach(), b.detach(), cost=cost, group_size=1, backend=backend)
    assert abs(float(one)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature(backend):
    a, b = _logits(5, 33), _logits(5, 33)
    t2 = sinkhorn_distance(a, b, temperature=2.0, backend=backend)
    torch.testing.assert_close(t2, sinkhorn_distance(a / 2, b / 2, backend=backend), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t2.double(), ref_sinkhorn(a.double(), b.double(), temperature=2.0), rtol=1e-5,
                               atol=1e-7)
    assert not torch.allclose(t2, sinkhorn_distance(a, b, backend=backend))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cost", ["l1", "hellinger"])
def test_dtypes(backend, dtype, cost):
    a, b = _logits(7, 50, dtype).requires_grad_(), _logits(7, 50, dtype).requires_grad_()
    got = sinkhorn_distance(a, b, cost=cost, group_size=4, backend=backend)
    ga, gb = torch.autograd.grad(got, (a, b))
    assert got.dtype == torch.float32 and ga.dtype == dtype and gb.dtype == dtype
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = ref_sinkhorn(a64, b64, cost=cost, group_size=4)
    wa, wb = torch.autograd.grad(want, (a64, b64))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    gtol = dict(rtol=1e-4, atol=2e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(ga.double(), wa, **gtol)
    torch.testing.assert_close(gb.double(), wb, **gtol)


def test_leading_dims_tol_and_small_epsilon():
    be = BACKENDS[0]
    a, b = _logits(12, 20).reshape(3, 4, 20), _logits(12, 20).reshape(3, 4, 20)
    torch.testing.assert_close(sinkhorn_distance(a, b, backend=be),
                               sinkhorn_distance(a.reshape(12, 20), b.reshape(12, 20), backend=be))
    conv = sinkhorn_distance(a, b, n_iters=2000, tol=1e-7, backend=be)
    torch.testing.assert_close(conv, sinkhorn_distance(a, b, n_iters=3000, backend=be), rtol=1e-5, atol=1e-6)
    x = a.reshape(12, 20).clone().requires_grad_()
    v = sinkhorn_distance(x, b.reshape(12, 20), epsilon=1e-3, n_iters=100, backend=be)
    (g,) = torch.autograd.grad(v, x)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    # a teacher without grad: only the student side is computed
    y = b.reshape(12, 20)
    (g2,) = torch.autograd.grad(sinkhorn_distance(x, y, backend=be), x)
    assert torch.isfinite(g2).all()
    # group_size larger than N: one group
    torch.testing.assert_close(sinkhorn_distance(a, b, group_size=100, backend=be), sinkhorn_distance(a, b, backend=be))


def test_custom_ops_opcheck_and_compile():
    a, b = _logits(6, 40).requires_grad_(), _logits(6, 40).requires_grad_()
    inv_temp = torch.tensor([0.5], dtype=torch.float64)
    for be in [x for x in BACKENDS if x != "torch"]:
        for kind in (0, 1, 2):
            torch.library.opcheck(torch.ops.onepass.sinkhorn_cost.default, (a, b, inv_temp, 4, kind, be))
    be = BACKENDS[0]
    fn = torch.compile(lambda x, y: sinkhorn_distance(x, y, group_size=4, backend=be), fullgraph=True)
    got = fn(a, b)
    ga, gb = torch.autograd.grad(got, (a, b))
    want = sinkhorn_distance(a, b, group_size=4, backend=be)
    wa, wb = torch.autograd.grad(want, (a, b))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ga, wa)
    torch.testing.assert_close(gb, wb)


def test_bad_inputs():
    a, b = _logits(4, 10), _logits(4, 10)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_distance(a, b, epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_distance(a, b, epsilon=-1.0)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_distance(a, b, n_iters=0)
    with pytest.raises(TypeError, match="n_iters"):
        sinkhorn_distance(a, b, n_iters=2.5)
    with pytest.raises(ValueError, match="vocab size"):
        sinkhorn_distance(a, _logits(4, 11))
    with pytest.raises(ValueError, match="same shape"):
        sinkhorn_distance(a, _logits(5, 10))
    with pytest.raises(ValueError, match="cost"):
        sinkhorn_distance(a, b, cost="l2")
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_distance(a, b, temperature=0.0)
    with pytest.raises(ValueError, match="group_size"):
        sinkhorn_distance(a, b, group_size=0)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn_distance(a, b, tol=-1.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        sinkhorn_distance(a, b.double())
    with pytest.raises(TypeError, match="student_logits"):
        sinkhorn_distance(a.long(), b)
    with pytest.raises(ValueError, match="student_logits"):
        sinkhorn_distance(a[0], b[0])
    with pytest.raises(ValueError, match="backend"):
        sinkhorn_distance(a, b, backend="nope")


# ----------------------------------------------------------------------------------------------
# The cpu backend's tiling: odd group sizes around the vector widths, several row blocks per group,
# several vocabulary slices (partial cost planes), vocab chunks with a tail, one side without grad.
# ----------------------------------------------------------------------------------------------
CPU_TILING = [(20, 20, 5003), (37, 37, 301), (150, 150, 300), (45, 16, 999), (33, 17, 2500)]  # (N, G, V)


@pytest.mark.skipif("cpu" not in F64_BACKENDS, reason="the compiled cpu backend is not built")
@pytest.mark.parametrize("n,g,v", CPU_TILING)
@pytest.mark.parametrize("need", ["both", "student", "teacher"])
def test_cpu_tiling_float64(n, g, v, need):
    a = _logits(n, v, torch.float64, device="cpu").requires_grad_(need in ("both", "student"))
    b = _logits(n, v, torch.float64, device="cpu").requires_grad_(need in ("both", "teacher"))
    kw = dict(group_size=g, temperature=1.7, epsilon=0.2, n_iters=6)
    got = sinkhorn_distance(a, b, backend="cpu", **kw)
    want = ref_sinkhorn(a, b, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    leaves = [x for x in (a, b) if x.requires_grad]
    for gg, ww in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(gg, ww, rtol=1e-8, atol=1e-13)


@pytest.mark.skipif("cpu" not in F64_BACKENDS, reason="the compiled cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_tiling_low_precision(dtype):
    n, g, v = 33, 17, 2500
    a, b = _logits(n, v, dtype, device="cpu").requires_grad_(), _logits(n, v, dtype, device="cpu").requires_grad_()
    kw = dict(group_size=g, temperature=1.7, epsilon=0.2, n_iters=6)
    got = sinkhorn_distance(a, b, backend="cpu", **kw)
    ga, gb = torch.autograd.grad(got, (a, b))
    assert got.dtype == torch.float32 and ga.dtype == dtype and gb.dtype == dtype
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = ref_sinkhorn(a64, b64, **kw)
    wa, wb = torch.autograd.grad(want, (a64, b64))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    scale = max(wa.abs().max(), wb.abs().max())  # dL/dz is ~p-sized: compare against the largest entry
    gtol = 2e-4 if dtype == torch.float32 else 1e-2
    assert (ga.double() - wa).abs().max() <= gtol * scale
    assert (gb.double() - wb).abs().max() <= gtol * scale


@pytest.mark.skipif("cpu" not in F64_BACKENDS, reason="the compiled cpu backend is not built")
def test_cpu_l1_planes_float64():
    """The cost kernel's three planes (C, A, B) against their definitions, with ties p = q in some rows."""
    n, g, v = 21, 10, 4500
    a = _logits(n, v, torch.float64, device="cpu")
    b = _logits(n, v, torch.float64, device="cpu")
    b[3] = a[3]  # exact ties (sign(0) = 0) on the diagonal of the first group
    planes, lse = torch.ops.onepass.sinkhorn_cost(a, b, torch.tensor([0.8], dtype=torch.float64), g, 0, "cpu")
    p, q = torch.softmax(a * 0.8, -1), torch.softmax(b * 0.8, -1)
    torch.testing.assert_close(lse, torch.stack([torch.logsumexp(a * 0.8, -1), torch.logsumexp(b * 0.8, -1)]))
    for s in range(0, n, g):
        ps, qs = p[s:s + g], q[s:s + g]
        m = ps.shape[0]
        d = ps[:, None, :] - qs[None, :, :]
        want = torch.stack([d.abs().sum(-1), (ps[:, None, :] * d.sign()).sum(-1), (qs[None, :, :] * (-d).sign()).sum(-1)])
        torch.testing.assert_close(planes[:, s:s + m, :m], want, rtol=1e-11, atol=1e-14)
        assert (planes[:, s:s + m, m:] == 0).all()
