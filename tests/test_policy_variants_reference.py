"""The float64 policy-loss references (``onepass.reference.policy_variants``) against the peers' own code.

Every case draws fresh random per-token inputs (odd B and T, ragged masks, one fully masked row), runs the
peer's function and the reference with the peer's preset, and compares the loss, its gradient with
respect to ``logp`` and the peer's metrics in float64.

- TRL (a test dependency): ``GRPOTrainer._compute_loss`` itself, called on a stand-in trainer object
  that carries the config values, an identity accelerator and returns the given log-probs / entropies.
- verl and OpenRLHF are optional (not installable in CI without Ray / DeepSpeed / flash-attn): the tests
  ``importorskip`` them and import ``verl.trainer.ppo.core_algos`` / ``openrlhf.models.loss`` without
  running the packages' ``__init__`` (which pull in Ray, DeepSpeed, flash-attn); ``ray`` and
  ``deepspeed`` are stubbed only if they are missing.  verl's full actor loss
  (``verl.workers.utils.losses.ppo_loss``) needs a TensorDict batch, so its three terms are recombined
  here from verl's own ``policy_loss_fn`` + ``agg_loss`` + ``kl_penalty`` exactly as ``ppo_loss`` does.

Tolerances (relative to max(1, |peer|)): loss and gradient 1e-10 for TRL and OpenRLHF, 1e-7 for verl
(whose means divide by count + 1e-8 where the reference divides by the count); TRL's and verl's clip
fractions are computed in float32 by the peer (1e-6).
"""
import math
import types
import zlib
from collections import defaultdict

import pytest
import torch

from onepass import corrections, presets
from onepass.reference import policy_variants as pv

from _peers import import_peer

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def _seed(case):
    """A per-case seed that does not depend on PYTHONHASHSEED."""
    return zlib.crc32(repr(sorted(case.items())).encode())


def _inputs(seed, B=7, T=11, per_token_adv=False, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0  # a fully masked row
    lengths[2] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3.0 - 0.01
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    ref = (logp + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    rollout = (old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=F64) * 1.5
    # float32-representable: TRL takes the entropy quantile in float32
    entropy = (torch.rand(B, T, generator=g, dtype=F64) * 2.0).float().double()
    return dict(logp=logp, old=old, ref=ref, rollout=rollout, adv=adv, mask=mask, entropy=entropy)


def _loss_and_grad(fn, logp):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(x)
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), (torch.zeros_like(logp) if g is None else g), metrics


def _close(a, b, rtol, what):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    scale = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.0e} × {scale:.3g}"
    return err


def _compare(peer, ours, rtol, metric_map=(), metric_rtol=None):
    (pl, pg, pm), (ol, og, om) = peer, ours
    _close(ol, pl, rtol, "loss")
    _close(og, pg, rtol, "grad")
    for ours_name, peer_name in metric_map:
        _close(om[ours_name], pm[peer_name], metric_rtol or rtol, f"metric {ours_name} vs {peer_name}")


# ------------------------------------------------------------------------------------------------
# TRL: GRPOTrainer._compute_loss on a stand-in trainer
# ------------------------------------------------------------------------------------------------
class _Accelerator:
    num_processes, process_index, sync_gradients = 1, 0, True

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def _trl_loss(d, logp, cfg, is_ratio=None, sampling=None):
    from trl.trainer.grpo_trainer import GRPOTrainer

    eps_high = cfg.get("epsilon_high") or cfg.get("epsilon", 0.2)
    args = types.SimpleNamespace(delta=cfg.get("delta"), use_bias_correction_kl=cfg.get("use_bias_correction_kl", True),
                                 sapo_temperature_pos=cfg.get("sapo_temperature_pos", 1.0),
                                 sapo_temperature_neg=cfg.get("sapo_temperature_neg", 1.05),
                                 steps_per_generation=cfg.get("steps_per_generation",  # GRPOConfig: = gas
                                                              cfg.get("gradient_accumulation_steps", 1)),
                                 vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
    coef = cfg.get("entropy_coef", 0.0)
    accelerator = _Accelerator()
    accelerator.num_processes = cfg.get("num_processes", 1)  # this rank's share of num_items_in_batch
    trainer = types.SimpleNamespace(
        args=args, accelerator=accelerator, model=types.SimpleNamespace(training=True),
        top_entropy_quantile=cfg.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=cfg.get("off_policy_mask_threshold"),
        importance_sampling_level=cfg.get("importance_sampling_level", "token"), beta=cfg.get("beta", 0.0),
        loss_type=cfg["loss_type"], epsilon_low=cfg.get("epsilon", 0.2), epsilon_high=eps_high,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        current_gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
        max_completion_length=cfg.get("max_completion_length"), _entropy_bonus_enabled=coef != 0.0,
        use_adaptive_entropy=False, entropy_coef=coef, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights)
    trainer.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(trainer, e, m, t)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, d["entropy"], None)
    B, T = logp.shape
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=d["mask"],
                  advantages=d["adv"], old_per_token_logps=d["old"], ref_per_token_logps=d["ref"],
                  num_items_in_batch=d["mask"].sum().to(F64))
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


