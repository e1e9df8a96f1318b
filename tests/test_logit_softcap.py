"""Logit soft-cap and logit scale inside the vocabulary ops: z = c·tanh(s·ℓ/c) / T (s·ℓ / T without a cap),
per model, on every backend, against the float64 reference ``onepass.reference`` (materialized logits).

Tolerances (as the existing tests state them): fp64 1e-10; fp32 2e-5 (values) / 5e-5 (gradients);
fp16/bf16 inputs 2e-3 / 8e-3 on the values and gradients rounded to the input dtype.
"""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass import reference as ref
from onepass._contract import LogitMap
from onepass._dispatch import launcher

from _helpers import backend_cases

BACKENDS = backend_cases(("cpu", "torch", "triton"))
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5), torch.bfloat16: (8e-3, 8e-3),
       torch.float16: (2e-3, 4e-3)}
# (student cap, student scale, teacher cap, teacher scale, temperature): capped with a scale and a temperature,
# both capped, one capped, scale only.
MAPS = [(4.0, 1.3, None, 1.0, 0.7), (2.5, 1.0, 6.0, 0.8, 1.2), (None, 1.0, 3.0, 1.0, 1.0),
        (None, 0.6, None, 1.7, 0.9)]


def _small(backend, device):
    """Shapes: odd, and tiny where the Triton interpreter runs."""
    return (5, 37) if backend == "triton" and device == "cpu" else (6, 301)


def _logits(n, v, dtype, device, seed, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * spread).to(dtype).to(device)


def _targets(n, v, device, seed):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, v, (n,), generator=g)
    t[1] = -100
    return t.to(device)


def _close(got, want, tol, msg):
    """|got − want| ≤ tol·(1 + |want|) elementwise, and ≤ tol·max|want| (chi2 reaches 1e11 on these inputs)."""
    got, want = got.double().cpu(), want.double().cpu()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=msg)


