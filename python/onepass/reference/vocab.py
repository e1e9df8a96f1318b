"""Plain-PyTorch reference of the vocabulary ops: the oracle of every backend, the ``"torch"`` backend
and the naive side of the benchmarks.

Obviously correct rather than fast: it materializes the [N, V] logits, their log-softmax and their
softmax, computes in float32 (float64 for float64 inputs) and differentiates by autograd.  Shapes and
semantics are those of the public functions (``onepass.token_logprobs`` etc.).
"""
from __future__ import annotations

import math

import torch

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd", "tv", "hellinger", "chi2", "alpha")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scaled(logits: torch.Tensor, temperature: float, softcap=None, scale=1.0) -> torch.Tensor:
    """z = c·tanh(s·ℓ/c) / T (without a cap c: s·ℓ / T): scale, soft-cap, then temperature."""
    z = logits.to(_compute_dtype(logits)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _linear_logits(hidden, weight, bias):
    dt = _compute_dtype(hidden)
    z = hidden.to(dt) @ weight.to(dt).T
    return z if bias is None else z + bias.to(dt)


def _mask(targets, ignore_index, shape, device):
    if targets is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return targets != ignore_index


def _p_log_ratio(p, logp, logq):
    """Σ-term p·(log p − log q), exactly 0 where p = 0 (no NaN from 0·(−inf − −inf))."""
    return p * torch.where(p > 0, logp - logq, torch.zeros_like(logp))


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False, logit_softcap=None,
                   logit_scale=1.0):
    """logp [...] = log_softmax(z)[target], z = c·tanh(s·logits/c)/T; entropy [...] = −Σ softmax·log_softmax."""
    z = _scaled(logits, temperature, logit_softcap, logit_scale)
    logsm = torch.log_softmax(z, dim=-1)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logsm.exp()
    ent = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    return logp, torch.where(mask, ent, torch.zeros_like(ent))


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, logit_softcap=None, logit_scale=1.0):
    return token_logprobs(_linear_logits(hidden, weight, bias), targets, temperature=temperature,
                          ignore_index=ignore_index, return_entropy=return_entropy, logit_softcap=logit_softcap,
                          logit_scale=logit_scale)


def divergence_from_logprobs(logp, logq, kind, beta=0.5, alpha=0.5):
    """Per-row divergence between p = exp(logp) (student) and q = exp(logq) (teacher), [..., V] -> [...]."""
    p, q = logp.exp(), logq.exp()
    zero = torch.zeros_like(p)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1) or (kind == "alpha" and alpha == 1):
        return _p_log_ratio(p, logp, logq).sum(-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0) or (kind == "alpha" and alpha == 0):
        return _p_log_ratio(q, logq, logp).sum(-1)
    if kind == "jsd":
        dead = (p == 0) & (q == 0)  # terms multiplied by p = q = 0: keep logsumexp's gradient finite there
        lp, lq = torch.where(dead, zero, logp), torch.where(dead, zero, logq)
        logm = torch.logsumexp(torch.stack([lq + math.log(beta), lp + math.log(1 - beta)]), dim=0)
        return beta * _p_log_ratio(q, logq, logm).sum(-1) + (1 - beta) * _p_log_ratio(p, logp, logm).sum(-1)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "hellinger":
        return ((0.5 * logp).exp() - (0.5 * logq).exp()).pow(2).sum(-1)
    if kind == "chi2":
        qs = torch.where(q > 0, q, torch.ones_like(q))
        term = torch.where(q > 0, (p - q).pow(2) / qs, torch.where(p > 0, zero + math.inf, zero))
        return term.sum(-1)
    if kind == "alpha":
        # Σ [p^α q^(1−α) − α p − (1−α) q] / (α(α−1)): the same sum (Σp = Σq = 1) written term by term,
        # in float64, so that it does not cancel catastrophically near α ∈ {0, 1}
        both = (p > 0) | (q > 0)
        lp, lq = logp.double(), logq.double()
        mixed = torch.where(both, alpha * lp + (1 - alpha) * lq, torch.full_like(lp, -math.inf))
        term = mixed.exp() - alpha * lp.exp() - (1 - alpha) * lq.exp()
        return (term.sum(-1) / (alpha * (alpha - 1))).to(logp.dtype)
    raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}")


def divergence(student_logits, teacher_logits, *, kind="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0,
               targets=None, ignore_index=-100, logit_softcap=None, logit_scale=1.0, teacher_logit_softcap=None,
               teacher_logit_scale=1.0):
    """Per-token divergence [...] between softmax(z_student) and softmax(z_teacher), each z = c·tanh(s·ℓ/c)/T
    with that model's cap and scale; 0 at ignored tokens."""
    logp = torch.log_softmax(_scaled(student_logits, temperature, logit_softcap, logit_scale), dim=-1)
    logq = torch.log_softmax(_scaled(teacher_logits, temperature, teacher_logit_softcap, teacher_logit_scale), dim=-1)
    d = divergence_from_logprobs(logp, logq, kind, beta, alpha)
    mask = _mask(targets, ignore_index, d.shape, d.device)
    return torch.where(mask, d, torch.zeros_like(d))


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                      teacher_bias=None, **kwargs):
    return divergence(_linear_logits(student_hidden, student_weight, student_bias),
                      _linear_logits(teacher_hidden, teacher_weight, teacher_bias), **kwargs)


def kl_penalty(logp, ref_logp, *, estimator="k3", clamp=20.0):
    """Sampled-token KL estimators of x = clamp(logp − ref_logp, ±clamp); "<name>+" = value of <name>,
    gradient of k2 (straight-through)."""
    straight = estimator.endswith("+")
    name = estimator[:-1] if straight else estimator
    x = logp - ref_logp
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    if name == "k1":
        value = x
    elif name == "k2":
        value = 0.5 * x * x
    elif name == "k3":
        value = torch.exp(-x) + x - 1
    elif name == "abs":
        value = x.abs()
    else:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS} or with a '+' suffix, got {estimator!r}")
    if straight:
        k2 = 0.5 * x * x
        value = k2 + (value - k2).detach()
    return value


def linear_policy_ref_stats(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                            temperature=1.0, ignore_index=-100, logit_softcap=None, logit_scale=1.0,
                            ref_logit_softcap=None, ref_logit_scale=1.0):
    """dict(logp, ref_logp, entropy, kl_full) per token; kl_full = KL(policy‖reference) over the full
    vocabulary; no gradient to the reference.  Each model's logits z = c·tanh(s·ℓ/c)/T."""
    z = _scaled(_linear_logits(hidden, weight, bias), temperature, logit_softcap, logit_scale)
    with torch.no_grad():
        zr = _scaled(_linear_logits(ref_hidden, ref_weight, ref_bias), temperature, ref_logit_softcap, ref_logit_scale)
    logsm = torch.log_softmax(z, -1)
    ref_logsm = torch.log_softmax(zr, -1)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets)).unsqueeze(-1)
    p = logsm.exp()
    out = {
        "logp": logsm.gather(-1, safe).squeeze(-1),
        "ref_logp": ref_logsm.gather(-1, safe).squeeze(-1),
        "entropy": -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1),
        "kl_full": _p_log_ratio(p, logsm, ref_logsm).sum(-1),
    }
    return {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in out.items()}
