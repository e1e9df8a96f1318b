"""Keyword sets of ``onepass.grpo_loss`` / ``onepass.policy_loss`` that reproduce a peer trainer's loss.

``trl_grpo(...)`` (TRL 1.16 ``GRPOTrainer``), ``verl_ppo(...)`` (verl 0.9 actor loss), ``openrlhf_ppo(...)``
(OpenRLHF 0.11 ``PolicyLoss`` + KL + entropy): functions of the trainer's config values (defaults are the
peer's config defaults) returning a dict of loss options::

    loss, metrics = onepass.grpo_loss(hidden, weight, targets, advantages, mask=mask, old_logp=old_logp,
                                      **onepass.presets.trl_grpo("dapo", num_items_in_batch=n_tokens))

Per-key provenance: docs/loss_variants.md §9-§10.  Tensors (old / reference / sampling log-probs and the
correction weights of ``onepass.corrections``) are passed separately.  Every preset is checked against the
peer itself (tests/test_policy_variants_reference.py) and the fused loss against the float64 reference
(tests/test_policy_variants_fused.py).
"""
from __future__ import annotations

import math

from .kl import KL_ALIASES

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
VERL_LOSS_MODES = ("vanilla", "gspo", "sapo", "cispo", "gpg", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "geo_mean",
                   "dro")


