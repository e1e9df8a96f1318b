"""The group-advantages op: ``onepass::group_advantages`` (a custom op without gradient: advantages are
constants of the policy loss).

Two layers:

- the backends' ``group_advantages`` launchers (C++, CUDA, Triton kernels and the torch reference) compute
  the kernel estimators ``ADVANTAGE_ESTIMATORS`` with their kernel conventions (a group of one gets 0,
  REINFORCE++ whitened per sample with the biased variance).  Every launcher takes contiguous ``rewards``
  [B] (fp32/fp16/bf16/fp64), the groups in CSR form (``perm`` [B] int64 or None for consecutive groups,
  ``offsets`` [S+1] int64, ``max_n`` the size of the largest group), the estimator and scale codes
  (positions in ``ADVANTAGE_ESTIMATORS`` / ``ADVANTAGE_SCALES``) and ``eps``; it returns the advantages
  [B] (float32, float64 for float64 rewards).
- this module composes them, in plain torch on every device, into the other estimators and options
  (``grpo_passk``, ``opo``, ``gpg``, ``remax``; ``singleton``, ``nan_rewards``, ``normalize``, ``whiten``,
  ``variance``).  These are O(B) (token whitening O(B·T) for its [B, T] output) and memory-bound: no
  kernel of their own.  The torch part computes in float64 (it is O(B)) and casts to the output dtype;
  every reduction is a fixed-order one (``torch.segment_reduce`` over the stable-sorted members, full
  ``sum``), so the results are deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._contract import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, stats_dtype
from .._dispatch import launcher

#: Variance floor of the REINFORCE++ whitening (verl adds it to the unbiased variance; OpenRLHF and the
#: kernels clamp the biased variance at it).
WHITEN_VAR_FLOOR = 1e-8


def segments(rewards: torch.Tensor, group_size: int | None, group_ids: torch.Tensor | None):
    """(perm, offsets, max_n): ``perm`` [B] int64 lists the members segment by segment (None when the
    groups are the consecutive blocks of ``group_size``), ``offsets`` [S+1] int64 the segment bounds in
    it.  Segments are the distinct ``group_ids`` in increasing order; members keep their batch order
    (stable sort), so every later reduction has a fixed order."""
    B = rewards.numel()
    device = rewards.device
    if group_ids is None:
        offsets = torch.arange(0, B + 1, group_size, dtype=torch.int64, device=device)
        return None, offsets, int(group_size)
    ids = group_ids.reshape(-1)
    _, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
    perm = torch.sort(inverse, stable=True).indices.to(torch.int64).contiguous()
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    max_n = int(counts.max()) if counts.numel() else 0
    return perm, offsets, max_n


class _Groups:
    """The CSR groups of a batch with the per-member segment index, for the torch-composed estimators."""

    def __init__(self, perm, offsets):
        self.perm, self.offsets = perm, offsets
        self.counts = offsets.diff()
        sorted_segment = torch.repeat_interleave(torch.arange(self.counts.numel(), device=offsets.device),
                                                 self.counts)
        self.segment = sorted_segment if perm is None else torch.empty_like(sorted_segment).index_put_(
            (perm,), sorted_segment)
        self.size = self.counts[self.segment]  # [B] size of each member's group

    def reduce(self, values: torch.Tensor, how: str) -> torch.Tensor:
        """Per-member ``how`` ("sum" or "max") of the member's group, [B]; fixed reduction order."""
        return torch.segment_reduce(self._ordered(values), how, offsets=self.offsets)[self.segment]

    def first(self, values: torch.Tensor) -> torch.Tensor:
        """Per-member value of its group's first member, [B] (a shift: equal values then cancel exactly)."""
        return self._ordered(values)[self.offsets[:-1]][self.segment]

    def _ordered(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.perm is None else values[self.perm]


def _whiten(x: torch.Tensor, weights: torch.Tensor, variance: str) -> torch.Tensor:
    """(x − μ)·s over the batch, each x weighted by ``weights`` (1 per sample or token, or the sample's token
    count), float64:
    μ = Σ w x / Σ w, v = Σ w (x − μ)² / Σ w; s = rsqrt(max(v, 1e-8)) (``"biased"``) or
    rsqrt(v·N/(N − 1) + 1e-8) with N = Σ w (``"unbiased"``)."""
    total = weights.sum()
    if float(total) < (2 if variance == "unbiased" else 1):
        raise ValueError(f"the REINFORCE++ whitening with variance={variance!r} needs at least "
                         f"{2 if variance == 'unbiased' else 1} samples (whiten='sample') or response tokens "
                         f"in mask, got {float(total):g}")
    mu = (weights * x).sum() / total
    var = (weights * (x - mu) ** 2).sum() / total
    if variance == "biased":
        return (x - mu) * var.clamp_min(WHITEN_VAR_FLOOR).rsqrt()
    return (x - mu) * (var * total / (total - 1) + WHITEN_VAR_FLOOR).rsqrt()


def _composed(rewards, group_ids, group_size, estimator, scale, eps, singleton, normalize, baselines, lengths,
              mask, whiten, variance, backend) -> torch.Tensor:
    """Advantages of finite ``rewards`` (see ``onepass.group_advantages``), [B] or [B, T] (``whiten="token"``)."""
    out_dtype = stats_dtype(rewards)
    r = rewards.to(torch.float64)
    if estimator == "remax":
        return (r - baselines.to(torch.float64)).to(out_dtype)
    perm, offsets, max_n = segments(rewards, group_size if group_ids is None else None, group_ids)
    run = launcher("advantages", backend).group_advantages

    def kernel(name: str, scale_name: str = "group") -> torch.Tensor:
        return run(rewards, perm, offsets, max_n, ADVANTAGE_ESTIMATORS.index(name), ADVANTAGE_SCALES.index(scale_name),
                   eps)

    kernel_only = singleton == "zero" and not normalize and (
        estimator in ("grpo", "dr_grpo", "rloo") or (estimator == "reinforce_pp" and whiten == "sample"
                                                      and variance == "biased"))
    if kernel_only:
        return kernel(estimator, scale)
    groups = _Groups(perm, offsets)
    alone = groups.size == 1
    lone_value = r  # what a group of one gets with singleton="verl"
    if estimator in ("grpo", "dr_grpo", "rloo"):
        adv = kernel(estimator, scale).to(torch.float64)
        if estimator == "grpo" and scale == "group":
            lone_value = r / (1.0 + eps)
    elif estimator == "reinforce_pp":
        adv = kernel("dr_grpo").to(torch.float64)  # x = r − mean_g, whitened below
    elif estimator == "gpg":
        alpha = r.numel() / torch.count_nonzero(r).clamp_min(1).to(torch.float64)
        adv = alpha * kernel("dr_grpo").to(torch.float64)
        lone_value = alpha * r
    elif estimator == "opo":
        weight = lengths.to(torch.float64)
        centered = r - groups.first(r)  # around the first member: equal rewards give exactly 0
        adv = centered - groups.reduce(weight * centered, "sum") / groups.reduce(weight, "sum")
    elif estimator == "grpo_passk":
        if bool((groups.counts < 2).any()):
            raise ValueError("estimator='grpo_passk' needs at least 2 samples in every group (group_size/group_ids), "
                             f"got a group of {int(groups.counts.min())}")
        adv = _passk(r, groups, scale, eps)
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    adv = torch.where(alone, lone_value if singleton == "verl" else 0.0, adv)
    if normalize:  # rloo: whiten the members of groups of ≥ 2 over the batch, unbiased std + eps
        pooled = ~alone
        count = pooled.sum()
        mu = torch.where(pooled, adv, 0.0).sum() / count
        std = (torch.where(pooled, (adv - mu) ** 2, 0.0).sum() / (count - 1)).sqrt()
        denom = std + eps
        adv = torch.where(pooled & (denom > 0), (adv - mu) / denom, 0.0)  # denom = 0: equal advantages
    if estimator == "reinforce_pp":
        weights = torch.ones_like(r) if whiten == "sample" else (mask != 0).sum(dim=1).to(torch.float64)
        adv = _whiten(adv, weights, variance)
        if singleton == "zero":
            adv = torch.where(alone, 0.0, adv)
        if whiten == "token":
            return (adv[:, None] * (mask != 0)).to(out_dtype)
    return adv.to(out_dtype)


def _passk(r: torch.Tensor, groups: _Groups, scale: str, eps: float) -> torch.Tensor:
    """verl's pass@k GRPO: the group's best member gets (r_max − r_second) [/ (std_g + eps)], the others 0
    (a tie for the best gives 0 to everyone: r_max − r_second = 0)."""
    best = groups.reduce(r, "max")
    is_best = r == best
    unique_best = is_best & (groups.reduce(is_best.to(torch.float64), "sum") == 1)
    second = groups.reduce(torch.where(is_best, -torch.inf, r), "max")
    gap = torch.where(unique_best, best - torch.where(unique_best, second, best), 0.0)
    if scale == "none":
        return gap
    mean = groups.reduce(r, "sum") / groups.size
    std = (groups.reduce((r - mean) ** 2, "sum") / (groups.size - 1)).sqrt()
    return torch.where(gap != 0, gap / (std + eps), 0.0)  # std > 0 wherever gap ≠ 0; 0/0 (eps = 0) avoided


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ·G_{t'} over the response tokens (t' the next one; masked tokens are skipped and get 0),
    float64 [B, T]: one vectorized step per position, as verl (a linear recurrence over T)."""
    r = token_rewards.to(torch.float64)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = torch.where(mask[:, t], r[:, t] + gamma * running, running)
        out[:, t] = torch.where(mask[:, t], running, 0.0)
    return out


def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float, variance: str) -> torch.Tensor:
    """Whitened discounted returns of validated ``token_rewards`` [B, T] over the response tokens of the bool
    ``mask`` [B, T]; float32 (float64 for float64 rewards), 0 on masked tokens."""
    returns = returns_to_go(token_rewards, mask, gamma)
    tokens = returns[mask]
    out = torch.zeros_like(returns)
    out[mask] = _whiten(tokens, torch.ones_like(tokens), variance)
    return out.to(stats_dtype(token_rewards))


@torch.library.custom_op("onepass::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_ids: Optional[torch.Tensor], group_size: int,
                         estimator: str, scale: str, eps: float, singleton: str, nan_rewards: str, normalize: bool,
                         baselines: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], whiten: str, variance: str, backend: str) -> torch.Tensor:
    out_shape = tuple(mask.shape) if whiten == "token" else (rewards.numel(),)
    if rewards.numel() == 0:
        return rewards.new_zeros(out_shape, dtype=stats_dtype(rewards))
    options = dict(estimator=estimator, scale=scale, eps=eps, singleton=singleton, normalize=normalize,
                   whiten=whiten, variance=variance, backend=backend)
    scorable = ~torch.isnan(rewards)
    if nan_rewards == "raise" or bool(scorable.all()):
        return _composed(rewards, group_ids, group_size, baselines=baselines, lengths=lengths, mask=mask, **options)
    # "exclude": the advantages of the scorable rewards alone, 0 for the others
    if group_ids is None:
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // group_size
    out = rewards.new_zeros(out_shape, dtype=stats_dtype(rewards))
    if bool(scorable.any()):
        def keep(t):
            return None if t is None else t[scorable]

        out[scorable] = _composed(rewards[scorable].contiguous(), group_ids[scorable], 0, baselines=keep(baselines),
                                  lengths=keep(lengths), mask=keep(mask), **options)
    return out


@_group_advantages_op.register_fake
def _(rewards, group_ids, group_size, estimator, scale, eps, singleton, nan_rewards, normalize, baselines, lengths,
      mask, whiten, variance, backend):
    shape = tuple(mask.shape) if whiten == "token" else tuple(rewards.shape)
    return rewards.new_empty(shape, dtype=stats_dtype(rewards))


def group_advantages(rewards: torch.Tensor, *, group_ids: Optional[torch.Tensor], group_size: int, estimator: str,
                     scale: str, eps: float, singleton: str = "zero", nan_rewards: str = "raise",
                     normalize: bool = False, baselines: Optional[torch.Tensor] = None,
                     lengths: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     whiten: str = "sample", variance: str = "biased", backend: str) -> torch.Tensor:
    """Advantages [B] ([B, T] with ``whiten="token"``) of validated ``rewards`` [B] (contiguous) with either
    ``group_ids`` [B] or ``group_size`` > 0 (consecutive groups; 0 when ``group_ids`` is given)."""
    return _group_advantages_op(rewards, group_ids, group_size, estimator, scale, eps, singleton, nan_rewards,
                                normalize, baselines, lengths, mask, whiten, variance, backend)
