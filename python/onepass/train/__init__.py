"""onepass.train: the bundled trainers (GRPO) on Hugging Face causal LMs and onepass's fused losses.

``onepass-train grpo --config examples/grpo_arith_tiny.yaml`` or, from Python, ``run(load_config(...))``.
The skeleton (``trainer.Trainer``) is shared; the algorithm (``algorithms.Algorithm``) is what varies.
"""
from .algorithms import ALGORITHMS, GRPO, Algorithm
from .config import Config, ConfigError, load_config
from .rewards import RewardError
from .trainer import Trainer, run

__all__ = ["ALGORITHMS", "Algorithm", "Config", "ConfigError", "GRPO", "RewardError", "Trainer", "load_config", "run"]
