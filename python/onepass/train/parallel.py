"""Data parallelism for the trainers: ``parallel: none | ddp | fsdp2`` under torchrun.

``torchrun --nproc-per-node N -m onepass.train grpo --config c.yaml parallel=ddp`` starts N processes
(backend gloo for CPU tensors, NCCL for CUDA tensors).  Each rank takes ``train.prompts_per_step / N``
whole prompts of the step (a group never spans ranks), samples, scores and computes its loss; what the
trainer needs across ranks is here:

- the policy and its algorithm's loss are one module (``PolicyLoss``) so that the loss runs inside a
  forward that the wrapper sees: DDP (``torch.nn.parallel.DistributedDataParallel``, replicated weights,
  gradients all-reduced) or FSDP2 (``fully_shard`` on each decoder layer, then on ``PolicyLoss``: the
  embeddings, final norm and LM head form the root group, all-gathered for the loss's forward and
  backward, so the fused loss sees the full [V, D] head and its gradient is reduce-scattered to the
  shards);
- both wrappers average gradients over ranks, so a micro-batch's loss is multiplied by the world size
  (see ``Trainer._accumulate``: each micro-batch carries its exact share of the global normalizer);
- frozen models (reference, teacher) are replicated on every rank: no gradients, no communication;
- scalar reductions (sums, maxima) and the rewards gathered for batch-level advantages.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PolicyLoss(nn.Module):
    """The policy ``model`` and ``algorithm.loss`` as one module: ``forward(micro)`` returns
    ``algorithm.loss(model, micro)`` (the loss of a micro-batch with its own aggregation, and its metrics);
    ``forward(call=fn)`` returns ``fn(model)`` (generation, old log-probs: FSDP2 gathers the root group's
    parameters for any forward of the root module, and needs the root's forward to come first)."""

    def __init__(self, model: nn.Module, algorithm):
        super().__init__()
        self.model = model
        self.algorithm = algorithm

    def forward(self, micro=None, call=None):
        if call is not None:
            return call(self.model)
        return self.algorithm.loss(self.model, micro)


class Parallel:
    """This process's place in the job (``mode``, ``rank``, ``world``) and the collectives the trainer uses.
    With ``mode="none"`` everything is the identity (rank 0 of 1)."""

    def __init__(self, mode: str):
        self.mode, self.rank, self.world, self.owns_group = mode, 0, 1, False
        if mode == "none":
            return
        if not dist.is_initialized():
            missing = [k for k in TORCHRUN_ENV if k not in os.environ]
            if missing:
                raise ConfigError(f"parallel: {mode} needs a torchrun launch (torchrun --nproc-per-node N -m "
                                  f"onepass.train ...): the environment variables {missing} are not set")
            dist.init_process_group("cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo")
            self.owns_group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def close(self) -> None:
        """Destroy the process group if this object created it (a torchrun launch)."""
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max of ``values`` over ranks (float64), in one collective."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The ranks' equally shaped tensors concatenated along dim 0, in rank order."""
        if not self.distributed:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def local_slice(self, n_global: int) -> slice:
        """This rank's part of ``n_global`` items split in equal consecutive blocks."""
        k = n_global // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    # -- the policy under DDP / FSDP2 -------------------------------------------------------------------
    def wrap(self, model: nn.Module, algorithm) -> nn.Module:
        """``PolicyLoss(model, algorithm)``, wrapped for ``mode`` (called before the optimizer is built:
        FSDP2 replaces the parameters by sharded DTensors)."""
        module = PolicyLoss(model, algorithm)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
        if self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(next(model.parameters()).device.type, (self.world,))
            layer_types = tuple(getattr(model, "_no_split_modules", None) or ())
            layers = [m for m in model.modules() if type(m).__name__ in layer_types]
            if not layers:
                raise ValueError(f"parallel: fsdp2: {type(model).__name__} names no decoder-layer class "
                                 "(_no_split_modules) to shard")
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
        return module

    def call(self, wrapped: nn.Module, fn):
        """``fn(model)`` for uses of the policy besides the loss (generation, old log-probs); under FSDP2 inside
        the wrapped module's forward, where the embeddings, norm and LM head are unsharded."""
        if self.mode == "fsdp2":
            return wrapped(call=fn)
        return fn(wrapped.module.model if self.mode == "ddp" else wrapped.model)

    def accumulating(self, wrapped: nn.Module, sync: bool):
        """Context for a micro-batch's backward: DDP skips the gradient all-reduce unless ``sync``."""
        if self.mode == "ddp" and not sync:
            return wrapped.no_sync()
        return contextlib.nullcontext()


def full_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float (a DTensor under FSDP2)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def check_divisible(prompts_per_step: int, mini_batch_size: int, world: int) -> None:
    """Each rank takes whole prompts (groups) and an equal share of every mini-batch."""
    if prompts_per_step % world:
        raise ConfigError(f"train.prompts_per_step ({prompts_per_step}) must be divisible by the world size "
                          f"({world}): each rank takes whole prompts (groups)")
    if mini_batch_size and mini_batch_size % world:
        raise ConfigError(f"train.mini_batch_size ({mini_batch_size}) must be divisible by the world size ({world})")
