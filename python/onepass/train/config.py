"""Typed trainer configuration: dataclasses, loaded from YAML and dotted overrides with OmegaConf.

An unknown key or a value of the wrong type raises ``ConfigError`` naming the full dotted key.  The
resolved config is written to ``<output_dir>/config.yaml`` by the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import importlib.util
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration error; the message names the offending key."""


@dataclass
class ModelConfig:
    path: Optional[str] = None            # a local Hugging Face model directory (with its tokenizer)
    init: Optional[str] = None            # "tiny-arith": build the offline tiny model into <output_dir>/init_model
    dtype: str = "float32"                # float32 | bfloat16
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_file: Optional[str] = None      # JSONL, Parquet, or a local `datasets` dataset directory
    prompt_column: str = "prompt"
    task: Optional[str] = None            # built-in synthetic task instead of a file: "arith"
    task_size: int = 512                  # number of synthetic prompts
    task_max_operand: int = 3             # synthetic operands are in [0, task_max_operand]
    chat_template: bool = True            # apply the tokenizer's chat template when it has one
    shuffle: bool = True


@dataclass
class RewardConfig:
    function: str = "onepass.train.rewards:exact_match"   # "module:function"
    weight: float = 1.0


@dataclass
class RolloutConfig:
    engine: str = "hf"                    # hf (HF generate) | vllm (colocated vLLM, GPU only: onepass.train.rollout_vllm)
    vllm_gpu_memory_utilization: float = 0.3   # vllm: the fraction of GPU memory vLLM may take
    vllm_max_model_len: int = 0           # vllm: max_model_len (0: the model's)
    num_generations: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                        # 0: no top-k filtering
    completions_to_log: int = 2           # sampled completions printed per step
    prompts_per_generate: int = 0         # prompts per generate call (each call seeded by seed, step and its
                                          # first prompt's index in the step); 0: all of this rank's prompts.
                                          # Dividing prompts_per_step / world size, sampling is the same on any
                                          # number of ranks


@dataclass
class AdvantageConfig:
    estimator: str = "grpo"               # grpo | dr_grpo | rloo | reinforce_pp | grpo_passk | opo | gpg
    scale: str = "group"                  # group | batch | none (grpo, grpo_passk)
    eps: float = 1e-6                     # added to the std of the GRPO / pass@k / RLOO-normalize denominators
    singleton: str = "zero"               # a group of one: zero (TRL, OpenRLHF) | verl
    normalize: bool = False               # rloo: whiten over the batch (TRL RLOO normalize_advantages)
    whiten: str = "sample"                # reinforce_pp: sample (one value per sequence) | token (verl, OpenRLHF)
    variance: str = "biased"              # reinforce_pp whitening: biased (OpenRLHF) | unbiased (verl)


@dataclass
class LossConfig:
    impl: str = "fused"                   # fused (onepass.grpo_loss) | naive (materialized logits)
    backend: str = "auto"
    beta: float = 0.0                     # weight of the penalty to the reference
    kl_estimator: str = "k3"              # k1 | k2 | k3 | abs (+ variants) | full
    divergence: str = "reverse_kl"        # with kl_estimator=full: any onepass.divergence kind
    divergence_beta: float = 0.5          # jsd's β
    divergence_alpha: float = 0.5         # alpha-divergence's α
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2             # clip-higher: epsilon_high > epsilon_low
    dual_clip: Optional[float] = None
    loss_agg: str = "token-mean"
    entropy_coef: float = 0.0
    options: Dict[str, Any] = field(default_factory=dict)   # any other onepass.grpo_loss keyword: objective,
                                          # ratio_level, ratio_cap, kl_value_clamp, top_entropy_quantile, ...
    rollout_correction: Optional[Dict[str, Any]] = None     # vllm engine: token_weights =
                                          # onepass.corrections.rollout_is_weights(old, vLLM log-probs, mask, **this)


@dataclass
class ReferenceConfig:
    path: Optional[str] = None            # a checkpoint directory; default: a frozen copy of the initial model
    soup: List[str] = field(default_factory=list)   # weight-space average of these checkpoints


