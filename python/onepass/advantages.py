"""``onepass.group_advantages``: group-relative advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline,
pass@k GRPO, OPO, GPG, ReMax) and ``onepass.reinforce_pp_returns`` (REINFORCE++ on token rewards).

The math, per group g of n_g members with rewards r (mean_g, std_g over the group; std_g unbiased,
i.e. with Bessel's correction, as ``torch.std`` in TRL/verl/OpenRLHF):

============================  ==================================================================
``estimator="grpo"``          ``scale="group"``: (r − mean_g) / (std_g + eps)
                              ``scale="batch"``: (r − mean_g) / (std_batch + eps), std_batch the
                              unbiased std of all B rewards (TRL ``scale_rewards="batch"``)
                              ``scale="none"``:  r − mean_g
``estimator="dr_grpo"``       r − mean_g
``estimator="rloo"``          r − (Σ_g r − r)/(n_g − 1) = (r − mean_g) · n_g/(n_g − 1);
                              ``normalize=True``: then (a − mean)/(std + eps) over the members of the
                              groups of ≥ 2 (unbiased std; TRL RLOO ``normalize_advantages``)
``estimator="reinforce_pp"``  x = r − mean_g, then whitened over the batch (REINFORCE++-baseline):
                              (x − μ)·rsqrt(max(v, 1e-8)) (``variance="biased"``, OpenRLHF) or
                              (x − μ)·rsqrt(v·N/(N − 1) + 1e-8) (``"unbiased"``, verl), μ and v the
                              mean and biased variance over the B samples (``whiten="sample"``: each
                              counts once) or over the response tokens of ``mask`` (``"token"``: each
                              sample weighs its length, N tokens; verl / OpenRLHF; returns [B, T])
``estimator="grpo_passk"``    the best member of each group (unique maximum) gets
                              (r_max − r_second) / (std_g + eps) (``scale="none"``: no division),
                              the others 0; a tie for the best gives 0 (verl ``grpo_passk``)
``estimator="opo"``           r − Σ_g |y|·r / Σ_g |y|, |y| the response ``lengths`` (verl ``opo``)
``estimator="gpg"``           α·(r − mean_g), α = B / max(#{r ≠ 0}, 1) (verl ``gpg``; its f_norm = 1)
``estimator="remax"``         r − b, b the reward of the greedy response (``baselines``; no groups)
============================  ==================================================================

``scale`` only applies to ``"grpo"`` and ``"grpo_passk"``.  A group of one gets 0 (``singleton="zero"``;
its std is undefined, no NaN is produced; with REINFORCE++ its x = 0 counts in the whitening statistics)
or verl's value (``singleton="verl"``: mean r, std 1).  Groups whose rewards are all equal get exactly 0.
NaN rewards raise, or are left out of their group and of every batch statistic and get 0
(``nan_rewards="exclude"``, TRL's unscorable completions; α, B, std_batch and the whitening then count
the scorable rewards only).

Implementation: the backends' kernels (C++, CUDA, Triton, torch reference) compute grpo, dr_grpo, rloo
and per-sample biased REINFORCE++ with ``singleton="zero"``; everything else is composed over them in
float64 torch on every device (``onepass._ops.advantages``): the extra work is O(B) (O(B·T) to write the
[B, T] output of the token whitening), not worth kernels of its own.
"""
import math
from typing import Optional

import torch

from . import _dispatch
from ._contract import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES
from ._ops import advantages as _op
from ._validate import check_float

__all__ = ["group_advantages", "reinforce_pp_returns", "ESTIMATORS"]

#: Every estimator: the kernel ones (``ADVANTAGE_ESTIMATORS``), then those composed in torch over them.
ESTIMATORS = ADVANTAGE_ESTIMATORS + ("grpo_passk", "opo", "gpg", "remax")
SINGLETONS = ("zero", "verl")
NAN_REWARDS = ("raise", "exclude")
WHITENINGS = ("sample", "token")
VARIANCES = ("biased", "unbiased")


