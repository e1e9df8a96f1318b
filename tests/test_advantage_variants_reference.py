"""The float64 advantage references (``onepass.reference.advantage_variants``) against the peers.

- verl (optional, ``importorskip``-style: its package ``__init__`` needs Ray, so ``core_algos`` is imported
  the same way as in ``test_policy_variants_reference``): each registered estimator called directly on
  token-level rewards (the outcome reward on the last response token).
- TRL (a test dependency): its GRPO / RLOO advantages are inline in the trainers' generation step, so they
  are restated below line by line from that code, with TRL's own ``nanstd``.
- OpenRLHF's estimators live in a Ray actor method; they are restated below from its definition.

Tolerances (relative to max(1, |peer|)): 1e-12 where the peer is float64 throughout; 1e-7 for TRL's
``nanstd`` (its Bessel factor count/(count − 1) is computed in float32) and verl's GRPO group of one
(r / (float32(1) + eps) is a float32 division); 1e-8 for verl's token whitening (its masked means divide
by count + 1e-8).
"""
import math
import types

import numpy as np
import pytest
import torch

from onepass.reference import advantage_variants as av

from _peers import import_peer
from test_policy_variants_reference import _close, _import_verl

F64 = torch.float64


def _batch(seed, B=13, T=9, singletons=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4][:B]) if singletons else torch.arange(B) // 3
    ids = ids[torch.randperm(B, generator=g)]  # ragged, shuffled groups (4 is a group of one)
    rewards = torch.randint(0, 3, (B,), generator=g).to(F64) + 0.25 * torch.randn(B, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    token_rewards = torch.zeros(B, T, dtype=F64)
    token_rewards[torch.arange(B), lengths - 1] = rewards
    return ids, rewards, mask, token_rewards, lengths


@pytest.fixture(scope="module")
def verl_core():
    return import_peer("verl", ["ray"], _import_verl).core


def _per_token(adv, mask):
    return adv[:, None] * mask if adv.dim() == 1 else adv


@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo_and_passk(verl_core, norm):
    ids, r, mask, tr, _ = _batch(1)
    peer, _ = verl_core.compute_grpo_outcome_advantage(tr, mask, ids.numpy(), epsilon=1e-6,
                                                       norm_adv_by_std_in_grpo=norm)
    ours = av.grpo(r, ids, eps=1e-6, scale="group" if norm else "none", singleton="verl")
    _close(_per_token(ours, mask), peer, 1e-7, "grpo")
    ids2, r2, mask2, tr2, _ = _batch(2, B=12, singletons=False)
    peer, _ = verl_core.compute_grpo_passk_outcome_advantage(tr2, mask2, ids2.numpy(),
                                                             config={"norm_adv_by_std_in_grpo": norm})
    _close(_per_token(av.grpo_passk(r2, ids2, norm_by_std=norm), mask2), peer, 1e-12, "grpo_passk")
    with pytest.raises(ValueError, match="at least 2"):
        av.grpo_passk(r, ids)


def test_verl_rloo_opo_gpg_remax(verl_core):
    ids, r, mask, tr, lengths = _batch(3)
    peer, _ = verl_core.compute_rloo_outcome_advantage(tr, mask, ids.numpy())
    _close(_per_token(av.rloo(r, ids, singleton="verl"), mask), peer, 1e-12, "rloo")
    peer, _ = verl_core.compute_opo_outcome_advantage(tr, mask, ids.numpy())
    _close(_per_token(av.opo(r, ids, lengths), mask), peer, 1e-12, "opo")
    peer, _ = verl_core.compute_gpg_outcome_advantage(tr.clone(), mask, ids.numpy())
    _close(_per_token(av.gpg(r, ids), mask), peer, 1e-12, "gpg")
    baselines = r + torch.randn(r.shape, dtype=F64)
    peer, _ = verl_core.compute_remax_outcome_advantage(tr, baselines, mask)
    _close(_per_token(av.remax(r, baselines), mask), peer, 1e-12, "remax")


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_verl_reinforce_plus_plus(verl_core, gamma):
    ids, r, mask, tr, _ = _batch(4)
    dense = tr + 0.1 * torch.randn(tr.shape, dtype=F64) * mask  # token-level rewards (e.g. KL shaping)
    peer, _ = verl_core.compute_reinforce_plus_plus_outcome_advantage(dense, mask,
                                                                     config=types.SimpleNamespace(gamma=gamma))
    _close(av.reinforce_pp(dense, mask, gamma=gamma), peer, 1e-8, "reinforce_plus_plus")
    peer, _ = verl_core.compute_reinforce_plus_plus_baseline_outcome_advantage(tr, mask, ids.numpy())
    _close(av.reinforce_pp_baseline(r, ids, mask), peer, 1e-8, "reinforce_plus_plus_baseline")


# ------------------------------------------------------------------------------------------------
# TRL (restated from the inline code of GRPOTrainer / RLOOTrainer._generate_and_score_completions)
# ------------------------------------------------------------------------------------------------
def _trl_grpo(rewards, G, scale):
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale != "batch" else \
        nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def _trl_rloo(rewards, G, normalize):
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, G)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    adv = rewards - ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def _nan_rewards(seed, groups=5, G=4):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(groups * G, generator=g, dtype=F64)
    r[[1, 5, 6, 7, 9]] = math.nan  # group 1 keeps a single scorable reward
    return r, torch.arange(groups * G) // G, G


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_grpo_with_unscorable_rewards(scale):
    r, ids, G = _nan_rewards(5)
    ours = av.grpo(r, ids, eps=1e-4, scale=scale, nan_rewards="exclude")
    _close(ours, _trl_grpo(r, G, scale), 1e-7, "TRL grpo")
    with pytest.raises(ValueError, match="NaN"):
        av.grpo(r, ids)


