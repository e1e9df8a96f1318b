"""``onepass-train <algorithm> --config file.yaml [--resume dir] [key=value ...]`` (also ``python -m onepass.train``)."""
from __future__ import annotations

import argparse
import os
import sys

from .algorithms import ALGORITHMS
from .config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="onepass-train", description="Train a Hugging Face causal LM with "
                                     "onepass's fused losses.")
    parser.add_argument("algorithm", choices=sorted(ALGORITHMS))
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--resume", help="checkpoint directory to continue from (e.g. runs/x/checkpoint-last)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6")
    args = parser.parse_intermixed_args(argv)
    from .rewards import RewardError
    from .trainer import run

    try:
        cfg = load_config(args.config, args.overrides, algorithm=args.algorithm)
        final = run(cfg, resume=args.resume)
    except (ConfigError, RewardError, FileNotFoundError) as e:
        print(f"onepass-train: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone reports
        print(f"final model: {final}")
    return 0