TRL_CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False, entropy_coef=0.01),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="bnpo", epsilon_high=0.28, delta=1.5),
    dict(loss_type="dr_grpo", max_completion_length=16, beta=0.02),
    dict(loss_type="dapo", epsilon_high=0.28, gradient_accumulation_steps=2, steps_per_generation=4, entropy_coef=0.01),
    dict(loss_type="dapo", top_entropy_quantile=0.4, entropy_coef=0.02, beta=0.04),
    dict(loss_type="cispo", num_processes=4, gradient_accumulation_steps=2),
    dict(loss_type="dapo", off_policy_mask_threshold=0.02, sampling=True),
    dict(loss_type="dapo", importance_sampling_level="sequence", is_mode="sequence_mask"),
    dict(loss_type="dapo", is_mode="token_truncate", is_min=0.5),
    dict(loss_type="dapo", is_mode="token_mask", is_min=0.7, is_max=1.5),
    dict(loss_type="dapo", is_mode="sequence_truncate", is_max=2.0),
    dict(loss_type="luspo", importance_sampling_level="sequence", gradient_accumulation_steps=3),
    dict(loss_type="cispo", epsilon_high=1.2, beta=0.04),
    dict(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence"),
    dict(loss_type="sapo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5, per_token_adv=True),
    dict(loss_type="vespo"),
    dict(loss_type="vespo", is_mode="token_truncate"),
]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_trl_grpo_loss(case):
    cfg = dict(case)
    per_token = cfg.pop("per_token_adv", False)
    d = _inputs(_seed(case), per_token_adv=per_token)
    sampling = d["rollout"] if cfg.pop("sampling", False) else None
    is_mode = cfg.pop("is_mode", None)
    is_min, is_max = cfg.pop("is_min", None), cfg.pop("is_max", 3.0)
    is_ratio = trl_ratio = None
    if is_mode is not None:
        is_ratio = corrections.trl_vllm_is_weights(d["old"], d["rollout"], d["mask"], mode=is_mode, clip_min=is_min,
                                          clip_max=is_max)
        trl_ratio = _trl_is_ratio(d, is_mode, is_min, is_max)  # 1, not 0, at masked positions
        assert trl_ratio.shape == is_ratio.shape
        _close(is_ratio, trl_ratio * (d["mask"] if is_ratio.shape[-1] > 1 else 1), 1e-12, "vLLM IS ratio")
    peer = _loss_and_grad(lambda x: _trl_loss(d, x, cfg, trl_ratio, sampling), d["logp"])
    kw = presets.trl_grpo(num_items_in_batch=d["mask"].sum(), **cfg)
    ours = _loss_and_grad(lambda x: pv.policy_loss(x, d["adv"], mask=d["mask"], old_logp=d["old"], ref_logp=d["ref"],
                                                   entropy=d["entropy"], token_weights=is_ratio,
                                                   sampling_logp=sampling, **kw), d["logp"])
    metric_map = [("entropy", "entropy")]
    if cfg.get("beta"):
        metric_map.append(("kl", "kl"))
    if cfg["loss_type"] in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") and \
            cfg.get("importance_sampling_level", "token") == "token":
        metric_map += [("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                       ("clip_region", "clip_ratio/region_mean")]
    if cfg["loss_type"] == "cispo" and cfg.get("importance_sampling_level", "token") == "token":
        metric_map.append(("cispo_clip", "cispo_clip_ratio"))
    # TRL computes its metrics, and the SAPO temperatures (torch.where of two Python floats), in float32
    _compare(peer, ours, 1e-6 if cfg["loss_type"] == "sapo" else 1e-10, metric_map, metric_rtol=1e-6)


def _trl_is_ratio(d, mode, clip_min, clip_max):
    """TRL's IS ratio as _generate_and_score_completions computes it (restated: it is inline there)."""
    diff = torch.nan_to_num((d["old"] - d["rollout"]) * d["mask"], nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    r = torch.exp(diff)
    if mode.endswith("truncate"):
        return r.clamp(min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return r.masked_fill((r < lo) | (r > hi), 0.0)


def test_trl_entropy_mask_and_off_policy_mask_match_trl():
    from trl.trainer.grpo_trainer import GRPOTrainer

    d = _inputs(5)
    trainer = types.SimpleNamespace(accelerator=_Accelerator())
    for q in (0.0, 0.2, 0.5, 1.0):
        ref = GRPOTrainer.get_high_entropy_mask(trainer, d["entropy"], d["mask"], 1 - q).to(F64)
        assert torch.equal(pv.high_entropy_mask(d["entropy"], d["mask"], q), ref)
    empty = torch.zeros_like(d["mask"])
    assert pv.high_entropy_mask(d["entropy"], empty, 0.2).sum() == 0
    adv = d["adv"].unsqueeze(1)
    for thr in (0.0, 0.05, 0.5):
        ref = GRPOTrainer.get_off_policy_mask(adv, d["logp"], d["rollout"], d["mask"], thr).to(F64)
        assert torch.equal(pv.off_policy_sequence_mask(d["logp"], d["rollout"], d["adv"], d["mask"], thr), ref)


# ------------------------------------------------------------------------------------------------
# verl (optional)
# ------------------------------------------------------------------------------------------------
def _import_verl():
    from verl.trainer.ppo import core_algos, rollout_corr_helper
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    return types.SimpleNamespace(core=core_algos, rc=rollout_corr_helper, ActorConfig=ActorConfig,
                                 PolicyLossConfig=PolicyLossConfig)


@pytest.fixture(scope="module")
def verl():
    return import_peer("verl", ["ray"], _import_verl)


def _verl_actor_loss(verl, d, logp, cfg, weights=None, info=None):
    """verl.workers.utils.losses.ppo_loss, recombined from verl's own functions (see the module doc)."""
    pl_keys = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")
    actor_keys = ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "loss_agg_mode",
                  "loss_scale_factor", "entropy_coeff", "use_kl_loss", "kl_loss_coef", "kl_loss_type", "tau_pos",
                  "tau_neg")
    policy_loss = verl.PolicyLossConfig(loss_mode=cfg.get("loss_mode", "vanilla"),
                                        **{k: cfg[k] for k in pl_keys if k in cfg})
    config = verl.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss,
                              **{k: cfg[k] for k in actor_keys if k in cfg})
    info = info or {}
    config.global_batch_info.update(dp_size=info.get("dp_size", 1), batch_num_tokens=info.get("batch_num_tokens"),
                                    global_batch_size=info.get("global_batch_size"),
                                    loss_scale_factor=config.loss_scale_factor)
    mask = d["mask"].bool()
    adv = d["adv"] if d["adv"].dim() == 2 else d["adv"][:, None] * d["mask"]
    fn = verl.core.get_policy_loss_fn(policy_loss.loss_mode)
    pg_loss, metrics = fn(old_log_prob=d["old"], log_prob=logp, advantages=adv, response_mask=mask,
                          loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=weights)
    loss = pg_loss
    if config.entropy_coeff != 0:
        loss = loss - config.entropy_coeff * verl.core.agg_loss(d["entropy"], mask, config.loss_agg_mode,
                                                                **config.global_batch_info)
    if config.use_kl_loss:
        kld = verl.core.kl_penalty(logp, d["ref"], config.kl_loss_type)
        loss = loss + config.kl_loss_coef * verl.core.agg_loss(kld, mask, config.loss_agg_mode,
                                                               **config.global_batch_info)
    return loss, metrics


VERL_METRICS = {"actor/pg_clipfrac": "clip_frac", "actor/ppo_kl": "ppo_kl", "actor/pg_clipfrac_lower": "dual_clip_frac"}
AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
VERL_CASES = (
    [dict(loss_mode="vanilla", loss_agg_mode=a) for a in AGG]
    + [dict(loss_mode="vanilla", clip_ratio_high=0.28, clip_ratio_c=2.0, weights="token", entropy_coeff=0.01),
       dict(loss_mode="vanilla", use_kl_loss=True, kl_loss_type="low_var_kl", info="global"),
       dict(loss_mode="vanilla", use_kl_loss=True, kl_loss_type="k3+", loss_agg_mode="seq-mean-token-sum-norm",
            loss_scale_factor=32, info="global"),
       dict(loss_mode="vanilla", use_kl_loss=True, kl_loss_type="mse", loss_agg_mode="seq-mean-token-mean"),
       dict(loss_mode="vanilla", use_kl_loss=True, kl_loss_type="abs", loss_agg_mode="token-sum", info="global"),
       dict(loss_mode="vanilla", use_kl_loss=True, kl_loss_type="kl", per_token_adv=True),
       dict(loss_mode="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4, spread=1e-3),
       dict(loss_mode="gspo", loss_agg_mode="token-mean", use_kl_loss=True, entropy_coeff=0.01, weights="sequence"),
       dict(loss_mode="sapo", tau_pos=1.0, tau_neg=1.05, loss_agg_mode="token-mean", entropy_coeff=0.02),
       dict(loss_mode="cispo", clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="seq-mean-token-sum"),
       dict(loss_mode="gpg", weights="token", info="global"),
       dict(loss_mode="dppo_tv", clip_ratio=0.1, spread=0.5),
       dict(loss_mode="dppo_kl", clip_ratio=0.02, clip_ratio_c=1.5, spread=0.5, per_token_adv=True),
       dict(loss_mode="clip_cov", clip_cov_ratio=0.1, per_token_adv=True),
       dict(loss_mode="kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.5, per_token_adv=True),
       dict(loss_mode="geo_mean", clip_ratio=0.1),
       dict(loss_mode="geo_mean", clip_ratio=0.1, weights="token"),
       dict(loss_mode="dro", dro_beta=0.3, loss_agg_mode="seq-mean-token-mean")]
)


@pytest.mark.parametrize("case", VERL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_verl_actor_loss(verl, case):
    cfg = dict(case)
    d = _inputs(_seed(case), per_token_adv=cfg.pop("per_token_adv", False),
                spread=cfg.pop("spread", 0.3))
    info = {}
    if cfg.pop("info", None) == "global":
        info = dict(dp_size=2, batch_num_tokens=3 * int(d["mask"].sum()), global_batch_size=17)
    weights = None
    level = cfg.pop("weights", None)
    if level is not None:
        weights, _ = verl.rc.compute_rollout_correction_weights(d["old"] - d["rollout"], d["mask"], rollout_is=level,
                                                                rollout_is_threshold=2.0)
    kw = presets.verl_ppo(**cfg, **info)
    seed = 1234
    torch.manual_seed(seed)
    peer = _loss_and_grad(lambda x: _verl_actor_loss(verl, d, x, cfg, weights, info), d["logp"])
    torch.manual_seed(seed)  # clip_cov draws its subset with the global generator
    ours = _loss_and_grad(lambda x: pv.policy_loss(x, d["adv"], mask=d["mask"], old_logp=d["old"], ref_logp=d["ref"],
                                                   entropy=d["entropy"], token_weights=weights, **kw), d["logp"])
    names = [(VERL_METRICS[k], k) for k in peer[2] if k in VERL_METRICS and VERL_METRICS[k] in ours[2]]
    if cfg.get("loss_mode") == "kl_cov":
        names = []  # verl reports mean |log-ratio| as ppo_kl there
    _compare(peer, ours, 1e-7, names)


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_verl_kl_penalty(verl, name):
    d = _inputs(11, spread=8.0)  # log-ratios beyond ±10 exercise the clamps of k3
    base = name.rstrip("+")
    clamps = dict(log_ratio_clamp=20.0, value_clamp=10.0) if pv.KL_ALIASES[base] == "k3" else {}
    peer = _loss_and_grad(lambda x: ((verl.core.kl_penalty(x, d["ref"], name) * d["mask"]).sum(), {}), d["logp"])
    ours = _loss_and_grad(lambda x: ((pv.kl_penalty(x, d["ref"], name, **clamps) * d["mask"]).sum(), {}), d["logp"])
    _compare(peer, ours, 1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, "0.5_2.0"])
@pytest.mark.parametrize("batch_normalize", [False, True])
def test_verl_rollout_is_weights(verl, level, threshold, batch_normalize):
    d = _inputs(3, spread=0.3)
    peer, _ = verl.rc.compute_rollout_correction_weights(d["old"] - d["rollout"], d["mask"], rollout_is=level,
                                                         rollout_is_threshold=threshold,
                                                         rollout_is_batch_normalize=batch_normalize)
    low, high = (None, threshold) if isinstance(threshold, float) else map(float, threshold.split("_"))
    ours = corrections.rollout_is_weights(d["old"], d["rollout"], d["mask"], level=level,
                                 mode="truncate" if low is None else "mask", low=low, high=high, log_clamp=20.0,
                                 batch_normalize=batch_normalize)
    _close(ours.expand(peer.shape) * d["mask"], peer, 1e-10, "rollout_is_weights")


@pytest.mark.parametrize("options", [
    {"token_k1": (0.8, 1.25)}, {"token_k2": 0.02}, {"token_k3": 0.02}, {"seq_sum_k1": (0.5, 2.0)},
    {"seq_sum_k2": 0.3}, {"seq_mean_k3": 0.045}, {"seq_mean_k1": (0.9, 1.1)}, {"seq_max_k2": 0.05},
    {"token_k1": (0.6, 1.8), "seq_mean_k3": 0.02, "seq_max_k3": 0.1},
], ids=lambda o: ",".join(o))
def test_verl_rollout_rejection_mask(verl, options):
    d = _inputs(_seed(options), spread=0.3)
    spec = ",".join(f"{lo}_{hi}" if isinstance(b, tuple) else str(b) for b in options.values()
                    for lo, hi in [b if isinstance(b, tuple) else (None, None)])
    peer, _ = verl.rc.compute_rollout_rejection_mask(d["old"] - d["rollout"], d["mask"].to(F64),
                                                     rollout_rs=",".join(options), rollout_rs_threshold=spec)
    ours = corrections.rollout_rejection_mask(d["old"], d["rollout"], d["mask"], options)
    assert 0 < ours.sum() < d["mask"].sum()  # some tokens kept, some rejected
    assert torch.equal(ours, peer.to(F64))


# ------------------------------------------------------------------------------------------------
# OpenRLHF (optional)
# ------------------------------------------------------------------------------------------------
def _import_openrlhf():
    from openrlhf.models.loss import PolicyLoss, aggregate_loss
    from openrlhf.models.utils import compute_approx_kl

    return types.SimpleNamespace(PolicyLoss=PolicyLoss, aggregate_loss=aggregate_loss, kl=compute_approx_kl)


@pytest.fixture(scope="module")
def openrlhf():
    return import_peer("openrlhf", ["deepspeed"], _import_openrlhf, subpackages=["openrlhf.models"])


ORL_CASES = [
    dict(),
    dict(clip_eps_high=0.28, dual_clip=3.0, per_token_adv=True),
    dict(token_level_loss=False, info="global"),
    dict(info="global", kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01),
    dict(kl_coef=0.05, kl_estimator="k2", unbiased_gradient=True, token_level_loss=False),
    dict(kl_coef=0.05, kl_estimator="k1", unbiased_gradient=True, spread=6.0),
    dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4, spread=1e-3),
    dict(is_correction_level="token", is_correction_mode="mask"),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.8, 1.2)),
    dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.7, 1.4)),
    dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.01)),
    dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(0.0, 0.05)),
]


