"""Family ``group_advantages``: ``onepass.group_advantages`` (GRPO, ragged groups given by shuffled
group ids) vs the plain-PyTorch reference.  Memory-bound and tiny; listed for completeness."""
from __future__ import annotations

import torch

import onepass
from onepass import reference

from .registry import family, onepass_backend, randn


def make_inputs(shape, dtype, device, gen):
    n, g = shape["N"], shape["G"]
    ids = torch.randperm(n, generator=gen) % (n // g)
    return {"rewards": randn((n,), dtype, device, gen), "group_ids": ids.to(device)}


def run_onepass(x):
    return onepass.group_advantages(x["rewards"], group_ids=x["group_ids"], backend=onepass_backend())


def run_naive(x):
    return reference.group_advantages(x["rewards"], group_ids=x["group_ids"])


FAMILIES = [family(
    "group_advantages", op="group_advantages", make_inputs=make_inputs,
    providers={"onepass": run_onepass, "naive": run_naive},
    shapes={"cpu": [{"N": 4096, "G": 8}], "cuda": [{"N": 65536, "G": 16}], "quick": [{"N": 64, "G": 8}]},
    order=90, grad_inputs=(), passes=("fwd",), sweep="N",
)]