def group_advantages(rewards: torch.Tensor, *, group_size: Optional[int] = None,
                     group_ids: Optional[torch.Tensor] = None, estimator: str = "grpo",
                     scale: str = "group", eps: float = 1e-6, singleton: str = "zero", nan_rewards: str = "raise",
                     normalize: bool = False, baselines: Optional[torch.Tensor] = None,
                     lengths: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     whiten: str = "sample", variance: str = "biased", backend: str = "auto") -> torch.Tensor:
    """Group-relative advantages of B sampled completions.

    Args:
        rewards: [B] float32, float16, bfloat16 or float64 scalar rewards, finite (NaN allowed with
            ``nan_rewards="exclude"``).
        group_size: the groups are the consecutive blocks of ``group_size`` rewards (B must be a
            multiple of it), as TRL/verl lay out G completions per prompt.
        group_ids: [B] integer labels (any order, any values, ragged group sizes); give exactly one of
            ``group_size`` and ``group_ids`` (neither for ``"remax"``, which has no groups).
        estimator: one of ``ESTIMATORS`` (formulas in the module docstring: ``onepass.advantages``).
        scale: ``"group"``, ``"batch"`` or ``"none"``: the GRPO denominator; ``"grpo_passk"`` takes
            ``"group"`` (divide by std_g + eps) or ``"none"``; the other estimators ignore it.
        eps: added to the std in the GRPO / pass@k denominator, and in the RLOO ``normalize`` one (≥ 0).
        singleton: what a group of one gets: ``"zero"`` (0; TRL, OpenRLHF) or ``"verl"`` (verl's mean 0,
            std 1: r/(1 + eps) for GRPO with ``scale="group"``, α·r for GPG, r otherwise; REINFORCE++ whitens
            x = r).  ``"grpo_passk"`` rejects groups of one.
        nan_rewards: ``"raise"``, or ``"exclude"`` (TRL's unscorable completions): NaN rewards are left out of
            their group and of every batch statistic, and get advantage 0 (a group left with one scorable
            reward is a group of one).
        normalize: ``"rloo"`` only: whiten the advantages of the members of groups of ≥ 2 over the batch,
            (a − mean)/(std + eps) with the unbiased std (TRL ``RLOOConfig.normalize_advantages``, eps 1e-4);
            a group of one gets 0 (so not with ``singleton="verl"``).
        baselines: [B] float rewards of the greedy responses, required by ``"remax"`` (only).
        lengths: [B] response lengths (> 0, integer or float), required by ``"opo"`` (only).
        mask: [B, T] response mask (bool, or 0/1 integer/float), required by ``whiten="token"`` (only).
        whiten: ``"reinforce_pp"`` only: ``"sample"`` (each sequence counts once) or ``"token"`` (over the
            response tokens of ``mask``, each sequence weighs its length, as verl and OpenRLHF; returns
            [B, T], 0 on masked tokens).
        variance: ``"reinforce_pp"`` only: ``"biased"`` (rsqrt(max(var, 1e-8)), OpenRLHF) or ``"unbiased"``
            (rsqrt(var·N/(N − 1) + 1e-8), verl).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        [B] advantages ([B, T] with ``whiten="token"``), float32 (float64 for float64 rewards).  The kernel
        estimators (``grpo``, ``dr_grpo``, ``rloo``, and ``reinforce_pp`` whitened per sample with the
        biased variance) with the default options run on the backend's kernel, accumulated in float32
        (float64); the other estimators and options are composed in float64 torch over it on every
        backend.  Equal rewards within a group give exactly 0 (also with eps = 0).  The result carries no
        gradient (advantages are constants of the policy loss; ``rewards`` is detached).

    Deterministic: groups are formed with a stable sort and every reduction has a fixed order on all
    backends, so the same inputs give bitwise-identical outputs run after run.

    Raises:
        ValueError: NaN (with ``nan_rewards="raise"``) or infinite ``rewards``, both or neither of
            ``group_size``/``group_ids``, B not a multiple of ``group_size``, shape or device mismatch,
            unknown ``estimator``/``scale``/``singleton``/``nan_rewards``/``whiten``/``variance``, bad
            ``eps``, an option given to an estimator that does not take it, ``baselines``/``lengths``/
            ``mask`` missing where required or bad, ``"grpo_passk"`` with a group of one, too few samples
            or response tokens to whiten.
        TypeError: wrong tensor dtypes.
    """
    check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got shape {tuple(rewards.shape)}")
    B = rewards.shape[0]
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "remax" and group_size is None and group_ids is None:
        group_size = 1  # remax has no groups
    group_ids, size_arg = _check_groups(rewards, group_size, group_ids)
    _check_options(estimator, scale, singleton, nan_rewards, normalize, whiten, variance)
    if estimator == "grpo_passk" and size_arg == 1:
        raise ValueError("estimator='grpo_passk' needs at least 2 samples per group, got group_size=1")
    eps = float(eps)
    if not (eps >= 0.0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    baselines = _check_extra("baselines", baselines, estimator == "remax", "estimator='remax'", rewards)
    lengths = _check_extra("lengths", lengths, estimator == "opo", "estimator='opo'", rewards)
    mask = _check_extra("mask", mask, whiten == "token", "whiten='token'", rewards)
    name = _dispatch.resolve_backend(backend, rewards, "advantages", "group_advantages")
    rewards = rewards.detach().contiguous()
    if B and not torch.compiler.is_compiling():
        bad = torch.isinf(rewards) if nan_rewards == "exclude" else ~torch.isfinite(rewards)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"rewards must be finite, got {float(rewards[i])} at position {i}"
                             + ("" if nan_rewards == "exclude" else " (nan_rewards='exclude' leaves NaN out)"))
        _check_values(baselines, lengths, mask)
    return _op.group_advantages(rewards, group_ids=group_ids, group_size=size_arg, estimator=estimator, scale=scale,
                                eps=eps, singleton=singleton, nan_rewards=nan_rewards, normalize=normalize,
                                baselines=baselines, lengths=lengths, mask=mask, whiten=whiten, variance=variance,
                                backend=name)


def _check_groups(rewards, group_size, group_ids):
    """(contiguous group_ids or None, group_size or 0 when group_ids is given), validated."""
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
        return None, group_size
    _check_matches("group_ids", group_ids, "rewards", rewards)
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    return group_ids.contiguous(), 0


