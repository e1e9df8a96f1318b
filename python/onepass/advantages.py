"""``onepass.group_advantages``: group-relative advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++).

The math, per group g of n_g members with rewards r (mean_g, std_g over the group; std_g unbiased,
i.e. with Bessel's correction, as ``torch.std`` in TRL/verl/OpenRLHF):

============================  ==================================================================
``estimator="grpo"``          ``scale="group"``: (r − mean_g) / (std_g + eps)
                              ``scale="batch"``: (r − mean_g) / (std_batch + eps), std_batch the
                              unbiased std of all B rewards (TRL ``scale_rewards="batch"``)
                              ``scale="none"``:  r − mean_g
``estimator="dr_grpo"``       r − mean_g
``estimator="rloo"``          r − (Σ_g r − r)/(n_g − 1) = (r − mean_g) · n_g/(n_g − 1)
``estimator="reinforce_pp"``  x = r − mean_g, then (x − mean(x)) · rsqrt(max(var(x), 1e-8)), with
                              mean/var over the B samples and var the *biased* (population)
                              variance — OpenRLHF's REINFORCE++-baseline whitening
                              (``var.clamp(min=1e-8).rsqrt()``).  OpenRLHF whitens over tokens; here
                              each sample counts once.
============================  ==================================================================

``scale`` only applies to ``"grpo"`` (other estimators ignore it).  A group of one gets advantage 0
with every estimator (its std is undefined; no NaN is produced), and groups whose rewards are all
equal get exactly 0.
"""
import math
from typing import Optional

import torch

from . import _dispatch
from ._contract import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES
from ._ops import advantages as _op
from ._validate import check_float

__all__ = ["group_advantages"]


def group_advantages(rewards: torch.Tensor, *, group_size: Optional[int] = None,
                     group_ids: Optional[torch.Tensor] = None, estimator: str = "grpo",
                     scale: str = "group", eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Group-relative advantages of B sampled completions.

    Args:
        rewards: [B] float32, float16, bfloat16 or float64 scalar rewards, finite.
        group_size: the groups are the consecutive blocks of ``group_size`` rewards (B must be a
            multiple of it), as TRL/verl lay out G completions per prompt.
        group_ids: [B] integer labels (any order, any values, ragged group sizes); give exactly one of
            ``group_size`` and ``group_ids``.
        estimator: ``"grpo"``, ``"dr_grpo"``, ``"rloo"`` or ``"reinforce_pp"`` (formulas in the module
            docstring: ``onepass.advantages``).
        scale: ``"group"``, ``"batch"`` or ``"none"``: the GRPO denominator (ignored by the others).
        eps: added to the std in the GRPO denominator (≥ 0).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        [B] advantages, float32 (float64 for float64 rewards), accumulated in float32 (float64).
        A group of one gets 0; equal rewards within a group give exactly 0 (also with eps = 0).
        The result carries no gradient (advantages are constants of the policy loss; ``rewards`` is
        detached).

    Deterministic: groups are formed with a stable sort and every reduction has a fixed order on all
    backends, so the same inputs give bitwise-identical outputs run after run.

    Raises:
        ValueError: NaN/inf ``rewards``, both or neither of ``group_size``/``group_ids``, B not a
            multiple of ``group_size``, shape mismatch, unknown ``estimator``/``scale``, bad ``eps``.
        TypeError: wrong tensor dtypes.
    """
    check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got shape {tuple(rewards.shape)}")
    B = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (consecutive groups) and group_ids (labels), got "
                         + ("both" if group_size is not None else "neither"))
    if group_ids is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if B % group_size != 0:
            raise ValueError(f"the number of rewards B={B} is not a multiple of group_size={group_size}")
        size_arg = group_size
    else:
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        if group_ids.shape != rewards.shape:
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but rewards has shape "
                             f"{tuple(rewards.shape)}: they must match")
        if group_ids.device != rewards.device:
            raise ValueError(f"group_ids is on {group_ids.device} but rewards is on {rewards.device}")
        group_ids = group_ids.contiguous()
        size_arg = 0
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    eps = float(eps)
    if not (eps >= 0.0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    name = _dispatch.resolve_backend(backend, rewards, "advantages", "group_advantages")
    rewards = rewards.detach().contiguous()
    if B and not torch.compiler.is_compiling():
        bad = ~torch.isfinite(rewards)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"rewards must be finite, got {float(rewards[i])} at position {i}")
    return _op.group_advantages(rewards, group_ids=group_ids, group_size=size_arg, estimator=estimator, scale=scale,
                                eps=eps, backend=name)
