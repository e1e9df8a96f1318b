"""CPU launcher of the group-advantages kernel (``onepass._C.advantages_cpu``); signature in
``onepass._ops.advantages``."""
from __future__ import annotations

import torch

from ..._contract import stats_dtype
from .._common import compiled_module, dtype_code, ptr


def group_advantages(rewards, perm, offsets, max_n, estimator, scale, eps):
    out = torch.empty(rewards.numel(), dtype=stats_dtype(rewards), device=rewards.device)
    if rewards.numel() == 0:
        return out
    compiled_module().advantages_cpu(ptr(rewards), dtype_code(rewards), ptr(perm), ptr(offsets), offsets.numel() - 1,
                                     rewards.numel(), estimator, scale, float(eps), ptr(out))
    return out
