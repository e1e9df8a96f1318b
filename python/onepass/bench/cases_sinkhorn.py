"""Family ``sinkhorn``: ``onepass.sinkhorn_distance`` (SinKD setup: T=2, ε=0.1, 20 iterations, L1 cost)
over one group of G rows vs the naive reference (softmax materialized, torch.cdist p=1, log-domain
Sinkhorn, autograd) and POT (``ot.bregman.sinkhorn_log`` on torch tensors, the cost built by the naive
PyTorch code, the value <P, C>), all with the same cost, ε and iteration count."""
from __future__ import annotations

import onepass
from onepass import reference

from .registry import family, onepass_backend, randn

EPS, ITERS, TEMP = 0.1, 20, 2.0


def make_inputs(shape, dtype, device, gen):
    g, v = shape["G"], shape["V"]
    return {"student": randn((g, v), dtype, device, gen, scale=2.0),
            "teacher": randn((g, v), dtype, device, gen, scale=2.0)}


def run_onepass(x):
    return onepass.sinkhorn_distance(x["student"], x["teacher"], epsilon=EPS, n_iters=ITERS, cost="l1",
                                     temperature=TEMP, backend=onepass_backend())


def run_naive(x):
    return reference.sinkhorn_distance(x["student"], x["teacher"], epsilon=EPS, n_iters=ITERS, cost="l1",
                                       temperature=TEMP)


def run_pot(x):
    import ot
    import torch

    p = torch.softmax(x["student"].float() / TEMP, -1)
    q = torch.softmax(x["teacher"].float() / TEMP, -1)
    c = torch.cdist(p, q, p=1)
    w = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=c.dtype, device=c.device)
    plan = ot.bregman.sinkhorn_log(w, w, c, EPS, numItermax=ITERS, stopThr=-1.0, warn=False)
    return (plan * c).sum()


FAMILIES = [family(
    "sinkhorn", op="sinkhorn_distance", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive, "pot": run_pot},
    shapes={"cpu": [{"G": g, "V": v} for g, v in ((64, 32000), (256, 32000), (1024, 32000), (64, 151936),
                                                   (256, 151936))],
            "cuda": [{"G": g, "V": v} for g in (64, 256, 1024) for v in (32000, 151936)],
            "quick": [{"G": 8, "V": v} for v in (256, 512)]},
    default={"cpu": {"G": 64, "V": 32000}, "cuda": {"G": 1024, "V": 151936}},
    order=80, grad_inputs=("student", "teacher"),
    notes={"pot": "ot.bregman.sinkhorn_log on the naive cdist cost (same ε, 20 iterations)"},
)]
