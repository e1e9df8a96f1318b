"""Tests of onepass.group_advantages: every backend available here against plain re-statements of the
formulas (written below) and against onepass.reference.advantages."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from onepass._dispatch import available_backends  # noqa: E402
from onepass._ops.advantages import _group_advantages_op  # noqa: E402
from onepass.advantages import group_advantages  # noqa: E402
from onepass.reference.advantages import group_advantages as reference  # noqa: E402

BACKENDS = [b for b in ("triton", "cpu", "torch") if b in available_backends("cpu")]
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
SCALES = ("group", "batch", "none")
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-10}


# ------------------------------------------------------------------------------------------------
# Plain re-statements of the formulas (Python floats, one group at a time).
# ------------------------------------------------------------------------------------------------
def _formula(rewards, ids, estimator, scale="group", eps=1e-6):
    r = [float(v) for v in rewards.double().tolist()]
    ids = [int(v) for v in ids.tolist()]
    B = len(r)
    groups = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    overall_mean = sum(r) / B
    batch_std = math.sqrt(sum((v - overall_mean) ** 2 for v in r) / (B - 1)) if B > 1 else 0.0
    adv = [0.0] * B
    for members in groups.values():
        n = len(members)
        if n == 1:
            continue  # a group of one gets 0
        vals = [r[i] for i in members]
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))  # unbiased
        for i in members:
            if estimator == "grpo":
                if scale == "group":
                    adv[i] = (r[i] - mean) / (std + eps)
                elif scale == "batch":
                    adv[i] = (r[i] - mean) / (batch_std + eps)
                else:
                    adv[i] = r[i] - mean
            elif estimator == "dr_grpo" or estimator == "reinforce_pp":
                adv[i] = r[i] - mean
            elif estimator == "rloo":
                adv[i] = r[i] - (sum(vals) - r[i]) / (n - 1)  # minus the mean of the others
    if estimator == "reinforce_pp":
        mu = sum(adv) / B
        var = sum((a - mu) ** 2 for a in adv) / B  # biased, as OpenRLHF
        rstd = 1.0 / math.sqrt(max(var, 1e-8))
        sizes = {g: len(m) for g, m in groups.items()}
        adv = [(a - mu) * rstd if sizes[ids[i]] > 1 else 0.0 for i, a in enumerate(adv)]
    return torch.tensor(adv, dtype=torch.float64)


def _ragged_ids(B, gen, max_groups=None):
    """Shuffled ragged labels with arbitrary (non-contiguous, negative) values and some singletons."""
    num = max(1, B // 5) if max_groups is None else max_groups
    labels = torch.randint(-3, 3 * num, (num,), generator=gen).unique()
    ids = labels[torch.randint(0, labels.numel(), (B,), generator=gen)]
    return ids[torch.randperm(B, generator=gen)]


def _rewards(B, dtype, gen):
    return (torch.randn(B, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
def test_consecutive_and_ragged(backend, estimator, scale):
    gen = torch.Generator().manual_seed(hash((estimator, scale)) % 1000)
    r = _rewards(48, torch.float32, gen)
    # consecutive groups
    out = group_advantages(r, group_size=6, estimator=estimator, scale=scale, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (48,)
    ids = torch.arange(48) // 6
    want = _formula(r, ids, estimator, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, reference(r, group_size=6, estimator=estimator, scale=scale),
                               atol=2e-5, rtol=2e-5)
    # ragged, shuffled group ids (with singletons)
    ids = _ragged_ids(48, gen)
    out = group_advantages(r, group_ids=ids, estimator=estimator, scale=scale, backend=backend)
    want = _formula(r, ids, estimator, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, reference(r, group_ids=ids, estimator=estimator, scale=scale),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
def test_reference_matches_formulas(estimator, scale):
    gen = torch.Generator().manual_seed(7)
    r = _rewards(40, torch.float64, gen)
    ids = _ragged_ids(40, gen)
    torch.testing.assert_close(reference(r, group_ids=ids, estimator=estimator, scale=scale),
                               _formula(r, ids, estimator, scale), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(reference(r, group_size=5, estimator=estimator, scale=scale),
                               _formula(r, torch.arange(40) // 5, estimator, scale), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_dtypes(backend, dtype, estimator):
    gen = torch.Generator().manual_seed(3)
    r = _rewards(36, dtype, gen)
    ids = _ragged_ids(36, gen)
    out = group_advantages(r, group_ids=ids, estimator=estimator, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = _formula(r, ids, estimator)  # the formula on the (already rounded) low-precision values
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 7, 1000, 4097])
def test_sizes(backend, B):
    gen = torch.Generator().manual_seed(B)
    r = _rewards(B, torch.float32, gen)
    ids = _ragged_ids(B, gen)
    for estimator, scale in (("grpo", "group"), ("grpo", "batch"), ("rloo", "group"), ("reinforce_pp", "group")):
        out = group_advantages(r, group_ids=ids, estimator=estimator, scale=scale, backend=backend)
        want = reference(r.double(), group_ids=ids, estimator=estimator, scale=scale)
        torch.testing.assert_close(out.double(), want, atol=5e-5, rtol=5e-5)
    out = group_advantages(r, group_size=B, backend=backend)  # one group of B (B odd)
    torch.testing.assert_close(out.double(), reference(r.double(), group_size=B), atol=5e-5, rtol=5e-5)
    if B == 1:
        assert out.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_groups(backend):
    # groups longer than one tile / warp: 3 groups of 700, 1 of 513, singletons
    gen = torch.Generator().manual_seed(11)
    ids = torch.cat([torch.full((700,), g) for g in range(3)] + [torch.full((513,), 9), torch.tensor([20, 21])])
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    r = _rewards(ids.numel(), torch.float32, gen)
    for estimator in ESTIMATORS:
        out = group_advantages(r, group_ids=ids, estimator=estimator, backend=backend)
        torch.testing.assert_close(out.double(), _formula(r, ids, estimator), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
def test_groups_of_one(backend, estimator, scale):
    r = torch.tensor([1.0, -2.0, 3.5, 0.25, 7.0])
    out = group_advantages(r, group_size=1, estimator=estimator, scale=scale, backend=backend)
    assert torch.equal(out, torch.zeros(5))
    ids = torch.tensor([4, 1, 4, 2, 3])  # two singletons-free members of group 4, three singletons
    out = group_advantages(r, group_ids=ids, estimator=estimator, scale=scale, backend=backend)
    assert torch.isfinite(out).all()
    assert out[1] == 0 and out[3] == 0 and out[4] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_equal_rewards(backend, estimator, scale, dtype):
    r = torch.full((12,), 0.1, dtype=dtype)  # 0.1 is inexact: a naive mean would not cancel
    for eps in (1e-6, 0.0):
        out = group_advantages(r, group_size=4, estimator=estimator, scale=scale, eps=eps, backend=backend)
        assert torch.equal(out, torch.zeros(12)), out
        ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
        out = group_advantages(r, group_ids=ids, estimator=estimator, scale=scale, eps=eps, backend=backend)
        assert torch.equal(out, torch.zeros(12)), out
    # equal within each group, different across groups
    r = torch.tensor([1.0] * 4 + [3.0] * 4 + [-2.5] * 4, dtype=dtype)
    out = group_advantages(r, group_size=4, estimator=estimator, scale=scale, backend=backend)
    assert torch.equal(out, torch.zeros(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(5)
    r = _rewards(1000, torch.float32, gen)
    ids = _ragged_ids(1000, gen)
    for estimator in ESTIMATORS:
        a = group_advantages(r, group_ids=ids, estimator=estimator, backend=backend)
        b = group_advantages(r, group_ids=ids, estimator=estimator, backend=backend)
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_empty(backend):
    r = torch.randn(8, requires_grad=True)
    out = group_advantages(r, group_size=4, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    out = group_advantages(torch.zeros(0), group_size=4, backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out = group_advantages(torch.zeros(0), group_ids=torch.zeros(0, dtype=torch.int64), backend=backend)
    assert out.shape == (0,)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_rewards(backend):
    r = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r, group_size=2, backend=backend)
    r = torch.tensor([1.0, 0.0, float("inf"), 2.0])
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r, group_ids=torch.tensor([0, 0, 1, 1]), backend=backend)


def test_bad_arguments():
    r = torch.randn(8)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        group_advantages(r)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        group_advantages(r, group_size=4, group_ids=torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        group_advantages(torch.randn(10), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, group_size=0)
    with pytest.raises(TypeError, match="group_size"):
        group_advantages(r, group_size=2.0)
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(r, group_ids=torch.zeros(7, dtype=torch.int64))
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(r, group_ids=torch.zeros(8))
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(r, group_ids=[0] * 8)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.randn(2, 4), group_size=4)
    with pytest.raises(TypeError, match="rewards"):
        group_advantages(torch.arange(8), group_size=4)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(r, group_size=4, estimator="ppo")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, group_size=4, scale="token")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(r, group_size=4, eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        group_advantages(r, group_size=4, backend="numpy")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            group_advantages(r, group_size=4, backend="cuda")


# ------------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(1)
    r = _rewards(24, torch.float32, gen)
    ids = _ragged_ids(24, gen)
    defaults = ("zero", "raise", False, None, None, None, "sample", "biased", backend)
    torch.library.opcheck(_group_advantages_op, (r, ids, 0, "grpo", "group", 1e-6) + defaults)
    torch.library.opcheck(_group_advantages_op, (r, None, 4, "reinforce_pp", "group", 1e-6) + defaults)
    torch.library.opcheck(_group_advantages_op, (r.double(), None, 6, "rloo", "group", 1e-6) + defaults)
    mask = torch.rand(24, 5, generator=gen) > 0.3
    torch.library.opcheck(_group_advantages_op, (r, ids, 0, "reinforce_pp", "group", 1e-6, "verl", "raise", False,
                                                 None, None, mask, "token", "unbiased", backend))
    lengths = torch.randint(1, 9, (24,), generator=gen)
    torch.library.opcheck(_group_advantages_op, (r, None, 4, "opo", "group", 1e-6, "zero", "exclude", False,
                                                 None, lengths, None, "sample", "biased", backend))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(2)
    r = _rewards(32, torch.float32, gen)
    ids = _ragged_ids(32, gen)

    lengths = torch.randint(1, 9, (32,), generator=gen)

    def f(rewards, group_ids):
        a = group_advantages(rewards, group_size=4)
        b = group_advantages(rewards, group_ids=group_ids, estimator="rloo")
        c = group_advantages(rewards, group_ids=group_ids, estimator="opo", lengths=lengths, singleton="verl")
        return a * 2.0 + b + c

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(r, ids), f(r, ids))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_backends(backend, dtype):
    assert backend in available_backends("cuda"), f"backend {backend} must run on CUDA tensors on a GPU machine"
    gen = torch.Generator().manual_seed(13)
    for B in (1, 7, 1000, 4097):
        r = _rewards(B, dtype, gen)
        ids = _ragged_ids(B, gen)
        for estimator in ESTIMATORS:
            for scale in SCALES:
                want = reference(r.double(), group_ids=ids, estimator=estimator, scale=scale)
                out = group_advantages(r.cuda(), group_ids=ids.cuda(), estimator=estimator, scale=scale,
                                       backend=backend)
                again = group_advantages(r.cuda(), group_ids=ids.cuda(), estimator=estimator, scale=scale,
                                         backend=backend)
                assert torch.equal(out, again)  # deterministic
                tol = TOL[dtype]
                torch.testing.assert_close(out.cpu().double(), want, atol=5 * tol, rtol=5 * tol)
        out = group_advantages(r.cuda(), group_size=1, backend=backend)
        assert torch.equal(out.cpu(), torch.zeros(B, dtype=out.dtype))
