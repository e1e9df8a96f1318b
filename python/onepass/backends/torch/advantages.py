"""Plain-PyTorch launcher of the group advantages: the float64 formulas of ``onepass.reference``, with the
groups given back as labels; signature in ``onepass._ops.advantages``."""
from __future__ import annotations

import torch

from ..._contract import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES
from ...reference.advantages import group_advantages as _reference


def group_advantages(rewards, perm, offsets, max_n, estimator, scale, eps):
    names = dict(estimator=ADVANTAGE_ESTIMATORS[estimator], scale=ADVANTAGE_SCALES[scale], eps=eps)
    if perm is None:  # consecutive groups of max_n
        return _reference(rewards, group_size=max_n, **names)
    counts = offsets.diff()
    labels = torch.repeat_interleave(torch.arange(counts.numel(), device=rewards.device), counts)
    return _reference(rewards, group_ids=torch.empty_like(labels).index_put_((perm,), labels), **names)
