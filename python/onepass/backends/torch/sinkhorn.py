"""Plain-PyTorch launcher of the Sinkhorn cost (``Cap.AUTOGRAD``): the banded cost plane from the
materialized probabilities and the oracle's cost matrices, differentiated by autograd (signature and
layout in ``onepass._ops.sinkhorn``; the chain-rule planes A, B of the kernels are 0 here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._contract import Cost
from ...reference.sinkhorn import cost_matrix


def sinkhorn_cost(a, b, lse_a, lse_b, inv_temp, group_size, kind):
    log_p = a.to(lse_a.dtype) * inv_temp - lse_a[:, None]
    log_q = b.to(lse_b.dtype) * inv_temp - lse_b[:, None]
    g = int(group_size)
    name = Cost(kind).name.lower()
    band = [F.pad(cost_matrix(log_p[s:s + g], log_q[s:s + g], name), (0, g - min(g, a.shape[0] - s)))
            for s in range(0, a.shape[0], g)]
    c = torch.cat(band)
    return torch.stack([c, torch.zeros_like(c), torch.zeros_like(c)])
