"""The estimators and options of onepass.group_advantages beyond the kernel conventions (grpo_passk, opo, gpg,
remax; singleton, nan_rewards, rloo normalize, REINFORCE++ token whitening and variance) on every backend
available here, against the float64 oracle ``onepass.reference.advantage_variants`` (itself checked against
verl, TRL and OpenRLHF in test_advantage_variants_reference.py) and directly against verl's core_algos.

Tolerances: 1e-12 in float64 (the torch composition is float64; the kernels' float64 path is two-pass);
float32 2e-6 relative to max(1, |ref|) where the composition works on float32 kernel output (one float32
rounding of the group-centred reward, then float64) and 2e-5 for the float32 kernels themselves, as in
test_advantages.py.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from onepass._dispatch import available_backends  # noqa: E402
from onepass.advantages import group_advantages, reinforce_pp_returns  # noqa: E402
from onepass.reference import advantage_variants as av  # noqa: E402

from _peers import import_peer  # noqa: E402

BACKENDS = [b for b in ("triton", "cpu", "torch") if b in available_backends("cpu")]
F64 = torch.float64
RAGGED_SIZES = (5, 3, 1, 4, 2, 1, 7)      # odd sizes and two groups of one (23 members)
PASSK_SIZES = (5, 3, 4, 2, 7, 2)           # grpo_passk needs groups of >= 2 (23 members)


def _batch(seed, sizes=RAGGED_SIZES, T=7, dtype=F64):
    """Shuffled ragged group labels (arbitrary values), rewards with ties across groups, response lengths
    in [1, T] and a mask with a fully-masked row (the mask of the token whitening need not match the
    lengths of OPO)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(100, generator=g)[: len(sizes)] - 7
    ids = torch.repeat_interleave(labels, torch.tensor(sizes))
    B = ids.numel()
    ids = ids[torch.randperm(B, generator=g)]
    rewards = (torch.randint(0, 3, (B,), generator=g) + 0.25 * torch.randn(B, generator=g, dtype=F64)).to(dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[3] = False
    return ids, rewards, lengths, mask


def _close(out, want, dtype, tol32=2e-6, what=""):
    want = want.to(F64)
    assert out.dtype == (F64 if dtype == F64 else torch.float32), what
    assert out.shape == want.shape, what
    tol = 1e-12 if dtype == F64 else tol32
    err = ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max().item() if want.numel() else 0.0
    assert err <= tol, f"{what}: max relative error {err:.3g} > {tol:g}"


# (id, onepass keywords, the reference on (rewards, ids, lengths, mask, baselines), needs groups of >= 2)
CASES = [
    ("grpo-verl-group", dict(estimator="grpo", singleton="verl", eps=1e-6),
     lambda r, i, n, m, b: av.grpo(r, i, eps=1e-6, singleton="verl")),
    ("grpo-verl-batch", dict(estimator="grpo", scale="batch", singleton="verl", eps=1e-4),
     lambda r, i, n, m, b: av.grpo(r, i, eps=1e-4, scale="batch", singleton="verl")),
    ("dr_grpo-verl", dict(estimator="dr_grpo", singleton="verl"),
     lambda r, i, n, m, b: av.grpo(r, i, scale="none", singleton="verl")),
    ("rloo-verl", dict(estimator="rloo", singleton="verl"), lambda r, i, n, m, b: av.rloo(r, i, singleton="verl")),
    ("rloo-normalize", dict(estimator="rloo", normalize=True, eps=1e-4),
     lambda r, i, n, m, b: av.rloo(r, i, normalize=True, eps=1e-4)),
    ("opo", dict(estimator="opo"), lambda r, i, n, m, b: av.opo(r, i, n, singleton="zero")),
    ("opo-verl", dict(estimator="opo", singleton="verl"), lambda r, i, n, m, b: av.opo(r, i, n, singleton="verl")),
    ("gpg", dict(estimator="gpg"), lambda r, i, n, m, b: av.gpg(r, i, singleton="zero")),
    ("gpg-verl", dict(estimator="gpg", singleton="verl"), lambda r, i, n, m, b: av.gpg(r, i, singleton="verl")),
    ("remax", dict(estimator="remax"), lambda r, i, n, m, b: av.remax(r, b)),
    ("passk", dict(estimator="grpo_passk", eps=1e-6), lambda r, i, n, m, b: av.grpo_passk(r, i, eps=1e-6)),
    ("passk-none", dict(estimator="grpo_passk", scale="none"),
     lambda r, i, n, m, b: av.grpo_passk(r, i, norm_by_std=False)),
] + [
    (f"reinforce_pp-{whiten}-{variance}-{singleton}",
     dict(estimator="reinforce_pp", whiten=whiten, variance=variance, singleton=singleton),
     lambda r, i, n, m, b, w=whiten, v=variance, s=singleton: av.reinforce_pp_baseline(
         r, i, m if w == "token" else None, singleton=s, variance=v))
    for whiten in ("sample", "token") for variance in ("biased", "unbiased") for singleton in ("zero", "verl")
]


def _extras(kw, lengths, mask, baselines):
    """The tensor arguments the estimator of ``kw`` needs."""
    extra = {}
    if kw["estimator"] == "opo":
        extra["lengths"] = lengths
    if kw["estimator"] == "remax":
        extra["baselines"] = baselines
    if kw.get("whiten") == "token":
        extra["mask"] = mask
    return extra


def _uses_kernel_only(kw):
    """Kernel estimators with the kernel conventions: float32 accuracy of the float32 kernels."""
    return kw == dict(estimator="reinforce_pp", whiten="sample", variance="biased", singleton="zero")


def _cases(backend):
    """Every case on the C++ and torch backends; under the (slow) Triton interpreter the cases that run a
    kernel mode of its own under the composition (group std; centring, then token whitening)."""
    if backend != "triton":
        return list(enumerate(CASES))
    return [(k, c) for k, c in enumerate(CASES) if c[0] in ("grpo-verl-group", "reinforce_pp-token-unbiased-verl")]


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in BACKENDS for d in (F64, torch.float32)
                                           if b != "triton" or d == torch.float32] + [("cpu", torch.bfloat16)])
