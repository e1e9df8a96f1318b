"""Regression tests of the defects fixed with the op-layer consolidation (issue 8), one section each."""
import math
import re
from pathlib import Path

import pytest
import torch

import onepass
from onepass._contract import DIVERGENCES

from _helpers import backend_cases

LOCAL = [p for p in backend_cases() if p.values[1] == "cpu"]  # (backend, device) pairs without a GPU


def _loss_inputs(dtype=torch.float32, b=2, t=5, d=6, v=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[0, -2:] = 0
    mask[1, 0] = 0
    return h, w, y, mask


# 1. the one-pass fused loss (cpu) can be backpropagated twice; create_graph raises a clear error.
def test_fused_loss_backward_twice_and_gradcheck():
    h, w, y, mask = _loss_inputs(torch.float64)
    adv = torch.randn(2, dtype=torch.float64)
    old = torch.randn(2, 5, dtype=torch.float64) * 0.1 - 3.0
    loss, _ = onepass.grpo_loss(h, w, y, adv, mask=mask, old_logp=old, backend="cpu")
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, h, retain_graph=True)
    (g3,) = torch.autograd.grad(2.0 * loss, h)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g3, 2.0 * g1)
    torch.autograd.gradcheck(lambda h, w: onepass.grpo_loss(h, w, y, adv, mask=mask, old_logp=old,
                                                            backend="cpu")[0], (h, w))
    loss, _ = onepass.grpo_loss(h, w, y, adv, mask=mask, old_logp=old, backend="cpu")
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, h, create_graph=True)


# 2. the NaN policy holds on every backend and every kind: a row with a NaN logit, or all -inf, is NaN.
@pytest.mark.parametrize("backend,device", LOCAL)
@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_divergence_nan_rows_on_every_backend(backend, device, kind):
    a, b = torch.randn(4, 37), torch.randn(4, 37)
    a[1, 5] = float("nan")
    b[2, 9] = float("nan")
    a[3] = float("-inf")
    b[3] = float("-inf")
    got = onepass.divergence(a, b, kind=kind, beta=0.3, alpha=0.3, backend=backend)
    assert torch.isnan(got[1:]).all(), got
    clean = onepass.divergence(a[:1], b[:1], kind=kind, beta=0.3, alpha=0.3, backend=backend)
    torch.testing.assert_close(got[:1], clean)


# 3. anything at masked positions (even NaN) is excluded from the losses and their gradients.
@pytest.mark.parametrize("backend,device", LOCAL)
def test_nan_at_masked_positions_is_excluded(backend, device):
    h, w, y, mask = _loss_inputs()
    adv = torch.randn(2, 5)
    old = torch.randn(2, 5) * 0.1 - 3.0
    ref = torch.randn(2, 5) * 0.1 - 3.0
    poisoned = [x.clone() for x in (adv, old, ref)]
    for x in poisoned:
        x[mask == 0] = float("nan")
    grads = []
    for a_, o_, r_ in ((adv, old, ref), poisoned):
        loss, metrics = onepass.grpo_loss(h, w, y, a_, mask=mask, old_logp=o_, ref_logp=r_, beta=0.1,
                                          backend=backend)
        grads.append(torch.autograd.grad(loss, (h, w)))
        assert all(math.isfinite(float(m)) for m in metrics.values()), metrics
    for clean, dirty in zip(*grads):
        torch.testing.assert_close(dirty, clean)
    th, tw = torch.randn(2, 5, 7), torch.randn(23, 7)
    th_bad = th.clone()
    th_bad[mask == 0] = float("nan")
    out = [torch.autograd.grad(onepass.opd_loss(h, w, t_, tw, y, mask=mask, divergence="jsd", backend=backend)[0], h)[0]
           for t_ in (th, th_bad)]
    torch.testing.assert_close(out[1], out[0])


# 4. one documented behaviour: per-token inputs are constants; float64 inputs give a float64 loss.
@pytest.mark.parametrize("backend,device", LOCAL)
def test_loss_constants_and_dtype(backend, device):
    dtype = torch.float32 if backend == "triton" else torch.float64  # the GPU kernels compute in fp32
    h, w, y, mask = _loss_inputs(dtype)
    adv = torch.randn(2, dtype=dtype, requires_grad=True)
    old = (torch.randn(2, 5, dtype=dtype) - 3.0).requires_grad_()
    loss, _ = onepass.grpo_loss(h, w, y, adv, mask=mask, old_logp=old, backend=backend)
    assert loss.dtype == dtype
    g_adv, g_old, g_h = torch.autograd.grad(loss, (adv, old, h), allow_unused=True)
    assert g_adv is None and g_old is None and g_h is not None
    loss32, _ = onepass.grpo_loss(h.float(), w.float(), y, adv.float(), mask=mask, backend=backend)
    assert loss32.dtype == torch.float32