def trl_grpo(loss_type: str = "dapo", *, epsilon: float = 0.2, epsilon_high=None, delta=None,
             importance_sampling_level: str = "token", beta: float = 0.0, use_bias_correction_kl: bool = True,
             top_entropy_quantile: float = 1.0, off_policy_mask_threshold=None, entropy_coef: float = 0.0,
             sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
             vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
             vespo_lambda_neg: float = 2.0, max_completion_length=None, num_items_in_batch=None,
             num_processes: int = 1, gradient_accumulation_steps: int = 1, steps_per_generation=None,
             training: bool = True) -> dict:
    """``grpo_loss`` / ``policy_loss`` keywords reproducing ``trl.GRPOTrainer._compute_loss`` (TRL 1.16) for the given
    ``GRPOConfig`` values (defaults are TRL's).  ``num_items_in_batch`` (the generation batch's token
    count) is needed by dapo, cispo and vespo; ``max_completion_length`` by dr_grpo.  The vLLM IS ratio
    goes in ``token_weights`` (``onepass.corrections.trl_vllm_is_weights``), the old / sampling log-probs as tensors."""
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {TRL_LOSS_TYPES}, got {loss_type!r}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    gas = gradient_accumulation_steps if training else 1
    kw = dict(ratio_level=importance_sampling_level, log_ratio_clamp=None, epsilon_low=epsilon, epsilon_high=eps_high,
              ratio_cap=delta, beta=beta, kl_estimator="k3", kl_ratio_weight=use_bias_correction_kl,
              top_entropy_quantile=top_entropy_quantile, off_policy_threshold=off_policy_mask_threshold,
              entropy_coef=entropy_coef, entropy_agg="local-token-mean", loss_scale=1.0 / gas,
              empty_sequences="count", kl_log_ratio_clamp=None)
    kw["objective"] = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}.get(loss_type, "ppo_clip")
    if loss_type == "cispo":  # TRL caps the ratio at epsilon_high itself: clamp(r, max=ε_high)
        kw.update(epsilon_low=math.inf, epsilon_high=eps_high - 1.0)
    if loss_type == "sapo":
        kw.update(sapo_tau_pos=sapo_temperature_pos, sapo_tau_neg=sapo_temperature_neg)
    if loss_type == "vespo":
        kw.update(vespo_params=(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
    if loss_type in ("grpo", "sapo"):
        kw["loss_agg"] = "seq-mean-token-mean"
    elif loss_type == "bnpo":
        kw["loss_agg"] = "token-mean"
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        kw.update(loss_agg="seq-mean-token-sum-norm", horizon=max_completion_length)
    elif loss_type == "luspo":
        kw["loss_agg"] = "seq-mean-token-sum"
    else:  # dapo, cispo, vespo: Σ / (num_items_in_batch / processes · gas / steps_per_generation), not / gas
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={loss_type!r} needs num_items_in_batch")
        normalizer = max(float(num_items_in_batch), 1.0) / num_processes
        if training:
            normalizer = normalizer * gas / (gas if steps_per_generation is None else steps_per_generation)
        kw.update(loss_agg="token-mean", num_tokens=normalizer / gas)
    return kw


def verl_ppo(loss_mode: str = "vanilla", *, clip_ratio: float = 0.2, clip_ratio_low=0.2, clip_ratio_high=0.2,
             clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean", loss_scale_factor=None,
             entropy_coeff: float = 0.0, use_kl_loss: bool = False, kl_loss_coef: float = 0.001,
             kl_loss_type: str = "low_var_kl", tau_pos: float = 1.0, tau_neg: float = 1.05,
             clip_cov_ratio: float = 0.0002, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0,
             kl_cov_ratio: float = 0.0002, ppo_kl_coef: float = 0.1, dro_beta=None, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None) -> dict:
    """``grpo_loss`` / ``policy_loss`` keywords reproducing verl 0.9's actor loss
    (``verl.workers.utils.losses.ppo_loss``:
    the registered policy loss + entropy and KL terms, each through ``agg_loss``) for the given
    ``ActorConfig`` / ``PolicyLossConfig`` values (defaults are verl's; ``clip_ratio_c`` is the dual clip of
    vanilla and the truncation of dppo_*; ``clip_ratio`` only applies where ``clip_ratio_low`` / ``_high``
    are None, and ActorConfig defaults both to 0.2).  ``onepass.corrections.rollout_is_weights`` goes in
    ``token_weights``."""
    if loss_mode not in VERL_LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {VERL_LOSS_MODES}, got {loss_mode!r}")
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    kw = dict(epsilon_low=low, epsilon_high=high, log_ratio_clamp=20.0, loss_agg=loss_agg_mode,
              kl_agg=loss_agg_mode, entropy_agg=loss_agg_mode, num_tokens=batch_num_tokens,
              num_sequences=global_batch_size, horizon=loss_scale_factor, empty_sequences="exclude",
              loss_scale=float(dp_size), entropy_coef=entropy_coeff, beta=kl_loss_coef if use_kl_loss else 0.0,
              kl_estimator=kl_loss_type, kl_log_ratio_clamp=None)
    base = kl_loss_type.rstrip("+")
    if KL_ALIASES.get(base, base) == "k3":
        kw.update(kl_log_ratio_clamp=20.0, kl_value_clamp=10.0)
    objective = {"vanilla": "ppo_clip", "gspo": "ppo_clip", "gpg": "reinforce"}.get(loss_mode, loss_mode)
    kw["objective"] = objective
    if loss_mode == "vanilla":
        kw["dual_clip"] = clip_ratio_c
    elif loss_mode in ("gspo", "sapo"):  # verl aggregates these two as seq-mean-token-mean whatever the mode
        kw["loss_agg"] = "seq-mean-token-mean"
        if loss_mode == "gspo":
            kw.update(ratio_level="sequence-token", log_ratio_clamp=(None, 10.0))
        else:
            kw.update(sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg)
    elif loss_mode in ("dppo_tv", "dppo_kl"):
        kw["ratio_cap"] = clip_ratio_c
    elif loss_mode in ("clip_cov", "kl_cov", "geo_mean", "dro"):
        kw["log_ratio_clamp"] = None
        kw.update(cov_fraction=clip_cov_ratio, cov_bounds=(clip_cov_lb, clip_cov_ub), dro_beta=dro_beta)
        if loss_mode == "kl_cov":
            kw.update(cov_fraction=kl_cov_ratio, kl_cov_coef=ppo_kl_coef)
    return kw


def openrlhf_ppo(policy_loss_type: str = "ppo", *, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
                 dual_clip=None, token_level_loss: bool = True, kl_coef: float = 0.0, kl_estimator: str = "k1",
                 unbiased_gradient: bool = False, entropy_coef: float = 0.0, dp_size: int = 1,
                 batch_num_tokens=None, global_batch_size=None) -> dict:
    """``grpo_loss`` / ``policy_loss`` keywords reproducing OpenRLHF 0.11's actor loss (``PolicyLoss`` + the KL loss of
    ``compute_approx_kl`` and the entropy term, both aggregated per token by ``aggregate_loss``).  The
    train/rollout correction goes in ``token_weights`` (``onepass.corrections.rollout_is_weights`` with
    OpenRLHF's options);
    for gspo with a correction, pass the rollout log-probs as ``old_logp`` (as OpenRLHF does)."""
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
    gspo = policy_loss_type == "gspo"
    global_counts = batch_num_tokens is not None or global_batch_size is not None
    kw = dict(objective="ppo_clip", ratio_level="sequence" if gspo else "token",
              log_ratio_clamp=None if gspo else 20.0, epsilon_low=clip_eps_low, epsilon_high=clip_eps_high,
              dual_clip=dual_clip, loss_agg="token-mean" if token_level_loss and not gspo else "seq-mean-token-mean",
              kl_agg="token-mean", entropy_agg="token-mean", num_tokens=batch_num_tokens,
              num_sequences=global_batch_size, empty_sequences="exclude",
              loss_scale=float(dp_size) if global_counts else 1.0, beta=kl_coef, kl_estimator=kl_estimator,
              kl_value_clamp=10.0, kl_gradient="k2_is" if unbiased_gradient else "estimator",
              entropy_coef=entropy_coef, kl_log_ratio_clamp=None)
    if kl_estimator == "k3":
        kw["kl_log_ratio_clamp"] = (-10.0, None)
    return kw