def test_against_reference(backend, dtype):
    for k, (name, kw, ref) in _cases(backend):
        ids, r, lengths, mask = _batch(k, PASSK_SIZES if kw["estimator"] == "grpo_passk" else RAGGED_SIZES,
                                       dtype=dtype)
        baselines = (r.double() + torch.randn(r.shape, dtype=F64)).to(dtype)
        want = ref(r.double(), ids, lengths, mask, baselines.double())  # on the rounded low-precision rewards
        tol32 = 2e-5 if _uses_kernel_only(kw) else 2e-6
        out = group_advantages(r, group_ids=ids, backend=backend, **kw, **_extras(kw, lengths, mask, baselines))
        _close(out, want, dtype, tol32, f"{name} ({backend}, {dtype})")
        if kw["estimator"] == "remax":
            assert torch.equal(group_advantages(r, backend=backend, **kw, baselines=baselines), out)
        if kw["estimator"] == "remax":
            continue
        # consecutive groups of 3 (perm-free segments)
        r_c, n_c, m_c, b_c = r[:21], lengths[:21], mask[:21], baselines[:21]
        want = ref(r_c.double(), torch.arange(21) // 3, n_c, m_c, b_c.double())
        out = group_advantages(r_c, group_size=3, backend=backend, **kw, **_extras(kw, n_c, m_c, b_c))
        _close(out, want, dtype, tol32, f"{name} consecutive ({backend}, {dtype})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_size_matches_group_ids(backend):
    g = torch.Generator().manual_seed(4)
    r = torch.randn(21, generator=g, dtype=F64)
    lengths = torch.randint(1, 6, (21,), generator=g)
    mask = torch.arange(6)[None, :] < lengths[:, None]
    ids = torch.arange(21) // 7
    for kw in (dict(estimator="opo", lengths=lengths), dict(estimator="gpg"), dict(estimator="grpo_passk"),
               dict(estimator="rloo", normalize=True), dict(estimator="reinforce_pp", whiten="token", mask=mask)):
        torch.testing.assert_close(group_advantages(r, group_size=7, backend=backend, **kw),
                                   group_advantages(r, group_ids=ids, backend=backend, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rewards_excluded(backend):
    for k, (name, kw, ref) in _cases(backend):
        passk = kw["estimator"] == "grpo_passk"
        ids, r, lengths, mask = _batch(10 + k, PASSK_SIZES if passk else RAGGED_SIZES)
        baselines = r + 1.0
        unscorable = torch.zeros_like(r, dtype=torch.bool)
        unscorable[[0, 4, 9]] = True
        if passk:  # keep >= 2 scorable members in every group
            unscorable &= torch.stack([(ids == i).sum() - ((ids == i) & unscorable).sum() >= 2 for i in ids])
        r = r.masked_fill(unscorable, math.nan)
        out = group_advantages(r, group_ids=ids, nan_rewards="exclude", backend=backend, **kw,
                               **_extras(kw, lengths, mask, baselines))
        keep = ~unscorable
        want = torch.zeros(out.shape, dtype=F64)
        want[keep] = ref(r[keep], ids[keep], lengths[keep], mask[keep], baselines[keep])
        _close(out, want, F64, what=f"{name} with NaN rewards ({backend})")
        assert (out[unscorable] == 0).all()
    # the references that take NaN rewards themselves (TRL's conventions): same result
    g = torch.Generator().manual_seed(3)
    r = torch.randn(20, generator=g, dtype=F64)
    r[[1, 5, 6, 7, 9]] = math.nan  # the group of positions 4..7 keeps one scorable reward
    for scale in ("group", "batch", "none"):
        _close(group_advantages(r, group_size=4, scale=scale, eps=1e-4, nan_rewards="exclude", backend=backend),
               av.grpo(r, torch.arange(20) // 4, eps=1e-4, scale=scale, nan_rewards="exclude"), F64, what=scale)
    for normalize in (False, True):
        _close(group_advantages(r, group_size=4, estimator="rloo", normalize=normalize, eps=1e-4,
                                nan_rewards="exclude", backend=backend),
               av.rloo(r, torch.arange(20) // 4, normalize=normalize, eps=1e-4, nan_rewards="exclude"), F64)
    out = group_advantages(torch.full((4,), math.nan), group_size=2, nan_rewards="exclude", backend=backend)
    assert torch.equal(out, torch.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_whitening_masks(backend):
    ids, r, lengths, mask = _batch(30)
    out = group_advantages(r, group_ids=ids, estimator="reinforce_pp", whiten="token", mask=mask, singleton="verl",
                           backend=backend)
    assert out.shape == mask.shape and (out[~mask] == 0).all() and (out[3] == 0).all()  # row 3 fully masked
    # whitened over the response tokens: their mean is 0 and their (biased) variance 1 (with
    # singleton="zero" the groups of one are set to 0 after the whitening)
    tokens = out[mask].double()
    assert abs(tokens.mean().item()) < 1e-6 and abs(tokens.var(unbiased=False).item() - 1) < 1e-5
    # every response token of a row holds the same value
    for b in range(r.numel()):
        assert torch.equal(out[b][mask[b]], out[b][mask[b]][:1].expand(int(mask[b].sum())))
    # float masks and bool masks agree
    torch.testing.assert_close(group_advantages(r, group_ids=ids, estimator="reinforce_pp", whiten="token",
                                                mask=mask.float(), singleton="verl", backend=backend), out,
                               rtol=0, atol=0)
    empty = group_advantages(torch.zeros(0), group_size=2, estimator="reinforce_pp", whiten="token",
                             mask=torch.ones(0, 5), backend=backend)
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_passk_ties_and_determinism(backend):
    r = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 5.0, 1.0])  # group 0: tie for the best -> all 0
    out = group_advantages(r, group_size=4, estimator="grpo_passk", backend=backend)
    assert torch.equal(out[:4], torch.zeros(4))
    assert out[6] > 0 and torch.equal(out[[4, 5, 7]], torch.zeros(3))
    ids, r, lengths, mask = _batch(5)
    for kw in (dict(estimator="opo", lengths=lengths), dict(estimator="rloo", normalize=True),
               dict(estimator="reinforce_pp", whiten="token", mask=mask, variance="unbiased", singleton="verl")):
        a = group_advantages(r.float(), group_ids=ids, backend=backend, **kw)
        assert torch.equal(a, group_advantages(r.float(), group_ids=ids, backend=backend, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_rewards_give_zero(backend):
    """Equal rewards in every group (0.1 is inexact: a naive mean would not cancel) give exactly 0, also with
    eps = 0, for the estimators that centre on a group baseline."""
    ids, _, lengths, mask = _batch(8, PASSK_SIZES)
    r = torch.full(ids.shape, 0.1, dtype=torch.float32)
    r[ids == ids[0]] = -2.7
    for kw in (dict(estimator="opo", lengths=lengths), dict(estimator="gpg"), dict(estimator="grpo_passk"),
               dict(estimator="rloo", normalize=True), dict(estimator="grpo", singleton="verl"),
               dict(estimator="reinforce_pp", whiten="token", mask=mask, variance="unbiased")):
        for eps in (1e-6, 0.0):
            out = group_advantages(r, group_ids=ids, eps=eps, backend=backend, **kw)
            assert torch.equal(out, torch.zeros_like(out)), (kw, eps, out)


def test_backends_agree():
    """The kernel estimators with the new options give the same results on every backend (the composition
    runs the same float64 torch code over each backend's kernel output)."""
    ids, r, lengths, mask = _batch(6, dtype=torch.float32)
    results = {}
    for backend in BACKENDS:
        results[backend] = [group_advantages(r, group_ids=ids, backend=backend, **kw) for kw in (
            dict(estimator="grpo", singleton="verl"), dict(estimator="rloo", normalize=True),
            dict(estimator="reinforce_pp", whiten="token", mask=mask, variance="unbiased"))]
    for backend in BACKENDS:
        for a, b in zip(results[backend], results["torch"]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# verl's core_algos, called directly (outcome reward on the last response token)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verl_core():
    from test_policy_variants_reference import _import_verl

    return import_peer("verl", ["ray"], _import_verl).core


def test_verl_estimators(verl_core):
    ids, r, lengths, _ = _batch(40)
    T = 7
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    token_rewards = torch.zeros(r.numel(), T, dtype=F64)
    token_rewards[torch.arange(r.numel()), lengths - 1] = r
    verl = dict(group_ids=ids, singleton="verl", backend="cpu")

    def check(ours, peer, what, tol=1e-12):
        ours = ours[:, None] * mask if ours.dim() == 1 else ours
        err = ((ours - peer).abs() / peer.abs().clamp_min(1.0)).max().item()
        assert err <= tol, f"verl {what}: {err:.3g}"

    peer, _ = verl_core.compute_grpo_outcome_advantage(token_rewards, mask, ids.numpy(), epsilon=1e-6)
    check(group_advantages(r, eps=1e-6, **verl), peer, "grpo", 1e-7)  # verl divides by float32(1) + eps
    peer, _ = verl_core.compute_rloo_outcome_advantage(token_rewards, mask, ids.numpy())
    check(group_advantages(r, estimator="rloo", **verl), peer, "rloo")
    peer, _ = verl_core.compute_opo_outcome_advantage(token_rewards, mask, ids.numpy())
    check(group_advantages(r, estimator="opo", lengths=lengths, **verl), peer, "opo")
    peer, _ = verl_core.compute_gpg_outcome_advantage(token_rewards.clone(), mask, ids.numpy())
    check(group_advantages(r, estimator="gpg", **verl), peer, "gpg")
    baselines = r + torch.randn(r.shape, dtype=F64)
    peer, _ = verl_core.compute_remax_outcome_advantage(token_rewards, baselines, mask)
    check(group_advantages(r, estimator="remax", baselines=baselines, backend="cpu"), peer, "remax")
    peer, _ = verl_core.compute_reinforce_plus_plus_baseline_outcome_advantage(token_rewards, mask, ids.numpy())
    check(group_advantages(r, estimator="reinforce_pp", whiten="token", mask=mask, variance="unbiased", **verl),
          peer, "reinforce_plus_plus_baseline", 1e-8)  # verl's masked means divide by count + 1e-8
    ids2, r2, lengths2, _ = _batch(41, PASSK_SIZES)
    mask2 = (torch.arange(T)[None, :] < lengths2[:, None]).to(F64)
    tr2 = torch.zeros(r2.numel(), T, dtype=F64)
    tr2[torch.arange(r2.numel()), lengths2 - 1] = r2
    for norm in (True, False):
        peer, _ = verl_core.compute_grpo_passk_outcome_advantage(tr2, mask2, ids2.numpy(),
                                                                 config={"norm_adv_by_std_in_grpo": norm})
        ours = group_advantages(r2, group_ids=ids2, estimator="grpo_passk", scale="group" if norm else "none",
                                backend="cpu")
        check(ours[:, None] * mask2, peer, f"grpo_passk norm={norm}")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_bad_arguments():
    ids, r, lengths, mask = _batch(50)
    cases = [
        (dict(estimator="remax"), ValueError, "needs baselines"),
        (dict(estimator="remax", baselines=r[:-1]), ValueError, "baselines must have shape"),
        (dict(estimator="remax", baselines=ids), TypeError, "baselines"),
        (dict(estimator="remax", baselines=r.masked_fill(r > 1, math.inf)), ValueError, "baselines must be finite"),
        (dict(estimator="grpo", baselines=r), ValueError, "baselines is only used"),
        (dict(estimator="opo"), ValueError, "needs lengths"),
        (dict(estimator="opo", lengths=lengths - 1), ValueError, "lengths must be finite and > 0"),
        (dict(estimator="opo", lengths=lengths[None]), ValueError, "lengths must have shape"),
        (dict(estimator="opo", lengths=lengths > 0), TypeError, "lengths must be a real non-bool"),
        (dict(estimator="grpo_passk"), ValueError, "at least 2 samples"),  # the ragged batch has groups of one
        (dict(estimator="grpo_passk", scale="batch"), ValueError, "scale"),
        (dict(estimator="reinforce_pp", whiten="token"), ValueError, "needs mask"),
        (dict(estimator="reinforce_pp", whiten="token", mask=mask[:, None]), ValueError, "mask must have shape"),
        (dict(estimator="reinforce_pp", whiten="token", mask=mask[:-1]), ValueError, "mask must have shape"),
        (dict(estimator="reinforce_pp", whiten="token", mask=mask * 0.5), ValueError, "mask must hold 0/1"),
        (dict(estimator="reinforce_pp", whiten="token", mask=torch.zeros_like(mask)), ValueError, "response tokens"),
        (dict(estimator="reinforce_pp", mask=mask), ValueError, "mask is only used"),
        (dict(estimator="grpo", whiten="token", mask=mask), ValueError, "whiten and variance"),
        (dict(estimator="gpg", variance="unbiased"), ValueError, "whiten and variance"),
        (dict(estimator="reinforce_pp", whiten="tokens"), ValueError, "whiten must be one of"),
        (dict(estimator="reinforce_pp", variance="population"), ValueError, "variance must be one of"),
        (dict(estimator="grpo", normalize=True), ValueError, "normalize=True applies to estimator='rloo'"),
        (dict(estimator="rloo", normalize=1), TypeError, "normalize"),
        (dict(estimator="rloo", normalize=True, singleton="verl"), ValueError, "singleton='verl'"),
        (dict(singleton="nan"), ValueError, "singleton must be one of"),
        (dict(nan_rewards="drop"), ValueError, "nan_rewards must be one of"),
        (dict(estimator="reinforce_plus_plus"), ValueError, "estimator must be one of"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            group_advantages(r, group_ids=ids, **kw)
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(r[:22], group_size=1, estimator="grpo_passk")
    with pytest.raises(ValueError, match="at least 2 samples"):  # one scorable reward left to whiten
        group_advantages(torch.tensor([math.nan, math.nan, 1.0, math.nan]), group_size=2, estimator="reinforce_pp",
                         whiten="sample", variance="unbiased", nan_rewards="exclude")
    with pytest.raises(ValueError, match="rewards must be finite.*exclude"):
        group_advantages(r.masked_fill(r > 1, math.nan), group_ids=ids)
    with pytest.raises(ValueError, match="rewards must be finite"):
        group_advantages(r.masked_fill(r > 1, math.inf), group_ids=ids, nan_rewards="exclude")
    with pytest.raises(ValueError, match="exactly one of group_size"):
        group_advantages(r, estimator="opo", lengths=lengths)


# ------------------------------------------------------------------------------------------------
# REINFORCE++ without group baseline: whitened discounted returns of token rewards
# ------------------------------------------------------------------------------------------------
def _token_rewards(seed, dtype=F64):
    ids, r, lengths, mask = _batch(seed)
    g = torch.Generator().manual_seed(seed)
    mask[5, 1] = False  # a hole inside a response: the discount skips it
    dense = torch.zeros(mask.shape, dtype=F64)
    dense[torch.arange(r.numel()), lengths - 1] = r
    dense = (dense + 0.1 * torch.randn(mask.shape, generator=g, dtype=F64)).to(dtype)  # KL-shaped token rewards
    return dense, mask


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_reinforce_pp_returns_against_reference(dtype):
    dense, mask = _token_rewards(60, dtype)
    for gamma in (1.0, 0.9, 0.0):
        for variance in ("unbiased", "biased"):
            out = reinforce_pp_returns(dense, mask, gamma=gamma, variance=variance)
            want = av.token_whiten(av.returns_to_go(dense.double(), mask, gamma), mask, variance=variance)
            _close(out, want, dtype, 1e-6, f"gamma={gamma}, {variance}")
            assert (out[~mask] == 0).all() and (out[3] == 0).all()
    torch.testing.assert_close(reinforce_pp_returns(dense, mask.to(torch.int32)), reinforce_pp_returns(dense, mask),
                               rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_against_verl(verl_core, gamma):
    import types

    dense, mask = _token_rewards(61)
    peer, _ = verl_core.compute_reinforce_plus_plus_outcome_advantage(dense, mask.to(F64),
                                                                     config=types.SimpleNamespace(gamma=gamma))
    err = ((reinforce_pp_returns(dense, mask, gamma=gamma) - peer).abs() / peer.abs().clamp_min(1.0)).max().item()
    assert err <= 1e-8, err  # verl's masked means divide by count + 1e-8


def test_reinforce_pp_returns_bad_arguments():
    dense, mask = _token_rewards(62)
    cases = [
        ((dense[0], mask[0]), {}, ValueError, "token_rewards must be"),
        ((dense.long(), mask), {}, TypeError, "token_rewards"),
        ((dense, mask[:, :-1]), {}, ValueError, "mask has shape"),
        ((dense, mask.tolist()), {}, TypeError, "mask"),
        ((dense, mask * 2), {}, ValueError, "mask must hold 0/1"),
        ((dense, torch.zeros_like(mask)), {}, ValueError, "response tokens"),
        ((dense, mask), dict(gamma=1.5), ValueError, "gamma"),
        ((dense, mask), dict(variance="sample"), ValueError, "variance"),
        ((dense.masked_fill(mask, math.nan), mask), {}, ValueError, "token_rewards must be finite"),
    ]
    for args, kw, error, match in cases:
        with pytest.raises(error, match=match):
            reinforce_pp_returns(*args, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_backends(backend):
    assert backend in available_backends("cuda"), f"backend {backend} must run on CUDA tensors on a GPU machine"
    for k, (name, kw, ref) in enumerate(CASES):
        ids, r, lengths, mask = _batch(70 + k, PASSK_SIZES if kw["estimator"] == "grpo_passk" else RAGGED_SIZES,
                                       dtype=torch.float32)
        baselines = r + 1.0
        if kw["estimator"] != "grpo_passk":
            r[[2, 11]] = math.nan
        keep = ~torch.isnan(r)
        want = torch.zeros(mask.shape if kw.get("whiten") == "token" else r.shape, dtype=F64)
        want[keep] = ref(r[keep].double(), ids[keep], lengths[keep], mask[keep], baselines[keep].double())
        extras = {arg: t.cuda() for arg, t in _extras(kw, lengths, mask, baselines).items()}
        out = group_advantages(r.cuda(), group_ids=ids.cuda(), nan_rewards="exclude", backend=backend, **kw, **extras)
        again = group_advantages(r.cuda(), group_ids=ids.cuda(), nan_rewards="exclude", backend=backend, **kw,
                                 **extras)
        assert torch.equal(out, again), name  # deterministic
        _close(out.cpu(), want, torch.float32, 2e-5, f"{name} ({backend}, cuda)")
    dense, mask = _token_rewards(71)
    out = reinforce_pp_returns(dense.cuda(), mask.cuda(), gamma=0.9)
    _close(out.cpu(), av.token_whiten(av.returns_to_go(dense, mask, 0.9), mask), F64, what="reinforce_pp_returns cuda")
