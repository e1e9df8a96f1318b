"""grpo_loss with a full-vocabulary penalty of any divergence kind (``kl_estimator="full"`` plus
``ref_divergence``) vs a float64 logits-based reference: value, metrics and gradients."""
import pytest
import torch

import onepass
from onepass.reference import divergence_from_logprobs

from _helpers import backend_cases

KINDS = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 1.0}), ("tv", {}),
         ("hellinger", {}), ("chi2", {}), ("alpha", {"alpha": 0.7}), ("alpha", {"alpha": 0.0})]


def _naive(h, w, rh, rw, t, adv, mask, old, kind, params, T, beta, ent_coef):
    """float64: token-mean PPO-clip loss + β·D(policy, ref) − c·entropy from materialized logits."""
    logsm = torch.log_softmax((h @ w.T) / T, -1)
    rlogsm = torch.log_softmax((rh @ rw.T) / T, -1).detach()
    logp = logsm.gather(-1, t.clamp_min(0)[..., None])[..., 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    div = divergence_from_logprobs(logsm, rlogsm, kind, beta=params.get("beta", 0.5), alpha=params.get("alpha", 0.5))
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    per_tok = pg + beta * div - ent_coef * ent
    m = mask.double()
    mm = lambda x: (x * m).sum() / m.sum()  # noqa: E731
    return mm(per_tok), mm(div).detach()


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("kind,params", KINDS, ids=[f"{k}{list(p.values())}" for k, p in KINDS])
def test_grpo_loss_full_divergence_penalty(backend, device, kind, params):
    g = torch.Generator().manual_seed(7)
    B, T_, D, Dr, V = 3, 5, 12, 10, 257
    h = torch.randn(B, T_, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5 * 2
    rh = torch.randn(B, T_, Dr, generator=g)
    rw = torch.randn(V, Dr, generator=g) / Dr ** 0.5 * 2
    t = torch.randint(0, V, (B, T_), generator=g)
    mask = (torch.rand(B, T_, generator=g) > 0.25).float()
    t[mask == 0] = -100
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T_, generator=g) * 0.2 - 5.5
    kw = dict(mask=mask.to(device), old_logp=old.to(device), ref_hidden=rh.to(device), ref_weight=rw.to(device),
              temperature=0.8, beta=0.3, kl_estimator="full", ref_divergence=kind, entropy_coef=0.01,
              ref_divergence_beta=params.get("beta", 0.5), ref_divergence_alpha=params.get("alpha", 0.5))
    hh, ww = h.clone().to(device).requires_grad_(), w.clone().to(device).requires_grad_()
    loss, metrics = onepass.grpo_loss(hh, ww, t.to(device), adv.to(device), backend=backend, **kw)
    loss.backward()
    nh, nw = h.double().requires_grad_(), w.double().requires_grad_()
    nloss, ndiv = _naive(nh, nw, rh.double(), rw.double(), t, adv.double(), mask, old.double(), kind, params, 0.8,
                         0.3, 0.01)
    nloss.backward()
    assert abs(loss.item() - nloss.item()) <= 2e-5 * max(1.0, abs(nloss.item()))
    assert abs(metrics["kl"].item() - ndiv.item()) <= 2e-5 * max(1.0, abs(ndiv.item()))
    for mine, want in ((hh, nh), (ww, nw)):
        err = (mine.grad.double().cpu() - want.grad).abs().max().item()
        assert err <= 1e-4 * max(1e-3, want.grad.abs().max().item()), (err, kind)
    # no-grad (evaluation) path gives the same value
    with torch.no_grad():
        again, _ = onepass.grpo_loss(h.to(device), w.to(device), t.to(device), adv.to(device), backend=backend, **kw)
    assert abs(again.item() - nloss.item()) <= 2e-5 * max(1.0, abs(nloss.item()))


def test_ref_divergence_needs_full_estimator():
    h, w = torch.randn(1, 2, 4), torch.randn(9, 4)
    t, m = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    with pytest.raises(ValueError, match="ref_divergence"):
        onepass.grpo_loss(h, w, t, torch.zeros(1), mask=m, ref_hidden=h, ref_weight=w, kl_estimator="k3",
                          ref_divergence="tv", beta=0.1)
    with pytest.raises(ValueError, match="kind must be one of"):
        onepass.grpo_loss(h, w, t, torch.zeros(1), mask=m, ref_hidden=h, ref_weight=w, kl_estimator="full",
                          ref_divergence="nope", beta=0.1)
