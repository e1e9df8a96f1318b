"""The trainer skeleton: config, data, rollouts, optimization, logging, checkpoints and resume.

One step: take ``train.prompts_per_step`` prompts, sample ``rollout.num_generations`` completions each,
let the algorithm score them (rewards, advantages, old log-probs), then ``train.ppo_epochs`` passes over
the batch in mini-batches of ``train.mini_batch_size`` sequences (one AdamW update each, after gradient
accumulation over micro-batches of ``train.micro_batch_size``; each micro-batch's loss is weighted by its
share of the mini-batch's sequences), with grad-norm clipping and a warmup + constant/cosine schedule.
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
from .rollout import Rollout
from .tiny import build_tiny_model, build_tiny_teacher

METRICS_FILE = "metrics.jsonl"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


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
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(self.out)
        seed_everything(cfg.seed)
        self.initial_path = self._initial_model_path()
        ckpt = checkpoint.resolve(resume) if resume else None
        load_from = ckpt / "model" if ckpt else self.initial_path
        self.model = modeling.load_model(load_from, cfg.model.dtype, cfg.model.gradient_checkpointing)
        self.tokenizer = modeling.load_tokenizer(load_from)
        if cfg.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {cfg.algorithm!r}")
        self.algorithm = ALGORITHMS[cfg.algorithm]()
        self.algorithm.setup(cfg, self.model, self.tokenizer, str(self.initial_path), self._teacher_path())
        self.rows = load_rows(cfg)
        self.texts = [prompt_text(r, cfg.data.prompt_column, self.tokenizer, cfg.data.chat_template) for r in self.rows]
        check_context(self.texts, self.tokenizer, cfg.rollout.max_new_tokens,
                      getattr(self.model.config, "max_position_embeddings", None))
        self.extra_models = self.algorithm.trained_models()   # e.g. BD-KD's teacher: optimized with the policy
        self.params = [p for m in (self.model, *self.extra_models.values()) for p in m.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        n = cfg.train.prompts_per_step * cfg.rollout.num_generations
        self.mini = min(cfg.train.mini_batch_size or n, n)
        self.micro = min(cfg.train.micro_batch_size or self.mini, self.mini)
        per_step = cfg.train.ppo_epochs * math.ceil(n / self.mini)
        warmup, total = o.warmup_steps * per_step, cfg.train.max_steps * per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda u: lr_factor(u, warmup, total, o.schedule, o.min_lr_ratio))
        self.stream = PromptStream(len(self.rows), cfg.seed, cfg.data.shuffle)
        self.step = 0
        self.config_yaml = to_yaml(cfg)
        if ckpt:
            self._restore(ckpt)
        (self.out / "config.yaml").write_text(self.config_yaml)
        self.tb = self._tensorboard()

    # -- setup helpers ------------------------------------------------------------------------------
    def _initial_model_path(self) -> Path:
        if self.cfg.model.init == "tiny-arith":
            path = self.out / "init_model"
            if not (path / "config.json").exists():
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
            if not (path / "config.json").exists():
                build_tiny_teacher(path, max_operand=self.cfg.data.task_max_operand, hidden_size=t.init_hidden_size,
                                   sft_steps=t.init_sft_steps, seed=self.cfg.seed)
            return str(path)
        if t.path is not None and not Path(t.path).is_dir():
            raise ConfigError(f"teacher.path {t.path!r} is not a local model directory")
        return t.path

    def _restore(self, ckpt: Path) -> None:
        state = checkpoint.load_state(ckpt)
        for name, module in self.extra_models.items():
            checkpoint.load_weights(module, ckpt / name)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        self.stream.position = state["data_position"]
        metrics = self.out / METRICS_FILE
        if metrics.exists():  # drop rows logged after the checkpoint by the interrupted run
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
        idx = self.stream.take(self.cfg.train.prompts_per_step)
        cols = [c for c in self.rows[0] if c != self.cfg.data.prompt_column]
        columns = {c: [self.rows[i][c] for i in idx] for c in cols}
        return self.algorithm.rollout(self.model, self.tokenizer, [self.texts[i] for i in idx], columns)

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        batch = self._rollout()
        metrics = self.algorithm.prepare(self.model, batch)
        for m in (self.model, *self.extra_models.values()):
            m.train()
        n = batch.input_ids.shape[0]
        order = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        parts, grad_norms = defaultdict(list), []
        for _ in range(self.cfg.train.ppo_epochs):
            perm = torch.randperm(n, generator=order) if self.mini < n else torch.arange(n)
            for s in range(0, n, self.mini):
                mini = perm[s:s + self.mini]
                self.optimizer.zero_grad(set_to_none=True)
                for ms in range(0, len(mini), self.micro):
                    idx = mini[ms:ms + self.micro]
                    loss, lm = self.algorithm.loss(self.model, batch.select(idx))
                    (loss * (len(idx) / len(mini))).backward()
                    parts["loss"].append(loss.item())
                    for k, v in lm.items():
                        parts[k].append(float(v))
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)))
                self.optimizer.step()
                self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - t0
        cmask = batch.completion_mask
        metrics.update({k: sum(v) / len(v) for k, v in parts.items()})
        metrics.setdefault("kl", None)
        metrics.update(step=self.step, response_length=cmask.sum(-1).mean().item(),
                       grad_norm=sum(grad_norms) / len(grad_norms), lr=self.scheduler.get_last_lr()[0],
                       tokens_per_s=batch.attention_mask.sum().item() / elapsed, step_time_s=elapsed)
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
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": checkpoint.rng_state(), "step": self.step, "data_position": self.stream.position}

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self.out, self.step, self.model, self.tokenizer, self._trainer_state(),
                               self.config_yaml, self.extra_models)

    def save_final(self) -> Path:
        """The policy to ``<output_dir>/final`` (and each of the algorithm's other trained models to
        ``final_<name>``); returns the policy's directory."""
        for name, model in [("final", self.model)] + [(f"final_{k}", m) for k, m in self.extra_models.items()]:
            final, tmp = self.out / name, self.out / f".tmp-{name}"
            if tmp.exists():
                shutil.rmtree(tmp)
            checkpoint.write_model(model, self.tokenizer, tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
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
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not cfg.logging.progress,
                   desc=cfg.algorithm, dynamic_ncols=True)
        while self.step < cfg.train.max_steps:
            m = self.train_step()
            self._log(m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}" if m["reward_mean"] is not None else "-", kl=f"{m['kl']:.4f}" if m["kl"] is not None else "-",
                            div=f"{m['divergence']:.4f}" if m.get("divergence") is not None else "-",
                            ent=f"{m.get('entropy', float('nan')):.3f}", clip=f"{m.get('clip_frac', 0):.3f}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            if cfg.logging.progress and cfg.rollout.completions_to_log and self.step % cfg.train.log_steps == 0:
                self._print_samples(bar.write)
            if self.step % cfg.train.save_steps == 0 or self.step == cfg.train.max_steps:
                self.save_checkpoint()
        bar.close()
        final = self.save_final()
        if cfg.logging.plots:
            plot_metrics(self.out / METRICS_FILE, self.out / "plots.png", self.algorithm.plotted)
        if self.tb is not None:
            self.tb.close()
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
