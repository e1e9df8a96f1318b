"""Plain-PyTorch launchers of the vocab-stats family (``Cap.AUTOGRAD``): the stats of the kernels
(docs/vocab_stats.md) from the materialized [N, V] log-softmax, differentiated by autograd; the
divergences are those of the oracle ``onepass.reference``.  The kernels' backward workspace columns
``Stat.SUM_A`` / ``Stat.SUM_B`` are 0 here.  Ignored rows (target < 0) are replaced by zeros before
anything is computed, so a NaN there reaches neither the outputs nor the gradients."""
from __future__ import annotations

import torch

from ..._contract import GRAD_STATS, Kind, Stat, stats_dtype
from ...reference.vocab import divergence_from_logprobs


def _log_softmax_rows(x, logit_map, model, live):
    z = logit_map.apply(x.to(stats_dtype(x)), model)
    if live is not None:
        z = torch.where(live[:, None], z, torch.zeros_like(z))
    return torch.logsumexp(z, -1), torch.log_softmax(z, -1)


def vocab_stats_fwd(a, b, targets, logit_map, kind, beta, alpha, need_entropy):
    """Stats [N, NUM_STATS] (float32, float64 for float64 inputs) of logits a [N, V] (and b [N, V]) mapped by
    ``logit_map`` (a ``LogitMap``)."""
    live = targets >= 0 if targets is not None else None
    y = targets.clamp_min(0)[:, None] if targets is not None else None
    cols = {}  # Stat -> [N]; a dict, not a list indexed by the IntEnum, which torch.compile cannot trace
    cols[Stat.LSE_A], la = _log_softmax_rows(a, logit_map, 0, live)
    if need_entropy:
        p = la.exp()
        cols[Stat.ENTROPY] = -(p * torch.where(p > 0, la, torch.zeros_like(la))).sum(-1)
    if y is not None:
        cols[Stat.LOGP_A] = la.gather(-1, y)[:, 0]
    if b is not None:
        cols[Stat.LSE_B], lb = _log_softmax_rows(b, logit_map, 1, live)
        if y is not None:
            cols[Stat.LOGP_B] = lb.gather(-1, y)[:, 0]
        if kind != Kind.NONE:
            div = divergence_from_logprobs(la, lb, Kind(kind).name.lower(), beta, alpha)
            # NaN policy: a row with a NaN logit or no finite logit has a NaN divergence
            normalized = torch.isfinite(cols[Stat.LSE_A]) & torch.isfinite(cols[Stat.LSE_B])
            cols[Stat.DIV] = torch.where(normalized, div, torch.full_like(div, float("nan")))
    zero = a.new_zeros(a.shape[0], dtype=stats_dtype(a))
    stats = torch.stack([cols.get(stat, zero) for stat in Stat], -1)
    return stats if live is None else torch.where(live[:, None], stats, torch.zeros_like(stats))


def vocab_stats_bwd(a, b, targets, stats, grads, logit_map, kind, beta, alpha, need_grad_a, need_grad_b):
    """(dL/da | None, dL/db | None) by autograd of Σ grads · stats[:, GRAD_STATS]."""
    with torch.enable_grad():
        xa = a.detach().requires_grad_(need_grad_a)
        xb = b.detach().requires_grad_(need_grad_b) if b is not None else None
        st = vocab_stats_fwd(xa, xb, targets, logit_map, kind, beta, alpha, True)
        wanted = [x for x in (xa, xb) if x is not None and x.requires_grad]
        if not wanted:
            return None, None
        got = iter(torch.autograd.grad((st[:, list(GRAD_STATS)] * grads).sum(), wanted))
    return (next(got) if need_grad_a else None), (next(got) if xb is not None and need_grad_b else None)


def _logits(h, w, bias):
    dt = stats_dtype(h)
    z = h.to(dt) @ w.to(dt).T
    return z if bias is None else z + bias.to(dt)


def linear_vocab_stats_fwd(ha, wa, bias_a, hb, wb, bias_b, targets, logit_map, kind, beta, alpha, need_entropy):
    """Stats of logits ha @ wa.T (+ bias_a) (and hb @ wb.T (+ bias_b)), materialized."""
    b = _logits(hb, wb, bias_b) if hb is not None else None
    return vocab_stats_fwd(_logits(ha, wa, bias_a), b, targets, logit_map, kind, beta, alpha, need_entropy)