def _check_matches(arg, value, like_arg, like):
    """``value`` is a tensor with the shape and device of ``like``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != like.shape:
        raise ValueError(f"{arg} has shape {tuple(value.shape)} but {like_arg} has shape {tuple(like.shape)}: "
                         "they must match")
    if value.device != like.device:
        raise ValueError(f"{arg} is on {value.device} but {like_arg} is on {like.device}")


def _check_options(estimator, scale, singleton, nan_rewards, normalize, whiten, variance):
    for arg, value, allowed in (("scale", scale, ADVANTAGE_SCALES), ("singleton", singleton, SINGLETONS),
                                ("nan_rewards", nan_rewards, NAN_REWARDS), ("whiten", whiten, WHITENINGS),
                                ("variance", variance, VARIANCES)):
        if value not in allowed:
            raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if normalize and estimator != "rloo":
        raise ValueError(f"normalize=True applies to estimator='rloo' only, got estimator={estimator!r}")
    if normalize and singleton == "verl":
        raise ValueError("normalize=True gives a group of one 0 (it whitens the groups of >= 2 only): "
                         "it does not combine with singleton='verl'")
    if estimator != "reinforce_pp" and (whiten, variance) != ("sample", "biased"):
        raise ValueError(f"whiten and variance apply to estimator='reinforce_pp' only, got estimator={estimator!r} "
                         f"with whiten={whiten!r}, variance={variance!r}")
    if estimator == "grpo_passk" and scale == "batch":
        raise ValueError("estimator='grpo_passk' takes scale='group' or 'none', got scale='batch'")


def _check_extra(arg, value, required, user, rewards):
    """A [B] (``mask``: [B, T]) tensor argument that ``user`` needs and nothing else takes; contiguous."""
    if value is None:
        if required:
            raise ValueError(f"{user} needs {arg}")
        return None
    if not required:
        raise ValueError(f"{arg} is only used with {user}; leave it None otherwise")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    if arg == "baselines":
        check_float(arg, value)
    elif value.dtype.is_complex or (arg == "lengths" and value.dtype == torch.bool):
        raise TypeError(f"{arg} must be a real {'non-bool ' if arg == 'lengths' else ''}tensor, got {value.dtype}")
    B = rewards.shape[0]
    if (value.dim(), value.shape[0] if value.dim() else None) != (2 if arg == "mask" else 1, B):
        want = f"[B, T] = [{B}, T]" if arg == "mask" else f"[B] = [{B}]"
        raise ValueError(f"{arg} must have shape {want}, got {tuple(value.shape)}")
    if value.device != rewards.device:
        raise ValueError(f"{arg} is on {value.device} but rewards is on {rewards.device}")
    return value.detach().contiguous()


def _check_values(baselines, lengths, mask):
    if baselines is not None and not bool(torch.isfinite(baselines).all()):
        raise ValueError("baselines must be finite")
    if lengths is not None and not bool(((lengths > 0) & (lengths < math.inf)).all()):
        raise ValueError("lengths must be finite and > 0 (the response lengths)")
    if mask is not None and mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold 0/1 (or bool) values")


def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                         variance: str = "unbiased") -> torch.Tensor:
    """REINFORCE++ without a group baseline: discounted returns-to-go of per-token rewards, whitened over the
    batch's response tokens (verl ``reinforce_plus_plus``; OpenRLHF ``reinforce`` with ``variance="biased"``,
    the same where the masked tokens are trailing padding: OpenRLHF also discounts across masked tokens inside
    a response, verl and onepass skip them).

    G_t = r_t + γ·G_{t'} (t' the next response token), then (G − μ)·rsqrt(var·N/(N − 1) + 1e-8)
    (``"unbiased"``) or (G − μ)·rsqrt(max(var, 1e-8)) (``"biased"``), μ and var (biased) over the N
    response tokens.  Plain torch on every device, in float64 (a loop of T vectorized steps for the
    recurrence, as verl); no gradient.

    Args:
        token_rewards: [B, T] float rewards per token (e.g. the outcome reward on the last response token,
            plus KL shaping), finite.
        mask: [B, T] response mask (bool, or 0/1 integer/float), at least 2 response tokens (1 with
            ``variance="biased"``).
        gamma: the discount γ in [0, 1].
        variance: ``"unbiased"`` (verl) or ``"biased"`` (OpenRLHF).

    Returns:
        [B, T] float32 (float64 for float64 rewards) advantages, 0 on masked tokens.

    Raises:
        ValueError: shapes, non-finite rewards, mask values, gamma out of range, bad ``variance``, too few
            response tokens.
        TypeError: wrong tensor dtypes.
    """
    check_float("token_rewards", token_rewards)
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be [B, T], got shape {tuple(token_rewards.shape)}")
    _check_matches("mask", mask, "token_rewards", token_rewards)
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if not bool(torch.isfinite(token_rewards).all()):
        raise ValueError("token_rewards must be finite")
    _check_values(None, None, mask)
    return _op.reinforce_pp_returns(token_rewards.detach(), mask != 0, gamma, variance)