@dataclass
class TeacherConfig:
    path: Optional[str] = None            # a local Hugging Face model directory (same vocabulary as the student)
    init: Optional[str] = None            # "tiny-arith-sft": a wider tiny model, SFT'd on the arith task,
                                          # built into <output_dir>/teacher_model
    init_hidden_size: int = 96            # tiny-arith-sft: the teacher's hidden size
    init_sft_steps: int = 150             # tiny-arith-sft: full-batch SFT steps
    device: Optional[str] = None          # where the teacher runs (e.g. "cuda:1", "cpu"); default: the student's
    offload: bool = False                 # frozen teacher kept on the CPU, moved to the student's device once per
                                          # step for its forward, then back


@dataclass
class DistillConfig:
    divergence: str = "reverse_kl"        # any onepass.divergence kind (full vocabulary), or sampled_reverse_kl
                                          # (the sampled-token OPD reward; G-OPD / ExOPD with reward_scale)
    beta: float = 0.5                     # jsd's β
    alpha: float = 0.5                    # alpha-divergence's α
    reward_scale: float = 1.0             # G-OPD's λ (1: plain OPD, > 1: ExOPD); needs sampled_reverse_kl
    temperature: float = 1.0              # softmax temperature of both models in the divergence
    coef: float = 1.0                     # kdrl: weight of the divergence added to the GRPO loss;
                                          # offline: weight of the divergence (0: SinKD alone)
    completion_column: str = "completion" # offline: the data column with the fixed completions
    sinkhorn_coef: float = 0.0            # offline: weight of SinKD's Sinkhorn distance over the batch's tokens
    sinkhorn_epsilon: float = 0.1         # SinKD's entropic regularization ε
    sinkhorn_iters: int = 20              # SinKD's Sinkhorn iterations
    sinkhorn_temperature: float = 1.0     # SinKD's softmax temperature T
    task_coef: float = 1.0                # bdkd: weight of each model's cross-entropy on the fixed completions
    teacher_coef: float = 1.0             # bdkd: weight of KL(student‖teacher) in the teacher's loss
    balance_major: float = 1.0            # bdkd: per-token weight of the KL direction that moves the student's
                                          # entropy toward the teacher's (forward KL when the student is the
                                          # more confident, reverse KL otherwise)
    balance_minor: float = 0.5            # bdkd: per-token weight of the other KL direction


@dataclass
class TrainConfig:
    max_steps: int = 100
    prompts_per_step: int = 8
    ppo_epochs: int = 1
    mini_batch_size: int = 0              # sequences per optimizer step (all ranks); 0: the whole rollout batch
    micro_batch_size: int = 0             # sequences per forward/backward on a rank (gradient accumulation);
                                          # 0: the rank's share of the mini batch
    max_grad_norm: float = 1.0
    save_steps: int = 50
    log_steps: int = 1


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"            # constant | cosine
    min_lr_ratio: float = 0.0


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True              # when tensorboard is installed
    plots: bool = True


@dataclass
class Config:
    algorithm: str = "grpo"
    output_dir: str = "runs/grpo"
    seed: int = 0
    parallel: str = "none"                # none | ddp | fsdp2 (under torchrun; see onepass.train.parallel)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: List[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "chi2", "alpha")
