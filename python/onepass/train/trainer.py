"""The trainer skeleton: config, data, rollouts, optimization, logging, checkpoints and resume.

One step: take ``train.prompts_per_step`` prompts (under ``parallel: ddp | fsdp2`` each rank takes its
consecutive share, whole groups), sample ``rollout.num_generations`` completions each, let the algorithm
score them (rewards, advantages, old log-probs), then ``train.ppo_epochs`` passes over the batch in
mini-batches of ``train.mini_batch_size`` sequences (one AdamW update each, after gradient accumulation
over micro-batches of ``train.micro_batch_size``), with grad-norm clipping and a warmup + constant/cosine
schedule.  Gradient accumulation is exact: the loss normalizer is the mini-batch's, over all
micro-batches and ranks (see ``Trainer._accumulate``).  Rank 0 alone logs and writes files.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint, modeling
from .algorithms import ALGORITHMS
from .config import Config, ConfigError, to_yaml
from .data import PromptStream, check_context, load_rows, prompt_text
from .parallel import Parallel, check_divisible, full_norm
from .rollout import Rollout, concat
from .tiny import build_tiny_model, build_tiny_teacher

METRICS_FILE = "metrics.jsonl"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def generation_seed(seed: int, step: int, first_prompt: int) -> int:
    """The RNG seed of one generate call: a function of the run's seed, the step and the index (within the
    step's prompts) of the call's first prompt, so that sampling does not depend on the number of ranks."""
    return ((seed * 1_000_003 + step) * 1_000_033 + first_prompt) % 2 ** 63


def normalizer_count(mask: torch.Tensor, loss_agg: str) -> float:
    """What ``loss_agg`` divides by, counted on ``mask`` [n, C]: completion tokens for token-mean, sequences
    with at least one token for the seq-mean modes (seq-mean-token-sum-norm also divides by C, the same for
    every micro-batch and rank: rollouts are padded to the global completion length)."""
    if loss_agg == "token-mean":
        return mask.sum().item()
    return (mask.sum(-1) > 0).sum().item()


def lr_factor(update: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` updates, then constant or cosine decay to ``min_ratio`` at ``total``."""
    if update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None):
        self.cfg = cfg
        self.parallel = Parallel(cfg.parallel)
        check_divisible(cfg.train.prompts_per_step, cfg.train.mini_batch_size, self.parallel.world)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.parallel.is_main:
            checkpoint.clean_partial(self.out)
        seed_everything(cfg.seed)
        self.initial_path = self._initial_model_path()
        teacher_path = self._teacher_path()
        self.parallel.barrier()  # rank 0 has built the offline models
        ckpt = checkpoint.resolve(resume) if resume else None
        load_from = ckpt / "model" if ckpt and (ckpt / "model").is_dir() else self.initial_path
        self.model = modeling.load_model(load_from, cfg.model.dtype, cfg.model.gradient_checkpointing)
        self.tokenizer = modeling.load_tokenizer(load_from)
        if cfg.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {cfg.algorithm!r}")
        self.algorithm = ALGORITHMS[cfg.algorithm]()
        self.algorithm.parallel = self.parallel
        self.algorithm.setup(cfg, self.model, self.tokenizer, str(self.initial_path), teacher_path)
        if cfg.rollout.engine == "vllm":
            from .rollout_vllm import VLLMEngine

            self.algorithm.engine = VLLMEngine(self.initial_path, cfg.rollout, seed=cfg.seed, dtype=cfg.model.dtype)
        self.rows = load_rows(cfg)
        self.texts = [prompt_text(r, cfg.data.prompt_column, self.tokenizer, cfg.data.chat_template) for r in self.rows]
        check_context(self.texts, self.tokenizer, cfg.rollout.max_new_tokens,
                      getattr(self.model.config, "max_position_embeddings", None))
        self.policy = self.parallel.wrap(self.model, self.algorithm)   # FSDP2: the parameters become shards
        self.extra_models = self.algorithm.trained_models()   # e.g. BD-KD's teacher: optimized with the policy
        self.params = [p for m in (self.policy, *self.extra_models.values()) for p in m.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        n = cfg.train.prompts_per_step * cfg.rollout.num_generations
        self.mini = min(cfg.train.mini_batch_size or n, n)               # sequences per update, all ranks
        self.mini_local = self.mini // self.parallel.world
        self.micro = min(cfg.train.micro_batch_size or self.mini_local, self.mini_local)
        per_step = cfg.train.ppo_epochs * math.ceil(n / self.mini)
        warmup, total = o.warmup_steps * per_step, cfg.train.max_steps * per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda u: lr_factor(u, warmup, total, o.schedule, o.min_lr_ratio))
        self.stream = PromptStream(len(self.rows), cfg.seed, cfg.data.shuffle)
        self.step = 0
        self.config_yaml = to_yaml(cfg)
        if ckpt:
            self._restore(ckpt)
        if self.parallel.is_main:
            (self.out / "config.yaml").write_text(self.config_yaml)
        self.tb = self._tensorboard() if self.parallel.is_main else None

    # -- setup helpers ------------------------------------------------------------------------------
    def _initial_model_path(self) -> Path:
        if self.cfg.model.init == "tiny-arith":
            path = self.out / "init_model"
            if self.parallel.is_main and not (path / "config.json").exists():
                build_tiny_model(path, max_operand=self.cfg.data.task_max_operand, seed=self.cfg.seed)
            return path
        path = Path(self.cfg.model.path)
        if not path.is_dir():
            raise ConfigError(f"model.path {str(path)!r} is not a local model directory")
        return path

    def _teacher_path(self) -> Optional[str]:
        t = self.cfg.teacher
        if t.init == "tiny-arith-sft":
            path = self.out / "teacher_model"
            if self.parallel.is_main and not (path / "config.json").exists():
                build_tiny_teacher(path, max_operand=self.cfg.data.task_max_operand, hidden_size=t.init_hidden_size,
                                   sft_steps=t.init_sft_steps, seed=self.cfg.seed)
            return str(path)
        if t.path is not None and not Path(t.path).is_dir():
            raise ConfigError(f"teacher.path {t.path!r} is not a local model directory")
        return t.path

    def _restore(self, ckpt: Path) -> None:
        state = checkpoint.load_state(ckpt)
        if len(state["rng"]) != self.parallel.world:
            raise ConfigError(f"--resume {ckpt}: saved by {len(state['rng'])} process(es), this run has "
                              f"{self.parallel.world}: resume with the same world size")
        for name, module in self.extra_models.items():
            checkpoint.load_weights(module, ckpt / name)
        if self.parallel.mode == "fsdp2":
            checkpoint.load_sharded(ckpt, self.policy, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"][self.parallel.rank])
        self.step = state["step"]
        self.stream.position = state["data_position"]
        metrics = self.out / METRICS_FILE
        if self.parallel.is_main and metrics.exists():  # drop rows logged after the checkpoint by the interrupted run
            rows = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in rows))

    def _tensorboard(self):
        if not self.cfg.logging.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- one step -----------------------------------------------------------------------------------
    def _rollout(self) -> Rollout:
        """This rank's prompts of the step, sampled ``rollout.prompts_per_generate`` prompts per generate
        call (each call seeded by ``generation_seed``), padded to the longest completion of all ranks."""
        cfg = self.cfg
        idx = self.stream.take(cfg.train.prompts_per_step)
        mine = range(len(idx))[self.parallel.local_slice(len(idx))]
        chunk = cfg.rollout.prompts_per_generate or len(mine)
        cols = [c for c in self.rows[0] if c != cfg.data.prompt_column]
        parts = []
        for start in range(mine.start, mine.stop, chunk):
            take = idx[start:min(start + chunk, mine.stop)]
            torch.manual_seed(generation_seed(cfg.seed, self.step, start))
            parts.append(self.parallel.call(self.policy, lambda model: self.algorithm.rollout(
                model, self.tokenizer, [self.texts[i] for i in take], {c: [self.rows[i][c] for i in take] for c in cols})))
        longest = self.parallel.reduce([max(p.completion_mask.shape[1] for p in parts)], "max")[0]
        return concat(parts, self.tokenizer.pad_token_id, int(longest))

    def _accumulate(self, batch: Rollout, mini: torch.Tensor) -> tuple[float, dict]:
        """Backward of one mini-batch (this rank's sequences ``mini`` of ``batch``; every rank holds as many)
        in micro-batches of ``train.micro_batch_size``.  The mini-batch's loss is Σ m·ℓ / N with N the
        normalizer of ``loss.loss_agg`` over the whole mini-batch (all micro-batches, all ranks): a
        micro-batch's loss, aggregated over its own n tokens (or sequences), is scaled by n / N (and by the
        world size, since DDP and FSDP2 average gradients over ranks), which is exact for every mode.
        Returns (the mini-batch's loss on this rank's share, {metric: Σ tokens · value, "tokens": Σ tokens})."""
        agg = self.cfg.loss.loss_agg
        micros = [batch.select(idx) for idx in mini.split(self.micro)]
        counts = [normalizer_count(m.completion_mask, agg) for m in micros]
        total = max(self.parallel.reduce([sum(counts)])[0], 1.0)
        loss_sum, stats = 0.0, defaultdict(float)
        for i, (micro, count) in enumerate(zip(micros, counts)):
            with self.parallel.accumulating(self.policy, sync=i == len(micros) - 1):
                loss, lm = self.policy(micro)
                (loss * (count / total * self.parallel.world)).backward()
            loss_sum += loss.item() * count / total
            tokens = micro.completion_mask.sum().item()
            stats["tokens"] += tokens
            for k, v in lm.items():
                stats[k] += tokens * float(v)
        return loss_sum, stats

    def _prepare_metrics(self, metrics: dict, batch: Rollout) -> dict:
        """The algorithm's step metrics over all ranks: reward mean / std from the gathered rewards, the other
        per-sequence means averaged over ranks (every rank holds as many sequences)."""
        if not self.parallel.distributed:
            return metrics
        keys = sorted(k for k, v in metrics.items() if v is not None)
        totals = self.parallel.reduce([metrics[k] for k in keys])
        metrics.update({k: t / self.parallel.world for k, t in zip(keys, totals)})
        if "rewards" in batch.extras:
            r = self.parallel.gather(batch.extras["rewards"])
            metrics.update(reward_mean=r.mean().item(), reward_std=r.std().item() if r.numel() > 1 else 0.0)
        return metrics

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        batch = self._rollout()
        metrics = self._prepare_metrics(self.parallel.call(self.policy, lambda model: self.algorithm.prepare(model, batch)),
                                        batch)
        for m in (self.policy, *self.extra_models.values()):
            m.train()
        n = batch.input_ids.shape[0]
        order = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        losses, stats, grad_norms = [], defaultdict(float), []
        for _ in range(self.cfg.train.ppo_epochs):
            perm = torch.randperm(n, generator=order) if self.mini_local < n else torch.arange(n)
            for s in range(0, n, self.mini_local):
                self.optimizer.zero_grad(set_to_none=True)
                loss, mini_stats = self._accumulate(batch, perm[s:s + self.mini_local])
                losses.append(loss)
                for k, v in mini_stats.items():
                    stats[k] += v
                grad_norms.append(full_norm(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)))
                self.optimizer.step()
                if self.algorithm.engine is not None:
                    self.algorithm.engine.policy_updated()
                self.scheduler.step()
        self.step += 1
        cmask = batch.completion_mask
        keys = sorted(stats)
        sums = self.parallel.reduce([stats[k] for k in keys] + [sum(losses), cmask.sum().item(),
                                                               batch.attention_mask.sum().item(), n])
        *values, loss_total, completion_tokens, tokens, sequences = sums
        token_mean = dict(zip(keys, values))
        elapsed = self.parallel.reduce([time.perf_counter() - t0], "max")[0]
        metrics.update({k: v / max(token_mean["tokens"], 1.0) for k, v in token_mean.items() if k != "tokens"})
        metrics.setdefault("kl", None)
        metrics.update(step=self.step, loss=loss_total / len(losses), response_length=completion_tokens / sequences,
                       grad_norm=sum(grad_norms) / len(grad_norms), lr=self.scheduler.get_last_lr()[0],
                       tokens_per_s=tokens / elapsed, step_time_s=elapsed)
        self.last_batch = batch
        return metrics

    # -- outputs ------------------------------------------------------------------------------------
    def _log(self, metrics: dict) -> None:
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, metrics["step"])

    def _trainer_state(self) -> dict:
        """Scheduler, step, data position and every rank's RNG states (a collective); the optimizer too
        except under FSDP2 (its sharded state goes to the distributed checkpoint)."""
        state = {"scheduler": self.scheduler.state_dict(), "rng": self.parallel.gather_objects(checkpoint.rng_state()),
                 "step": self.step, "data_position": self.stream.position}
        if self.parallel.mode != "fsdp2":
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """``checkpoint-<step>`` written once: rank 0 (replicated weights) or all ranks' shards (FSDP2)."""
        state = self._trainer_state()
        if self.parallel.mode == "fsdp2":
            return checkpoint.save_sharded(self.out, self.step, self.policy, self.optimizer, state,
                                           self.config_yaml, self.parallel)
        if self.parallel.is_main:
            checkpoint.save(self.out, self.step, self.model, self.tokenizer, state, self.config_yaml,
                            self.extra_models)
        self.parallel.barrier()
        return self.out / f"checkpoint-{self.step}"

    def save_final(self) -> Path:
        """``final/``: ``save_pretrained`` of the full weights (gathered from the shards under FSDP2), and each of
        the algorithm's other trained models to ``final_<name>``; returns the policy's directory."""
        state_dict = checkpoint.full_state_dict(self.model) if self.parallel.mode == "fsdp2" else None
        if self.parallel.is_main:
            models = [("final", self.model, state_dict)] + [(f"final_{k}", m, None) for k, m in self.extra_models.items()]
            for name, model, weights in models:
                final, tmp = self.out / name, self.out / f".tmp-{name}"
                if tmp.exists():
                    shutil.rmtree(tmp)
                checkpoint.write_model(model, self.tokenizer, tmp, state_dict=weights)
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
        self.parallel.barrier()
        return self.out / "final"

    def _print_samples(self, write) -> None:
        b = self.last_batch
        rewards = b.extras.get("rewards")
        for i in range(min(self.cfg.rollout.completions_to_log, len(b.completions))):
            r = f" reward={rewards[i].item():.3g}" if rewards is not None else ""
            write(f"  [{self.step}] {b.prompts[i]!r} -> {b.completions[i]!r}{r}")

    def train(self) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        main = self.parallel.is_main
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (cfg.logging.progress and main),
                   desc=cfg.algorithm, dynamic_ncols=True)
        while self.step < cfg.train.max_steps:
            m = self.train_step()
            if main:
                self._log(m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}" if m["reward_mean"] is not None else "-", kl=f"{m['kl']:.4f}" if m["kl"] is not None else "-",
                            div=f"{m['divergence']:.4f}" if m.get("divergence") is not None else "-",
                            ent=f"{m.get('entropy', float('nan')):.3f}", clip=f"{m.get('clip_frac', 0):.3f}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            if main and cfg.logging.progress and cfg.rollout.completions_to_log and self.step % cfg.train.log_steps == 0:
                self._print_samples(bar.write)
            if self.step % cfg.train.save_steps == 0 or self.step == cfg.train.max_steps:
                self.save_checkpoint()
        bar.close()
        final = self.save_final()
        if main and cfg.logging.plots:
            plot_metrics(self.out / METRICS_FILE, self.out / "plots.png", self.algorithm.plotted)
        if self.tb is not None:
            self.tb.close()
        self.parallel.close()
        return final


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_metrics(metrics_file: Path, out_png: Path, plotted=("reward_mean", "kl", "entropy", "response_length")) -> None:
    """The ``plotted`` metrics vs step, one panel each (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    fig, axes = plt.subplots(1, len(plotted), figsize=(3.2 * len(plotted), 2.6))
    for ax, key in zip(axes, plotted):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


def run(cfg: Config, resume: Optional[str] = None) -> Path:
    """Train with ``cfg`` (resuming from a checkpoint directory if given); returns ``<output_dir>/final``."""
    return Trainer(cfg, resume).train()