@pytest.mark.parametrize("normalize", [False, True])
def test_trl_rloo_with_unscorable_rewards(normalize):
    r, ids, G = _nan_rewards(6)
    _close(av.rloo(r, ids, normalize=normalize, nan_rewards="exclude"), _trl_rloo(r, G, normalize), 1e-7, "TRL rloo")


# ------------------------------------------------------------------------------------------------
# OpenRLHF (restated from ExperienceMaker.compute_advantages_and_returns: outcome reward, no KL shaping)
# ------------------------------------------------------------------------------------------------
def test_openrlhf_reinforce_baseline_and_group_norm():
    G = 4
    g = torch.Generator().manual_seed(7)
    r = torch.randn(6 * G, generator=g, dtype=F64)
    lengths = torch.randint(1, 10, (6 * G,), generator=g)
    mask = (torch.arange(9)[None, :] < lengths[:, None]).to(F64)
    ids = torch.arange(6 * G) // G
    grouped = r.view(-1, G)
    shaped = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    returns = shaped[:, None] * mask  # γ = 1: every response token's return is the outcome reward
    mean = (returns * mask).sum() / mask.sum()
    var = ((returns - mean) ** 2 * mask).sum() / mask.sum()
    peer = (returns - mean) * var.clamp(min=1e-8).rsqrt()
    _close(av.reinforce_pp_baseline(r, ids, mask, singleton="zero", variance="biased"), peer * mask, 1e-12, "reinforce_baseline")
    group_norm = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-9)).reshape(-1)
    _close(av.grpo(r, ids, eps=1e-9), group_norm, 1e-12, "group_norm")
    rloo = (grouped - (grouped.sum(-1, keepdim=True) - grouped) / (G - 1)).reshape(-1)
    _close(av.rloo(r, ids), rloo, 1e-12, "rloo")


def test_bad_arguments():
    ids, r, mask, _, _ = _batch(9)
    with pytest.raises(ValueError, match="singleton"):
        av.grpo(r, ids, singleton="drop")
    with pytest.raises(ValueError, match="nan_rewards"):
        av.rloo(r, ids, nan_rewards="skip")
    with pytest.raises(ValueError, match="singleton"):
        av.reinforce_pp_baseline(r, ids, mask, singleton="openrlhf")
    with pytest.raises(ValueError, match="variance"):
        av.token_whiten(r[:, None] * mask, mask, variance="sample")
    with pytest.raises(ValueError, match="group_ids"):
        av.grpo(r, ids[:-1])
    with pytest.raises(ValueError, match="scale"):
        av.grpo(r, ids, scale="global")
    assert np.isfinite(av.rloo(r, ids, normalize=True).numpy()).all()