DISTILLATION = ("opd", "kdrl", "offline", "bdkd")  # the algorithms that need a teacher
FIXED_COMPLETIONS = ("offline", "bdkd")             # the algorithms that train on a data column, no sampling
CHOICES = {
    "parallel": ("none", "ddp", "fsdp2"),
    "model.dtype": ("float32", "bfloat16"),
    "model.init": (None, "tiny-arith"),
    "data.task": (None, "arith"),
    "rollout.engine": ("hf", "vllm"),
    "advantage.estimator": ("grpo", "dr_grpo", "rloo", "reinforce_pp", "grpo_passk", "opo", "gpg"),
    "advantage.singleton": ("zero", "verl"),
    "advantage.whiten": ("sample", "token"),
    "advantage.variance": ("biased", "unbiased"),
    "advantage.scale": ("group", "batch", "none"),
    "loss.impl": ("fused", "naive"),
    "loss.divergence": DIVERGENCES,
    "loss.loss_agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "optim.schedule": ("constant", "cosine"),
    "teacher.init": (None, "tiny-arith-sft"),
    "distill.divergence": DIVERGENCES + ("sampled_reverse_kl",),
}
POSITIVE = ("rollout.num_generations", "rollout.max_new_tokens", "rollout.temperature", "train.max_steps",
            "train.prompts_per_step", "train.ppo_epochs", "train.save_steps", "optim.lr", "data.task_size")


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Value checks that the types cannot express; each error names its key."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {_get(cfg, key)!r}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)!r}")
    if cfg.model.path is None and cfg.model.init is None:
        raise ConfigError("model.path is required (or model.init: tiny-arith for the offline tiny model)")
    if cfg.data.train_file is None and cfg.data.task is None:
        raise ConfigError("data.train_file is required (or data.task: arith for the built-in synthetic task)")
    if not cfg.rewards:
        raise ConfigError("rewards must name at least one reward function")
    for i, r in enumerate(cfg.rewards):
        if ":" not in r.function:
            raise ConfigError(f"rewards[{i}].function must be 'module:function', got {r.function!r}")
    if cfg.loss.kl_estimator != "full" and cfg.loss.divergence != "reverse_kl":
        raise ConfigError("loss.divergence applies to loss.kl_estimator: full (the sampled estimators estimate "
                          f"the reverse KL), got loss.kl_estimator={cfg.loss.kl_estimator!r}")
    if cfg.loss.kl_estimator == "full" and cfg.loss.beta == 0:
        raise ConfigError("loss.kl_estimator: full is a penalty to the reference and needs loss.beta != 0")
    if cfg.algorithm in DISTILLATION:
        _validate_distill(cfg)
    elif cfg.loss.beta == 0 and (cfg.reference.path or cfg.reference.soup):
        raise ConfigError("reference.path / reference.soup given but loss.beta is 0: no penalty would use it")
    _validate_engine(cfg)
    _validate_loss_options(cfg)
    for key in ("rollout.prompts_per_generate", "train.mini_batch_size", "train.micro_batch_size"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)!r}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.warmup_steps > cfg.train.max_steps:
        raise ConfigError(f"optim.warmup_steps must be in [0, train.max_steps], got {cfg.optim.warmup_steps}")
    return cfg


def _validate_engine(cfg: Config) -> None:
    r = cfg.rollout
    if r.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("rollout.engine: vllm needs the vllm package (pip install vllm; it runs on GPUs only)")
        if cfg.parallel != "none":
            raise ConfigError(f"rollout.engine: vllm runs with parallel: none (one colocated engine), got "
                              f"parallel: {cfg.parallel}")
        if cfg.algorithm in FIXED_COMPLETIONS:
            raise ConfigError(f"rollout.engine: vllm samples completions; {cfg.algorithm} trains on fixed ones")
        if not 0 < r.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got {r.vllm_gpu_memory_utilization}")
        if r.vllm_max_model_len < 0:
            raise ConfigError(f"rollout.vllm_max_model_len must be >= 0, got {r.vllm_max_model_len}")
    elif cfg.loss.rollout_correction is not None:
        raise ConfigError("loss.rollout_correction needs the rollout engine's own log-probs: rollout.engine: vllm")


#: keys of loss.options that the trainer sets itself (normalizers: exact gradient accumulation scales the
#: micro-batch losses; the rest are loss.* keys of their own).
TRAINER_OWNED_OPTIONS = ("num_tokens", "num_sequences", "loss_scale", "token_weights", "sampling_logp", "beta",
                         "kl_estimator", "epsilon_low", "epsilon_high", "dual_clip", "loss_agg", "entropy_coef")


def _validate_loss_options(cfg: Config) -> None:
    """loss.options (and loss.rollout_correction) checked by the functions that take them, on tiny inputs."""
    import torch

    import onepass

    owned = sorted(set(cfg.loss.options) & set(TRAINER_OWNED_OPTIONS))
    if owned:
        raise ConfigError(f"loss.options must not set {owned}: use the loss.* keys (the trainer sets the normalizers)")
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    try:
        onepass.policy_loss(logp, torch.zeros(2), mask=mask, old_logp=logp, entropy=logp, **cfg.loss.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.options: {e}") from e
    if cfg.loss.rollout_correction is not None:
        try:
            onepass.corrections.rollout_is_weights(logp, logp, mask, **cfg.loss.rollout_correction)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"loss.rollout_correction: {e}") from e


