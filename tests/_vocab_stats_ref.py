"""float64 PyTorch statement of the vocab-stats kernel contract (docs/vocab_stats.md), shared by the
kernel-level tests of the CPU and CUDA launchers: lse / logp / entropy from log_softmax, every divergence
from its plain formula, gradients by autograd of Σ_r (g_lp·logp + g_rlp·ref_logp + g_H·H + g_D·D)."""
from __future__ import annotations

import torch

from onepass._contract import LogitMap


def uniform_map(inv_temp: float = 1.0) -> LogitMap:
    """The kernels' logit map with the same inverse temperature for both models and no cap."""
    return LogitMap.plain(inv_temp)


def as_map(logit_map) -> LogitMap:
    """A ``LogitMap``, or a float inverse temperature for both models without a cap."""
    return logit_map if isinstance(logit_map, LogitMap) else uniform_map(float(logit_map))

# ----------------------------------------------------------------------------- float64 reference
def ref_divergence(la, lb, p, q, fin, kind, beta, alpha):
    """Per-row divergence from its plain formula.  la, lb, p, q are 0 outside `fin` (the entries
    finite in both rows), so no inf / NaN reaches autograd."""
    zero = torch.zeros_like(la)
    one = torch.ones_like(la)
    if kind == 1:  # KL(p || q)
        t = p * (la - lb)
    elif kind == 2:  # KL(q || p)
        t = q * (lb - la)
    elif kind == 3:  # generalized JSD with the mixture m = beta q + (1 - beta) p
        lm = torch.log(torch.where(fin, beta * q + (1 - beta) * p, one))
        t = (1 - beta) * p * (la - lm) + beta * q * (lb - lm)
    elif kind == 4:  # total variation
        t = 0.5 * (p - q).abs()
    elif kind == 5:  # squared Hellinger, sum (sqrt p - sqrt q)^2
        t = (torch.exp(0.5 * la) - torch.exp(0.5 * lb)) ** 2
    elif kind == 6:  # Pearson chi^2(p || q) = sum (p - q)^2 / q
        t = (p - q) ** 2 / torch.where(fin, q, one)
    elif kind == 7:  # Amari alpha: sum (p^a q^(1-a) - a p - (1-a) q) / (a (a - 1))
        t = (torch.exp(alpha * la + (1 - alpha) * lb) - alpha * p - (1 - alpha) * q) / (alpha * (alpha - 1))
    else:
        return torch.zeros(la.shape[0], dtype=la.dtype)
    return torch.where(fin, t, zero).sum(-1)


def ref_quantities(za, zb, targets, logit_map, kind, beta, alpha):
    """float64 (lse_a, lse_b, logp_a, logp_b, H, D) per row, differentiable in za, zb; ``logit_map`` a
    ``LogitMap`` (or a float inverse temperature), applied by plain torch ops."""
    n = za.shape[0]
    zeros = torch.zeros(n, dtype=torch.float64)
    logit_map = as_map(logit_map)
    xa = logit_map.apply(za, 0)
    lse_a = torch.logsumexp(xa, -1)
    la_full = torch.log_softmax(xa, -1)
    fin = torch.isfinite(za) if zb is None else torch.isfinite(za) & torch.isfinite(zb)
    la = torch.where(torch.isfinite(za), la_full, torch.zeros_like(la_full))
    p = torch.where(torch.isfinite(za), la.exp(), torch.zeros_like(la))
    H = -(p * la).sum(-1)
    lse_b, lb_full, D = zeros, None, zeros
    if zb is not None:
        xb = logit_map.apply(zb, 1)
        lse_b = torch.logsumexp(xb, -1)
        lb_full = torch.log_softmax(xb, -1)
        la_f = torch.where(fin, la_full, torch.zeros_like(la_full))
        lb = torch.where(fin, lb_full, torch.zeros_like(lb_full))
        pf = torch.where(fin, la_f.exp(), torch.zeros_like(la_f))
        q = torch.where(fin, lb.exp(), torch.zeros_like(lb))
        D = ref_divergence(la_f, lb, pf, q, fin, kind, beta, alpha)
    logp_a = logp_b = zeros
    if targets is not None:
        y = targets.clamp_min(0)[:, None]
        logp_a = la_full.gather(-1, y)[:, 0]
        if zb is not None:
            logp_b = lb_full.gather(-1, y)[:, 0]
    return lse_a, lse_b, logp_a, logp_b, H, D


def reference(a, b, targets, logit_map, kind, beta, alpha, grads):
    """float64 CPU stats [N, 6] = (lse_a, lse_b, logp_a, logp_b, H, D) and the autograd gradients."""
    za = a.detach().cpu().double().requires_grad_(True)
    zb = b.detach().cpu().double().requires_grad_(True) if b is not None else None
    t = targets.cpu() if targets is not None else None
    qs = ref_quantities(za, zb, t, logit_map, kind, beta, alpha)
    keep = torch.ones(a.shape[0], dtype=torch.float64) if t is None else (t >= 0).double()
    g = grads.detach().cpu().double()
    loss = (keep * (g[:, 0] * qs[2] + g[:, 1] * qs[3] + g[:, 2] * qs[4] + g[:, 3] * qs[5])).sum()
    inputs = [za] + ([zb] if zb is not None else [])
    gr = torch.autograd.grad(loss, inputs, allow_unused=True)
    ga = gr[0] if gr[0] is not None else torch.zeros_like(za)
    gb = None
    if zb is not None:
        gb = gr[1] if gr[1] is not None else torch.zeros_like(zb)
    stats = torch.stack([x.detach() for x in qs], -1) * keep[:, None]
    return stats, ga, gb


# ----------------------------------------------------------------------------- helpers
def make_inputs(n, v, dtype, *, seed=0, with_ninf=True, scale=2.0, ignored=True):
    """CPU tensors: a, b = a + noise (same -inf positions), targets on finite entries (row 1
    ignored), grads [N, 4] float64."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (a.double() + torch.randn(n, v, generator=g, dtype=torch.float64) * scale * 0.5).to(dtype)
    if with_ninf and v >= 4:
        mask = torch.rand(n, v, generator=g) < 0.15
        mask[:, 0] = False  # every row keeps a finite entry
        a[mask] = float("-inf")
        b[mask] = float("-inf")
    targets = torch.zeros(n, dtype=torch.int64)
    for r in range(n):
        finite = torch.nonzero(torch.isfinite(a[r])).flatten()
        targets[r] = finite[torch.randint(len(finite), (1,), generator=g)].item()
    if ignored and n >= 3:
        targets[1] = -1
    grads = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return a, b, targets, grads




def assert_close(got, ref, tol, what):
    got = got.detach().cpu().double()
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
