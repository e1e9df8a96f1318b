"""grpo_loss / opd_loss vs naive PyTorch losses that materialize [B, T, V] logits (TRL/verl style)."""

import pytest
import torch

import onepass

from _helpers import backend_cases

BACKENDS = backend_cases()


def _agg(loss_mat, mask, mode):
    """verl's agg_loss, re-stated (fully masked sequences left out of the sequence means)."""
    m = mask.float()
    if mode == "token-mean":
        return (loss_mat * m).sum() / m.sum().clamp_min(1)
    seq_tokens = m.sum(-1)
    valid = (seq_tokens > 0).float()
    n = valid.sum().clamp_min(1)
    if mode == "seq-mean-token-mean":
        return ((loss_mat * m).sum(-1) / seq_tokens.clamp_min(1) * valid).sum() / n
    seq = (loss_mat * m).sum(-1)
    loss = (seq * valid).sum() / n
    return loss / m.shape[-1] if mode == "seq-mean-token-sum-norm" else loss


def _logsm(h, w, b, T, round_to=None):
    """log_softmax of (h @ w.T + b)/T in float64; ``round_to`` rounds the logits to that dtype first
    (what the same-dtype naive computation holds)."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if round_to is not None:
        z = z.to(round_to).double()
    return torch.log_softmax(z / T, -1)


def _naive_grpo(h, w, t, adv, mask, *, old_logp, ref_logp, ref_h, ref_w, bias, T, beta, est, el, eh, dual, agg,
                ent_coef, round_to=None):
    logsm = _logsm(h, w, bias, T, round_to)
    logp = logsm.gather(-1, t.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    ent = -(p * logsm).sum(-1)
    A = adv.double()[:, None] if adv.dim() == 1 else adv.double()
    ratio = torch.exp((logp - old_logp.double()).clamp(-20, 20)) if old_logp is not None else torch.exp(logp - logp.detach())
    pg1, pg2 = -A * ratio, -A * ratio.clamp(1 - el, 1 + eh)
    pg = torch.maximum(pg1, pg2)
    if dual is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -A * dual), pg)
    per_tok = pg
    if ref_h is not None:
        with torch.no_grad():
            rlogsm = _logsm(ref_h, ref_w, None, T, round_to)
        ref_lp = rlogsm.gather(-1, t.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        kl_full = (p * (logsm - rlogsm)).sum(-1)
    else:
        ref_lp, kl_full = (ref_logp.double() if ref_logp is not None else None), None
    kl = None
    if est == "full":
        kl = kl_full
    elif ref_lp is not None:
        x = (logp - ref_lp).clamp(-20, 20)
        k = {"k1": x, "k2": 0.5 * x * x, "k3": torch.exp(-x) + x - 1, "abs": x.abs()}[est.rstrip("+")]
        kl = 0.5 * x * x + (k - 0.5 * x * x).detach() if est.endswith("+") else k
    if kl is not None and beta:
        per_tok = per_tok + beta * kl
    if ent_coef:
        per_tok = per_tok - ent_coef * ent
    loss = _agg(per_tok, mask, agg)
    m = mask.float()
    mm = lambda x: ((x * m).sum() / m.sum().clamp_min(1)).detach()  # noqa: E731
    metrics = {"clip_frac": mm((pg2 > pg1).float()), "ratio_mean": mm(ratio), "entropy": mm(ent)}
    if kl is not None:
        metrics["kl"] = mm(kl)
    return loss, metrics


def _data(dtype, device, B=3, T=6, D=24, V=301, Dr=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D ** 0.5 * 2).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[-1] = 0  # a fully masked sequence
    t[mask == 0] = -100  # padding targets
    adv = torch.randn(B, generator=g)
    old = (torch.randn(B, T, generator=g) * 0.3 - 5.5)
    ref_h = torch.randn(B, T, Dr, generator=g).to(dtype)
    ref_w = (torch.randn(V, Dr, generator=g) / Dr ** 0.5 * 2).to(dtype)
    ref_logp = torch.randn(B, T, generator=g) * 0.3 - 5.5
    to = lambda x: x.to(device)  # noqa: E731
    return tuple(map(to, (h, w, bias, t, mask, adv, old, ref_h, ref_w, ref_logp)))


GRPO_CASES = [
    # (loss_agg, old_logp?, reference, kl_estimator, beta, dual_clip, entropy_coef, eps)
    ("token-mean", False, None, "k3", 0.0, None, 0.0, (0.2, 0.2)),
    ("token-mean", True, "logp", "k3", 0.1, None, 0.0, (0.2, 0.28)),
    ("seq-mean-token-sum", True, "logp", "k1", 0.05, 3.0, 0.01, (0.2, 0.2)),
    ("seq-mean-token-mean", True, "hidden", "full", 0.1, None, 0.02, (0.1, 0.3)),
    ("seq-mean-token-sum-norm", True, "hidden", "k2", 0.2, 2.0, 0.0, (0.2, 0.2)),
    ("token-mean", True, "hidden", "k3+", 0.1, None, 0.01, (0.2, 0.2)),
    ("seq-mean-token-mean", False, "logp", "abs", 0.1, None, 0.0, (0.2, 0.2)),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}-dual{c[5]}-ent{c[6]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_loss_matches_naive(backend, device, case, dtype):
    _compare_grpo(backend, device, case, dtype, per_token_adv=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grpo_loss_per_token_advantages(backend, device):
    _compare_grpo(backend, device, GRPO_CASES[1], torch.float32, per_token_adv=True)


def _compare_grpo(backend, device, case, dtype, per_token_adv):
    agg, use_old, reference, est, beta, dual, ent_coef, (el, eh) = case
    h, w, bias, t, mask, adv, old, ref_h, ref_w, ref_logp = _data(dtype, device)
    if per_token_adv:
        adv = torch.randn(mask.shape, device=device)
    kw = dict(old_logp=old if use_old else None, ref_logp=ref_logp if reference == "logp" else None,
              ref_hidden=ref_h if reference == "hidden" else None, ref_weight=ref_w if reference == "hidden" else None,
              temperature=0.9, beta=beta, kl_estimator=est, epsilon_low=el, epsilon_high=eh, dual_clip=dual,
              loss_agg=agg, entropy_coef=ent_coef)
    leaves = [x.clone().requires_grad_() for x in (h, w, bias)]
    loss, metrics = onepass.grpo_loss(leaves[0], leaves[1], t, adv, mask=mask, bias=leaves[2], backend=backend, **kw)
    loss.backward()
    nl = [x.detach().double().cpu().requires_grad_() for x in (h, w, bias)]
    cpu = lambda x: x.cpu() if x is not None else None  # noqa: E731
    nloss, nmetrics = _naive_grpo(nl[0], nl[1], t.cpu(), adv.cpu(), mask.cpu(), old_logp=cpu(kw["old_logp"]),
                                  ref_logp=cpu(kw["ref_logp"]), ref_h=cpu(kw["ref_hidden"]), ref_w=cpu(kw["ref_weight"]),
                                  bias=nl[2], T=0.9, beta=beta, est=est, el=el, eh=eh, dual=dual, agg=agg,
                                  ent_coef=ent_coef)
    nloss.backward()
    assert loss.dtype == torch.float32
    if dtype == torch.float32:
        tol = 2e-5 * max(1.0, abs(nloss.item()))
        mtol = {k: 2e-5 * max(1.0, abs(v.item())) + 1e-6 for k, v in nmetrics.items()}
    else:  # tolerance rule: 2 × the error of the same-dtype naive loss (bf16 logits) + a floor
        with torch.no_grad():
            bl, bm = _naive_grpo(nl[0], nl[1], t.cpu(), adv.cpu(), mask.cpu(), old_logp=cpu(kw["old_logp"]),
                                 ref_logp=cpu(kw["ref_logp"]), ref_h=cpu(kw["ref_hidden"]), ref_w=cpu(kw["ref_weight"]),
                                 bias=nl[2], T=0.9, beta=beta, est=est, el=el, eh=eh, dual=dual, agg=agg,
                                 ent_coef=ent_coef, round_to=dtype)
        tol = 2 * abs(bl.item() - nloss.item()) + 1e-3 * max(1.0, abs(nloss.item()))
        mtol = {k: 2 * abs(bm[k].item() - v.item()) + 1e-3 * max(1.0, abs(v.item())) for k, v in nmetrics.items()}
    assert abs(loss.item() - nloss.item()) <= tol, (loss.item(), nloss.item(), tol)
    for k, v in nmetrics.items():
        assert abs(metrics[k].item() - v.item()) <= mtol[k], (k, metrics[k], v)
    for name, mine, want in zip(("hidden", "weight", "bias"), leaves, nl):
        err = (mine.grad.double().cpu() - want.grad).abs().max().item()
        scale = want.grad.abs().max().item()
        gtol = 1e-4 if dtype == torch.float32 else 2e-2
        assert err <= gtol * max(scale, 1e-3), (name, err, scale)
    assert torch.all(leaves[0].grad[mask == 0] == 0), "masked tokens must receive no gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grpo_all_masked_and_entropy_gradient(backend, device):
    h, w, bias, t, mask, adv, *_ = _data(torch.float32, device)
    hh = h.clone().requires_grad_()
    loss, metrics = onepass.grpo_loss(hh, w, t, adv, mask=torch.zeros_like(mask), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hh.grad == 0) and all(torch.isfinite(v) for v in metrics.values())
    # the entropy bonus moves the gradient exactly by −c·∇(agg entropy)
    h0, h1 = h.clone().requires_grad_(), h.clone().requires_grad_()
    onepass.grpo_loss(h0, w, t, adv, mask=mask, backend=backend)[0].backward()
    onepass.grpo_loss(h1, w, t, adv, mask=mask, entropy_coef=0.5, backend=backend)[0].backward()
    he = h.clone().requires_grad_()
    _, ent = onepass.linear_token_logprobs(he, w, torch.where(mask.bool(), t, -100), return_entropy=True,
                                           backend=backend)
    ((ent * mask).sum() / mask.sum()).backward()
    assert torch.allclose(h1.grad - h0.grad, -0.5 * he.grad, atol=1e-5)


def _naive_opd(hs, ws, ht, wt, t, mask, divergence, lam, ref_logp, T, agg, **kp):
    ls = _logsm(hs, ws, None, T)
    lt = _logsm(ht, wt, None, T).detach()
    tt = t.clamp_min(0).unsqueeze(-1)
    logp, q_logp = ls.gather(-1, tt).squeeze(-1), lt.gather(-1, tt).squeeze(-1)
    if divergence == "sampled_reverse_kl":
        r = (q_logp - logp) if ref_logp is None else lam * (q_logp - ref_logp.double()) - (logp - ref_logp.double())
        r = r.detach()
        return _agg(-r * torch.exp(logp - logp.detach()), mask, agg)
    d = onepass.reference.divergence_from_logprobs(ls, lt, divergence, **kp)
    return _agg(d, mask, agg)


OPD_CASES = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.3}), ("tv", {}), ("hellinger", {}),
             ("chi2", {}), ("alpha", {"alpha": 0.7})]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,params", OPD_CASES, ids=[c[0] for c in OPD_CASES])
def test_opd_loss_divergences(backend, device, kind, params):
    h, w, bias, t, mask, adv, old, ref_h, ref_w, ref_logp = _data(torch.float32, device)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    th, tw = ref_h.clone().requires_grad_(), ref_w.clone().requires_grad_()
    loss, metrics = onepass.opd_loss(hs, ws, th, tw, t, mask=mask, divergence=kind, temperature=1.2,
                                     loss_agg="seq-mean-token-mean", backend=backend, **params)
    loss.backward()
    assert th.grad is None and tw.grad is None, "the teacher of opd_loss is not trained"
    ns, nw = h.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    nloss = _naive_opd(ns, nw, ref_h.cpu(), ref_w.cpu(), t.cpu(), mask.cpu(), kind, 1.0, None, 1.2,
                       "seq-mean-token-mean", **params)
    nloss.backward()
    assert abs(loss.item() - nloss.item()) <= 2e-5 * max(1, abs(nloss.item()))
    assert (hs.grad.double().cpu() - ns.grad).abs().max() <= 1e-4 * max(1e-3, ns.grad.abs().max().item())
    assert (ws.grad.double().cpu() - nw.grad).abs().max() <= 1e-4 * max(1e-3, nw.grad.abs().max().item())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lam,with_ref", [(0.5, True), (1.0, True), (1.5, True), (1.0, False)])
def test_opd_loss_sampled_reward(backend, device, lam, with_ref):
    h, w, bias, t, mask, adv, old, ref_h, ref_w, ref_logp = _data(torch.float32, device)
    hs = h.clone().requires_grad_()
    loss, metrics = onepass.opd_loss(hs, w, ref_h, ref_w, t, mask=mask, divergence="sampled_reverse_kl",
                                     reward_scale=lam, ref_logp=ref_logp if with_ref else None, backend=backend)
    loss.backward()
    ns = h.double().cpu().requires_grad_()
    nloss = _naive_opd(ns, w.cpu(), ref_h.cpu(), ref_w.cpu(), t.cpu(), mask.cpu(), "sampled_reverse_kl", lam,
                       ref_logp.cpu() if with_ref else None, 1.0, "token-mean")
    nloss.backward()
    assert abs(loss.item() - nloss.item()) <= 2e-5 * max(1, abs(nloss.item()))
    assert (hs.grad.double().cpu() - ns.grad).abs().max() <= 1e-4 * max(1e-3, ns.grad.abs().max().item())
    if lam == 1.0 and not with_ref:  # plain OPD: the loss value is the sampled reverse KL
        assert abs(loss.item() - metrics["reverse_kl_sampled"].item()) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kdrl_composition_one_sweep(backend, device):
    """KDRL = GRPO + β·KL(policy‖teacher): one sweep with the teacher as the 'reference' LM head."""
    h, w, bias, t, mask, adv, old, ref_h, ref_w, ref_logp = _data(torch.float32, device)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    l1, _ = onepass.grpo_loss(h1, w, t, adv, mask=mask, old_logp=old, ref_hidden=ref_h, ref_weight=ref_w,
                              kl_estimator="full", beta=0.3, backend=backend)
    l1.backward()
    tk = torch.where(mask.bool(), t, -100)
    st = onepass.linear_policy_ref_stats(h2, w, ref_h, ref_w, tk, backend=backend)
    pg, _ = onepass.policy_loss(st["logp"], adv, mask=mask, old_logp=old)
    kd, _ = onepass.opd_loss(h2, w, ref_h, ref_w, t, mask=mask, divergence="reverse_kl", backend=backend)
    (pg + 0.3 * kd).backward()
    assert abs(l1.item() - (pg + 0.3 * kd).item()) < 1e-5
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