def _validate_distill(cfg: Config) -> None:
    d = cfg.distill
    if cfg.teacher.path is None and cfg.teacher.init is None:
        raise ConfigError(f"teacher.path is required for {cfg.algorithm} (or teacher.init: tiny-arith-sft)")
    if not d.temperature > 0:
        raise ConfigError(f"distill.temperature must be > 0, got {d.temperature!r}")
    if d.reward_scale != 1.0 and d.divergence != "sampled_reverse_kl":
        raise ConfigError("distill.reward_scale (G-OPD's λ) applies to distill.divergence: sampled_reverse_kl, got "
                          f"distill.divergence={d.divergence!r}")
    if d.reward_scale == 1.0 and (cfg.reference.path or cfg.reference.soup) and cfg.algorithm == "opd":
        raise ConfigError("reference.path given but distill.reward_scale is 1: plain OPD does not use a reference")
    if cfg.algorithm in ("kdrl", "offline") and d.divergence == "sampled_reverse_kl":
        raise ConfigError(f"distill.divergence for {cfg.algorithm} must be a full-vocabulary kind, got "
                          "'sampled_reverse_kl'")
    if cfg.algorithm == "kdrl" and d.temperature != cfg.rollout.temperature:
        raise ConfigError("kdrl: distill.temperature must equal rollout.temperature (the GRPO sweep computes the "
                          f"policy ratio and the divergence at one temperature), got {d.temperature} vs "
                          f"{cfg.rollout.temperature}")
    if cfg.algorithm in FIXED_COMPLETIONS and cfg.rollout.num_generations != 1:
        raise ConfigError(f"{cfg.algorithm}: rollout.num_generations must be 1 (one fixed completion per prompt), "
                          f"got {cfg.rollout.num_generations}")
    if cfg.algorithm == "bdkd":
        _validate_bdkd(cfg)
    _validate_teacher_placement(cfg)
    if cfg.algorithm == "offline" and d.coef == 0 and d.sinkhorn_coef == 0:
        raise ConfigError("offline: distill.coef and distill.sinkhorn_coef are both 0: there is no loss")


def _validate_bdkd(cfg: Config) -> None:
    d = cfg.distill
    if d.divergence != "reverse_kl":
        raise ConfigError("distill.divergence is not used by bdkd (its divergences are the forward and reverse KL, "
                          f"balanced per token); leave it at reverse_kl, got {d.divergence!r}")
    for key in ("distill.coef", "distill.task_coef", "distill.teacher_coef", "distill.balance_major",
                "distill.balance_minor"):
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)!r}")
    if cfg.teacher.offload:
        raise ConfigError("teacher.offload is for a frozen teacher; bdkd trains the teacher (use teacher.device)")
    if cfg.parallel != "none":
        raise ConfigError(f"parallel: {cfg.parallel} is not supported with bdkd yet (its teacher trains too and "
                          "would need its own DDP / FSDP2 wrapping); use parallel: none")


def _validate_teacher_placement(cfg: Config) -> None:
    """teacher.device must name a device of this machine; teacher.offload keeps the teacher on the CPU."""
    import torch

    t = cfg.teacher
    if t.offload and t.device not in (None, "cpu"):
        raise ConfigError("teacher.offload keeps the teacher on the CPU between steps; teacher.device must be unset "
                          f"or 'cpu' with it, got teacher.device={t.device!r}")
    if t.device is None:
        return
    try:
        dev = torch.device(t.device)
    except RuntimeError as e:
        raise ConfigError(f"teacher.device {t.device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"teacher.device {t.device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"teacher.device {t.device!r}: this machine has {count} CUDA device(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"teacher.device must be 'cpu' or a CUDA device ('cuda', 'cuda:1'), got {t.device!r}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, **defaults) -> Config:
    """Config from the dataclass defaults, ``defaults`` (e.g. algorithm="grpo"), the YAML file at ``path``
    and dotted ``key=value`` overrides, in that order of precedence (later wins)."""
    try:
        schema = OmegaConf.structured(Config)
        layers = [schema, OmegaConf.create(defaults)]
        if path is not None:
            layers.append(OmegaConf.load(path))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from None
    return validate(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
