"""Shared pieces of the trainer tests: the tiny model directory and a small config."""
from __future__ import annotations

from onepass.train import load_config

SMALL = ["data.task=arith", "data.task_size=32", "rollout.num_generations=4", "rollout.max_new_tokens=2",
         "train.prompts_per_step=2", "train.max_steps=2", "train.save_steps=1", "optim.lr=1e-2",
         "logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def small_config(model_dir, output_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={output_dir}", *SMALL, *overrides])