# 5. errors name the argument.
def test_errors_name_the_argument():
    h, w, y, mask = _loss_inputs()
    with pytest.raises(TypeError, match="bias"):
        onepass.linear_token_logprobs(h, w, y, bias=torch.zeros(23, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden.*D=0"):
        onepass.linear_token_logprobs(torch.randn(2, 5, 0), torch.randn(23, 0), y)
    with pytest.raises(TypeError, match="targets"):
        onepass.token_logprobs(torch.randn(2, 23), [1, 2])
    with pytest.raises(ValueError, match="mask"):
        onepass.policy_loss(torch.randn(2, 5), torch.randn(2), mask=None)
    with pytest.raises(ValueError, match="logits is a meta tensor"):
        onepass.token_logprobs(torch.randn(2, 23, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="kl_estimator"):
        onepass.grpo_loss(h, w, y, torch.randn(2), mask=mask, kl_estimator="k9")


# 6. a new temperature or beta does not recompile: the first call compiles with the value as a constant,
# the second (torch's automatic dynamic) with it as an input; further values reuse that graph.
def test_new_temperature_or_beta_does_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    x, t = torch.randn(3, 29), torch.randint(0, 29, (3,))
    counter = CompileCounterWithBackend("aot_eager")  # runs the float-to-tensor pass
    f = torch.compile(lambda x, t, temp: onepass.token_logprobs(x, t, temperature=temp, backend="cpu"),
                      backend=counter, fullgraph=True)
    for temp in (0.7, 0.9, 1.3, 1.7):
        torch.testing.assert_close(f(x, t, temp), onepass.token_logprobs(x, t, temperature=temp))
    assert counter.frame_count == 2
    h, w, y, mask = _loss_inputs()
    adv, ref = torch.randn(2), torch.randn(2, 5) - 3.0
    counter = CompileCounterWithBackend("aot_eager")  # runs the float-to-tensor pass
    g = torch.compile(lambda h, beta, temp: onepass.grpo_loss(h, w, y, adv, mask=mask, ref_logp=ref, beta=beta,
                                                              temperature=temp, backend="cpu")[0],
                      backend=counter, fullgraph=True)
    for beta, temp in ((0.1, 1.0), (0.2, 0.8), (0.05, 1.2), (0.3, 0.6)):
        want = onepass.grpo_loss(h, w, y, adv, mask=mask, ref_logp=ref, beta=beta, temperature=temp, backend="cpu")[0]
        torch.testing.assert_close(g(h, beta, temp), want)
    assert counter.frame_count == 2


# 6. likewise for a new temperature or epsilon of sinkhorn_distance (1/T reaches the cost op as a tensor,
# epsilon the plain-torch iterations as a symbolic float), forward and backward; the aot_eager backend runs
# torch.compile's float-to-tensor pass, which specializes a float it cannot keep symbolic.
def test_new_sinkhorn_temperature_or_epsilon_does_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    a = torch.randn(7, 37, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 37, dtype=torch.float64, requires_grad=True)

    def value_and_grads(fn, temp, eps):
        value = fn(a, b, temperature=temp, epsilon=eps, group_size=3, backend="cpu")
        return (value, *torch.autograd.grad(value, (a, b)))

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(onepass.sinkhorn_distance, backend=counter, fullgraph=True)
    for temp, eps in ((0.7, 0.1), (0.9, 0.2), (1.3, 0.05), (1.7, 0.3)):
        torch.testing.assert_close(value_and_grads(compiled, temp, eps),
                                   value_and_grads(onepass.sinkhorn_distance, temp, eps))
    assert counter.frame_count == 2


# 7. group advantages of rewards near the float32 limit.
@pytest.mark.parametrize("backend,device", [p for p in backend_cases(("triton", "cpu", "torch")) if p.values[1] == "cpu"])
def test_group_advantages_huge_rewards(backend, device):
    r = torch.tensor([3e38, -3e38, 1.0, 2.0])
    got = onepass.group_advantages(r, group_size=2, backend=backend)
    want = torch.tensor([1, -1, -1, 1]) / math.sqrt(2.0)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


# 8. the README quick example is on-policy: ratio 1, nothing clipped.
def test_readme_example_is_on_policy():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Quick example\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    metrics = scope["metrics"]
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["clip_frac"]) == 0.0