def _grads(fn, *leaves):
    """Values of fn(*leaves) and the gradients of Σ w·value (fixed random weights w per output)."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(99)
    total = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(total, leaves)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cap,scale,_cap_b,_scale_b,temperature", MAPS[:2] + MAPS[3:])
def test_token_logprobs_matches_reference(backend, device, cap, scale, _cap_b, _scale_b, temperature):
    n, v = _small(backend, device)
    dtypes = [torch.float32] + ([torch.float64, torch.bfloat16, torch.float16] if backend == "cpu" else [])
    for dtype in dtypes:
        x, t = _logits(n, v, dtype, device, seed=1), _targets(n, v, device, seed=1)
        kw = dict(temperature=temperature, logit_softcap=cap, logit_scale=scale, return_entropy=True)
        got, got_g = _grads(lambda z: onepass.token_logprobs(z, t, backend=backend, **kw), x)
        want, want_g = _grads(lambda z: ref.token_logprobs(z, t.cpu(), **kw), x.detach().cpu().double())
        vtol, gtol = TOL[dtype]
        for name, a, b in zip(("logp", "entropy"), got, want):
            _close(a, b, max(vtol, 1e-10 if dtype == torch.float64 else 2e-5), f"{name} {dtype}")
        _close(got_g[0], want_g[0], gtol, f"grad {dtype}")
        assert torch.all(got_g[0][1] == 0), "an ignored row gets no gradient"


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "chi2", "alpha"])
@pytest.mark.parametrize("cap,scale,cap_b,scale_b,temperature", MAPS)
def test_divergence_every_kind_cpu(kind, cap, scale, cap_b, scale_b, temperature):
    a, b = _logits(7, 211, torch.float32, "cpu", seed=2), _logits(7, 211, torch.float32, "cpu", seed=3)
    t = _targets(7, 211, "cpu", seed=2)
    kw = dict(kind=kind, beta=0.3, alpha=0.7, temperature=temperature, targets=t, logit_softcap=cap, logit_scale=scale,
              teacher_logit_softcap=cap_b, teacher_logit_scale=scale_b)
    got, got_g = _grads(lambda x, y: onepass.divergence(x, y, backend="cpu", **kw), a, b)
    want, want_g = _grads(lambda x, y: ref.divergence(x, y, **kw), a.double(), b.double())
    _close(got[0], want[0], 2e-5, f"{kind} value")
    _close(got_g[0], want_g[0], 5e-5, f"{kind} grad student")
    _close(got_g[1], want_g[1], 5e-5, f"{kind} grad teacher")


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "cpu"])
@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_divergence_other_backends(backend, device, kind):
    n, v = _small(backend, device)
    cap, scale, cap_b, scale_b, temperature = MAPS[1]
    a, b = _logits(n, v, torch.float32, device, seed=4), _logits(n, v, torch.float32, device, seed=5)
    kw = dict(kind=kind, beta=0.4, temperature=temperature, logit_softcap=cap, logit_scale=scale,
              teacher_logit_softcap=cap_b, teacher_logit_scale=scale_b)
    got, got_g = _grads(lambda x, y: onepass.divergence(x, y, backend=backend, **kw), a, b)
    want, want_g = _grads(lambda x, y: ref.divergence(x, y, **kw), a.cpu().double(), b.cpu().double())
    _close(got[0], want[0], 2e-5, "value")
    _close(got_g[0], want_g[0], 5e-5, "grad student")
    _close(got_g[1], want_g[1], 5e-5, "grad teacher")


def _head(n, d, v, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 3.0 / d ** 0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    return h.to(dtype), w.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_linear_ops_match_reference(backend, device):
    """linear_token_logprobs, linear_divergence and linear_policy_ref_stats with per-model caps and scales."""
    small = backend == "triton" and device == "cpu"
    n, d, v = (6, 16, 40) if small else (9, 24, 173)
    h, w, bias = (x.to(device) for x in _head(n, d, v, seed=6))
    hb, wb, bias_b = (x.to(device) for x in _head(n, d + 3, v, seed=7))
    t = _targets(n, v, device, seed=6)
    cap, scale, cap_b, scale_b, temperature = MAPS[0]
    one = dict(temperature=temperature, logit_softcap=cap, logit_scale=scale)
    got, got_g = _grads(lambda *x: onepass.linear_token_logprobs(x[0], x[1], t, bias=x[2], return_entropy=True,
                                                                 backend=backend, **one), h, w, bias)
    want, want_g = _grads(lambda *x: ref.linear_token_logprobs(x[0], x[1], t.cpu(), bias=x[2], return_entropy=True,
                                                               **one), h.cpu().double(), w.cpu().double(),
                          bias.cpu().double())
    for a, b in zip(got + got_g, want + want_g):
        _close(a, b, 5e-5, "linear_token_logprobs")
    two = dict(one, teacher_logit_softcap=cap_b, teacher_logit_scale=scale_b, kind="jsd", beta=0.3)
    got, got_g = _grads(lambda *x: onepass.linear_divergence(x[0], x[1], x[2], x[3], backend=backend, **two),
                        h, w, hb, wb)
    want, want_g = _grads(lambda *x: ref.linear_divergence(*x, **two), *(y.cpu().double() for y in (h, w, hb, wb)))
    for a, b in zip(got + got_g, want + want_g):
        _close(a, b, 5e-5, "linear_divergence")
    pr = dict(one, ref_logit_softcap=cap_b, ref_logit_scale=scale_b)
    got = onepass.linear_policy_ref_stats(h, w, hb, wb, t, bias=bias, backend=backend, **pr)
    want = ref.linear_policy_ref_stats(h.cpu().double(), w.cpu().double(), hb.cpu().double(), wb.cpu().double(),
                                       t.cpu(), bias=bias.cpu().double(), **pr)
    for key in want:
        _close(got[key], want[key], 5e-5, f"linear_policy_ref_stats {key}")


def test_gradcheck_float64_cpu():
    """Analytic vs numerical gradients of the CPU kernels through the soft-cap (one and two models)."""
    g = torch.Generator().manual_seed(8)
    a = (torch.randn(3, 17, generator=g, dtype=torch.float64) * 3).requires_grad_()
    b = (torch.randn(3, 17, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.tensor([4, -100, 16])
    assert torch.autograd.gradcheck(
        lambda x: onepass.token_logprobs(x, t, temperature=0.8, logit_softcap=2.0, logit_scale=1.4,
                                         return_entropy=True, backend="cpu"), (a,))
    for kind in ("reverse_kl", "hellinger"):
        assert torch.autograd.gradcheck(
            lambda x, y: onepass.divergence(x, y, kind=kind, temperature=1.3, logit_softcap=3.0,
                                            teacher_logit_softcap=1.5, teacher_logit_scale=0.7, backend="cpu"), (a, b))
    h, w, bias = (x.requires_grad_() for x in _head(4, 5, 11, seed=9, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda *x: onepass.linear_token_logprobs(x[0], x[1], torch.tensor([1, 2, -100, 10]), bias=x[2],
                                                 logit_softcap=1.5, logit_scale=2.0, backend="cpu"), (h, w, bias))


def test_cap_none_is_the_uncapped_kernel_bit_for_bit():
    """Without a cap (scale 1) the ops launch exactly today's kernel: the map is (1/T, 0), so the results
    equal a direct launch with inv_temp = 1/T, bit for bit, and differ from a capped run."""
    x, t = _logits(5, 300, torch.float32, "cpu", seed=10), _targets(5, 300, "cpu", seed=10)
    got = onepass.token_logprobs(x, t, temperature=0.7, logit_softcap=None, return_entropy=True, backend="cpu")
    stats = launcher("vocab_stats", "cpu").vocab_stats_fwd(x, None, torch.where(t < 0, -1, t), LogitMap(1 / 0.7, 0.0),
                                                           0, 0.0, 0.0, True)
    assert torch.equal(got[0], stats[:, 2]) and torch.equal(got[1], stats[:, 4])
    assert torch.equal(got[0], onepass.token_logprobs(x, t, temperature=0.7, backend="cpu"))
    capped = onepass.token_logprobs(x, t, temperature=0.7, logit_softcap=5.0, backend="cpu")
    assert not torch.allclose(capped, got[0])
    # a cap far above every logit is the identity up to rounding
    huge = onepass.token_logprobs(x, t, temperature=0.7, logit_softcap=1e6, backend="cpu")
    torch.testing.assert_close(huge, got[0], rtol=1e-5, atol=1e-5)


def _loss_inputs(seed=11, b=3, t=5, d=12, v=57):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 3.0 / d ** 0.5
    ht = torch.randn(b, t, d + 4, generator=g, dtype=torch.float64)
    wt = torch.randn(v, d + 4, generator=g, dtype=torch.float64) * 3.0 / d ** 0.5
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    mask[2, :1] = 0
    return h, w, ht, wt, targets, mask


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_grpo_loss_with_cap(backend):
    """grpo_loss = the policy loss of reference log-probs of the capped/scaled heads (values and d hidden,
    d weight), the reference KL from the reference head with its own cap."""
    h, w, hr, wr, targets, mask = _loss_inputs()
    g = torch.Generator().manual_seed(12)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.1 - 2.0
    caps = dict(logit_softcap=2.0, logit_scale=1.2, temperature=0.9)
    kw = dict(mask=mask, old_logp=old, beta=0.05, kl_estimator="k3", entropy_coef=0.01)

    def fused(hh, ww):
        return onepass.grpo_loss(hh, ww, targets, adv, ref_hidden=hr, ref_weight=wr, ref_logit_softcap=3.0,
                                 ref_logit_scale=0.8, backend=backend, **caps, **kw)[0]

    def composed(hh, ww):
        safe = torch.where(mask != 0, targets, -100)
        logp, ent = ref.linear_token_logprobs(hh, ww, safe, return_entropy=True, **caps)
        ref_logp = ref.linear_token_logprobs(hr, wr, safe, temperature=0.9, logit_softcap=3.0, logit_scale=0.8)
        return onepass.policy_loss(logp, adv, mask=mask, old_logp=old, kl=onepass.kl_penalty(logp, ref_logp),
                                   entropy=ent, beta=0.05, entropy_coef=0.01)[0]

    got, got_g = _grads(fused, h, w)
    want, want_g = _grads(composed, h, w)
    for a, b in zip(got + got_g, want + want_g):
        _close(a, b, 1e-10, "grpo_loss")


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tv"])
def test_opd_loss_with_cap_and_without_targets(divergence):
    """opd_loss with per-model caps = the masked token-mean of the reference divergence; ``targets=None`` gives
    the same loss and gradients for a full-vocabulary divergence."""
    h, w, ht, wt, targets, mask = _loss_inputs(seed=13)
    caps = dict(logit_softcap=2.5, logit_scale=1.1, teacher_logit_softcap=4.0, teacher_logit_scale=0.9,
                temperature=1.1)

    def fused(tg):
        return lambda hh, ww: onepass.opd_loss(hh, ww, ht, wt, tg, mask=mask, divergence=divergence, beta=0.4,
                                               backend="cpu", **caps)[0]

    def composed(hh, ww):
        d = ref.linear_divergence(hh, ww, ht, wt, kind=divergence, beta=0.4, **caps)
        return (d * mask).sum() / mask.sum()

    want, want_g = _grads(composed, h, w)
    for tg in (targets, None):
        got, got_g = _grads(fused(tg), h, w)
        for a, b in zip(got + got_g, want + want_g):
            # the aggregation weights are float32 (losses.aggregation_weights): ~1e-8 relative in float64
            _close(a, b, 1e-6, f"opd_loss targets={'none' if tg is None else 'given'}")
    _, metrics = onepass.opd_loss(h, w, ht, wt, mask=mask, divergence=divergence, backend="cpu")
    assert "student_logp" not in metrics and "divergence" in metrics
    with pytest.raises(ValueError, match="sampled_reverse_kl needs targets|targets=None"):
        onepass.opd_loss(h, w, ht, wt, None, mask=mask, divergence="sampled_reverse_kl")


BAD = [(0.0, "logit_softcap"), (-1.0, "logit_softcap"), (float("nan"), "logit_softcap"),
       (float("inf"), "logit_softcap")]


@pytest.mark.parametrize("value,name", BAD)
def test_bad_cap_and_scale_raise_naming_the_argument(value, name):
    x, t = _logits(2, 9, torch.float32, "cpu", seed=14), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=name):
        onepass.token_logprobs(x, t, logit_softcap=value)
    with pytest.raises(ValueError, match="logit_scale"):
        onepass.token_logprobs(x, t, logit_scale=value if value != float("inf") else -2.0)
    with pytest.raises(ValueError, match="teacher_logit_softcap"):
        onepass.divergence(x, x, teacher_logit_softcap=value)
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        onepass.divergence(x, x, teacher_logit_scale=0.0)
    h, w, hr, wr, targets, mask = _loss_inputs()
    with pytest.raises(ValueError, match="ref_logit_softcap"):
        onepass.grpo_loss(h, w, targets, torch.ones(3), mask=mask, ref_hidden=hr, ref_weight=wr,
                          ref_logit_softcap=value)
    with pytest.raises(ValueError, match="ref_logit_scale"):
        onepass.linear_policy_ref_stats(h, w, hr, wr, targets, ref_logit_scale=float("nan"))


def test_compile_two_caps_one_graph():
    """The cap is a runtime value: under torch.compile(fullgraph=True) a new cap (and scale) value costs at
    most torch's one automatic-dynamic recompile (the first graph specializes the floats, the second makes
    them inputs), and no compile after that; compiled results equal eager ones."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    x, t = _logits(4, 50, torch.float32, "cpu", seed=15), torch.tensor([1, 2, 3, 49])

    def f(z, cap, scale):
        return onepass.token_logprobs(z, t, logit_softcap=cap, logit_scale=scale, temperature=0.9, backend="cpu")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=counter)
    for cap, scale in ((3.0, 1.0), (7.5, 1.3), (11.0, 0.7), (4.25, 2.0)):
        torch.testing.assert_close(cf(x, cap, scale), f(x, cap, scale), rtol=0, atol=0)
    assert counter.frame_count == 2, f"{counter.frame_count} compilations for four cap values"
