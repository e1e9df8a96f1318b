"""token_logprobs / linear_token_logprobs on every backend here vs the float64 reference."""
import pytest
import torch

import onepass
from onepass.reference import vocab as ref

from _helpers import DTYPES, assert_tolerance, backend_cases, interpreted

BACKENDS = backend_cases()


def _inputs(lead, v, dtype, device, scale=3.0, ignore_frac=0.2):
    logits = (torch.randn(*lead, v, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, v, lead)
    ignore = torch.rand(lead) < ignore_frac
    targets[ignore] = -100
    return logits.to(device), targets.to(device)


def _naive_same_dtype(logits, targets, T):
    """What a user would write in the input dtype (the error baseline of the tolerance rule)."""
    z = logits / T
    logsm = torch.log_softmax(z, -1)
    safe = targets.clamp_min(0)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    m = targets != -100
    return torch.where(m, logp, 0), torch.where(m, ent, 0)


def _check(backend, device, logits, targets, T, grad=True):
    dtype = logits.dtype
    x = logits.clone().requires_grad_(grad)
    lp, ent = onepass.token_logprobs(x, targets, temperature=T, return_entropy=True, backend=backend)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == targets.shape and ent.shape == targets.shape
    x64 = logits.detach().double().cpu().requires_grad_(grad)
    t_cpu = targets.cpu()
    rl, re = ref.token_logprobs(x64, t_cpu, temperature=T, return_entropy=True)
    xn = logits.detach().clone().requires_grad_(grad)
    nl, ne = _naive_same_dtype(xn, targets, T)
    assert_tolerance(lp, rl, nl, dtype, "logp", scale=max(1.0, rl.abs().max().item()))
    assert_tolerance(ent, re, ne, dtype, "entropy", scale=max(1.0, re.abs().max().item()))
    ignored = (targets == -100).cpu()
    assert torch.all(lp.detach().cpu()[ignored] == 0) and torch.all(ent.detach().cpu()[ignored] == 0)
    if not grad:
        return
    g1 = torch.randn(targets.shape, dtype=torch.float64)
    g2 = torch.randn(targets.shape, dtype=torch.float64)
    ((lp * g1.to(device).float()).sum() + (ent * g2.to(device).float()).sum()).backward()
    ((rl * g1).sum() + (re * g2).sum()).backward()
    ((nl.float() * g1.to(device).float()).sum() + (ne.float() * g2.to(device).float()).sum()).backward()
    assert x.grad.dtype == dtype
    assert_tolerance(x.grad, x64.grad, xn.grad, dtype, "grad logits")
    assert torch.all(x.grad.cpu()[ignored] == 0), "ignored rows must receive no gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 127, 1000, 32000])
@pytest.mark.parametrize("T", [0.7, 1.3])
def test_token_logprobs_matches_reference(backend, device, dtype, v, T):
    lead = (1,) if (interpreted(backend, device) and v >= 32000) else (3, 7)
    logits, targets = _inputs(lead, v, dtype, device)
    _check(backend, device, logits, targets, T)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_logprobs_huge_vocab(backend, device):
    v = 151936
    n = 2 if interpreted(backend, device) else 33
    logits, targets = _inputs((n,), v, torch.float32, device)
    _check(backend, device, logits, targets, 1.0, grad=not interpreted(backend, device))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lead", [(1,), (64,), (2, 5, 3)])
def test_token_logprobs_leading_shapes(backend, device, lead):
    logits, targets = _inputs(lead, 257, torch.float32, device)
    _check(backend, device, logits, targets, 1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_without_entropy_and_upstream_only_on_logp(backend, device):
    logits, targets = _inputs((9,), 300, torch.float32, device)
    x = logits.clone().requires_grad_()
    lp = onepass.token_logprobs(x, targets, backend=backend)
    lp.sum().backward()
    x64 = logits.double().cpu().requires_grad_()
    ref.token_logprobs(x64, targets.cpu()).sum().backward()
    assert (lp.detach().cpu().double() - ref.token_logprobs(x64, targets.cpu()).detach()).abs().max() < 1e-5
    assert (x.grad.cpu().double() - x64.grad).abs().max() < 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_vocab_entries(backend, device):
    """Logits at −inf (masked vocabulary) contribute nothing and produce no NaN."""
    logits, targets = _inputs((6,), 500, torch.float32, device, ignore_frac=0.0)
    logits[:, ::3] = float("-inf")
    targets = (targets // 3) * 3 + 1
    _check(backend, device, logits, targets, 0.9)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_and_empty(backend, device):
    logits, targets = _inputs((8, 6), 129, torch.float32, device, ignore_frac=0.0)
    nc = logits.transpose(0, 1)  # [6, 8, V] non-contiguous
    lp = onepass.token_logprobs(nc, targets.T, backend=backend)
    want = ref.token_logprobs(nc.double().cpu(), targets.T.cpu())
    assert (lp.cpu().double() - want).abs().max() < 1e-5
    empty = onepass.token_logprobs(logits[:0], targets[:0], return_entropy=True, backend=backend)
    assert empty[0].shape == (0, 6) and empty[1].shape == (0, 6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_row_stays_in_its_row(backend, device):
    """Documented policy: a NaN logit gives NaN outputs for that row only."""
    logits, targets = _inputs((4,), 200, torch.float32, device, ignore_frac=0.0)
    logits[2, 17] = float("nan")
    lp, ent = onepass.token_logprobs(logits, targets, return_entropy=True, backend=backend)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    keep = torch.tensor([0, 1, 3])
    assert torch.isfinite(lp.cpu()[keep]).all() and torch.isfinite(ent.cpu()[keep]).all()


# ---------------------------------------------------------------------------------------------
# Fused linear
# ---------------------------------------------------------------------------------------------
def _linear_inputs(n, d, v, dtype, device, bias=True):
    h = torch.randn(n, d, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(v, d, dtype=torch.float64) / d ** 0.5 * 2).to(dtype).to(device)
    b = (torch.randn(v, dtype=torch.float64) * 0.5).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,))
    t[torch.rand(n) < 0.2] = -100
    return h, w, b, t.to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,v", [(1, 16, 1), (37, 48, 1000), (20, 64, 4099)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_token_logprobs_matches_reference(backend, device, dtype, n, d, v, bias):
    h, w, b, t = _linear_inputs(n, d, v, dtype, device, bias)
    T = 0.7
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    lp, ent = onepass.linear_token_logprobs(leaves[0], leaves[1], t, bias=leaves[2], temperature=T,
                                            return_entropy=True, backend=backend)
    ref_leaves = [x.detach().double().cpu().requires_grad_() if x is not None else None for x in (h, w, b)]
    rl, re = ref.linear_token_logprobs(ref_leaves[0], ref_leaves[1], t.cpu(), bias=ref_leaves[2], temperature=T,
                                       return_entropy=True)
    # naive same-dtype: logits in the input dtype, then the softmax math in that dtype
    nv = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    z = nv[0] @ nv[1].T + (nv[2] if nv[2] is not None else 0)
    nl, ne = _naive_same_dtype(z, t, T)
    scale = max(1.0, rl.abs().max().item())
    assert_tolerance(lp, rl, nl, dtype, "logp", scale)
    assert_tolerance(ent, re, ne, dtype, "entropy", scale)
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    ((lp * g1.to(device).float()).sum() + (ent * g2.to(device).float()).sum()).backward()
    ((rl * g1).sum() + (re * g2).sum()).backward()
    ((nl.float() * g1.to(device).float()).sum() + (ne.float() * g2.to(device).float()).sum()).backward()
    for name, mine, want, naive in zip(("hidden", "weight", "bias"), leaves, ref_leaves, nv):
        if mine is None:
            continue
        assert mine.grad.dtype == dtype
        assert_tolerance(mine.grad, want.grad, naive.grad, dtype, f"grad {name}",
                         scale=max(1.0, want.grad.abs().max().item()))


@pytest.mark.parametrize("backend", ["cpu", "torch"])  # the GPU kernels compute in fp32
def test_gradcheck_float64(backend):
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 10])
    f = lambda x: onepass.token_logprobs(x, t, temperature=0.8, return_entropy=True, backend=backend)  # noqa
    assert torch.autograd.gradcheck(f, (logits,))
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([0, 12, -100, 5])
    f2 = lambda h, w, b: onepass.linear_token_logprobs(h, w, t2, bias=b, temperature=1.3,  # noqa
                                                       return_entropy=True, backend=backend)
    assert torch.autograd.gradcheck(f2, (h, w, b))