@pytest.mark.parametrize("case", ORL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_openrlhf_actor_loss(openrlhf, case):
    cfg = dict(case)
    d = _inputs(_seed(case), per_token_adv=cfg.pop("per_token_adv", False),
                spread=cfg.pop("spread", 0.3))
    info = {}
    if cfg.pop("info", None) == "global":
        info = dict(dp_size=2, batch_num_tokens=float(3 * int(d["mask"].sum())), global_batch_size=17.0)
    kl_cfg = {k: cfg.pop(k) for k in ("kl_coef", "kl_estimator", "unbiased_gradient", "entropy_coef") if k in cfg}
    corr = {k: cfg.pop(k) for k in list(cfg) if k.startswith("is_correction")}
    mask = d["mask"].to(F64)
    adv = d["adv"] if d["adv"].dim() == 2 else d["adv"][:, None].expand_as(mask)
    loss_fn = openrlhf.PolicyLoss(**cfg, **corr)

    def peer_fn(x):
        loss, clip_ratio, ppo_kl, _, _ = loss_fn(x, d["old"], adv, action_mask=mask, rollout_log_probs=d["rollout"],
                                                 **info)
        if kl_cfg.get("kl_coef"):
            kl = openrlhf.kl(x, d["ref"], log_probs_old=d["old"], kl_estimator=kl_cfg.get("kl_estimator", "k1"),
                             unbiased_gradient=kl_cfg.get("unbiased_gradient", False))
            loss = loss + kl_cfg["kl_coef"] * openrlhf.aggregate_loss(kl, mask, **info)
        if kl_cfg.get("entropy_coef"):
            loss = loss - kl_cfg["entropy_coef"] * openrlhf.aggregate_loss(d["entropy"], mask, **info)
        return loss, {"clip_ratio": clip_ratio, "ppo_kl": ppo_kl}

    weights = None
    if corr.get("is_correction_level", "off") != "off":
        low, high = corr.get("is_correction_threshold", (0.5, 5.0))
        gating = corr.get("is_correction_gating", "ratio")
        mode = corr.get("is_correction_mode", "mask")
        weights = corrections.rollout_is_weights(d["old"], d["rollout"], d["mask"],
                                        level="sequence" if corr["is_correction_level"] == "seq" else "token",
                                        mode="truncate" if mode == "clip" else "mask", low=low, high=high,
                                        seq_reduce="mean", gating=gating, mask_weight="token")
    kw = presets.openrlhf_ppo(**cfg, **kl_cfg, **info)
    peer = _loss_and_grad(peer_fn, d["logp"])
    ours = _loss_and_grad(lambda x: pv.policy_loss(x, d["adv"], mask=d["mask"], old_logp=d["old"], ref_logp=d["ref"],
                                                   entropy=d["entropy"], token_weights=weights, **kw), d["logp"])
    names = [("ppo_kl", "ppo_kl")] + ([("clip_frac", "clip_ratio")] if cfg.get("policy_loss_type") != "gspo" else [])
    # compute_approx_kl works in float32 (log_probs.float()); sequence means divide by count + 1e-8
    _compare(peer, ours, 1e-6 if kl_cfg.get("kl_coef") else 1e-7, names)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_openrlhf_compute_approx_kl(openrlhf, estimator, unbiased):
    d = _inputs(21, spread=8.0)  # beyond the ±10 clamps and the IS-weight cap
    peer = _loss_and_grad(lambda x: ((openrlhf.kl(x, d["ref"], log_probs_old=d["old"], kl_estimator=estimator,
                                                  unbiased_gradient=unbiased) * d["mask"]).sum(), {}), d["logp"])
    kw = presets.openrlhf_ppo(kl_estimator=estimator, unbiased_gradient=unbiased)
    options = dict(log_ratio_clamp=kw.get("kl_log_ratio_clamp"), value_clamp=kw["kl_value_clamp"],
                   gradient=kw["kl_gradient"], old_logp=d["old"])
    ours = _loss_and_grad(lambda x: ((pv.kl_penalty(x, d["ref"], estimator, **options) * d["mask"]).sum(), {}),
                          d["logp"])
    _compare(peer, ours, 1e-6)  # compute_approx_kl casts to float32


# ------------------------------------------------------------------------------------------------
# Reference conventions the peers do not cover
# ------------------------------------------------------------------------------------------------
def test_aggregate_empty_batch_and_bad_arguments():
    x = torch.randn(3, 5, dtype=F64)
    empty = torch.zeros(3, 5)
    for mode in pv.LOSS_AGG_MODES:
        assert pv.aggregate(x, empty, mode) == 0  # the peers give NaN (0/0) here
    with pytest.raises(ValueError, match="loss_agg"):
        pv.aggregate(x, empty, "seq-mean")
    with pytest.raises(ValueError, match="empty_sequences"):
        pv.aggregate(x, empty, "token-mean", empty_sequences="drop")
    with pytest.raises(ValueError, match="objective"):
        pv.policy_loss(x, x[:, 0], mask=empty, objective="ppo")
    with pytest.raises(ValueError, match="ratio_level"):
        pv.policy_loss(x, x[:, 0], mask=empty, ratio_level="seq")
    with pytest.raises(ValueError, match="dro_beta"):
        pv.policy_loss(x, x[:, 0], mask=empty, objective="dro")
    with pytest.raises(ValueError, match="kl_estimator"):
        pv.kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="kl_gradient"):
        pv.kl_penalty(x, x, "k3", gradient="k3")
    with pytest.raises(ValueError, match="gating"):
        corrections.rollout_is_weights(x, x, empty, gating="chi2")
    with pytest.raises(ValueError, match="mode"):
        corrections.rollout_is_weights(x, x, empty, mode="clip")
    with pytest.raises(ValueError, match="rejection option"):
        corrections.rollout_rejection_mask(x, x, empty, {"seq_min_k2": 0.1})
    with pytest.raises(ValueError, match="beta"):
        pv.policy_loss(x, x[:, 0], mask=empty, beta=0.1)
    for preset, bad in ((presets.trl_grpo, "ppo"), (presets.verl_ppo, "ppo"), (presets.openrlhf_ppo, "grpo")):
        with pytest.raises(ValueError, match="loss_type|loss_mode"):
            preset(bad)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        presets.trl_grpo("dapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        presets.trl_grpo("dr_grpo")


@pytest.mark.parametrize("agg", pv.LOSS_AGG_MODES)
def test_sequence_levels_agree_for_sequence_advantages(agg):
    """GSPO (gradient through the sequence mean) and GSPO-token (sg value, each token's own gradient) give
    the same loss and gradient whenever every token of a sequence has the same weight and advantage; with
    per-token advantages they share the value but not the gradient."""
    res = {}
    for per_token in (False, True):
        d = _inputs(8, spread=1e-3, per_token_adv=per_token)
        common = dict(mask=d["mask"], old_logp=d["old"], epsilon_low=3e-4, epsilon_high=4e-4, log_ratio_clamp=None,
                      loss_agg=agg)
        for level in ("sequence", "sequence-token"):
            res[level, per_token] = _loss_and_grad(lambda x: pv.policy_loss(x, d["adv"], ratio_level=level, **common),
                                                   d["logp"])
    for per_token in (False, True):
        _close(res["sequence", per_token][0], res["sequence-token", per_token][0], 1e-12, "loss")
    _close(res["sequence", False][1], res["sequence-token", False][1], 1e-12, "grad")
    assert not torch.allclose(res["sequence", True][1], res["sequence-token", True][1])
