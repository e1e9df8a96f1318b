"""Prompt data: JSONL, Parquet, a local ``datasets`` dataset, or the built-in synthetic task.

Rows carry the prompt column plus any columns the rewards use.  The order of prompts is a seeded
permutation per epoch, so a data position (prompts consumed so far) fully determines what comes next:
that is what a checkpoint stores.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, ConfigError
from .tiny import arith_rows


def load_rows(cfg: Config) -> list[dict]:
    """All rows as dicts; raises ConfigError for a missing file, an empty set or a missing prompt column."""
    d = cfg.data
    if d.task == "arith":
        rows = arith_rows(d.task_size, d.task_max_operand, cfg.seed)
    else:
        path = Path(d.train_file)
        if not path.exists():
            raise ConfigError(f"data.train_file {str(path)!r} does not exist")
        import datasets

        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        elif path.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train") if path.stat().st_size else []
        elif path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            raise ConfigError(f"data.train_file must be .jsonl, .json, .parquet or a datasets directory: {path}")
        rows = [dict(r) for r in ds]
    if not rows:
        raise ConfigError(f"data.train_file {d.train_file!r} has no rows: the dataset is empty")
    if d.prompt_column not in rows[0]:
        raise ConfigError(f"data.prompt_column {d.prompt_column!r} is not a column of the data "
                          f"(columns: {sorted(rows[0])})")
    return rows


def prompt_text(row: dict, column: str, tokenizer, chat_template: bool) -> str:
    """The prompt string given to the tokenizer (through the chat template when it has one)."""
    prompt = row[column]
    if isinstance(prompt, list):  # chat messages
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def check_context(texts: list[str], tokenizer, max_new_tokens: int, context: int | None) -> None:
    """Raise if a prompt plus ``max_new_tokens`` does not fit the model's context."""
    if context is None:
        return
    for i, text in enumerate(texts):
        n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
        if n + max_new_tokens > context:
            raise ConfigError(f"prompt {i} has {n} tokens; with rollout.max_new_tokens={max_new_tokens} it exceeds "
                              f"the model's context of {context} tokens (max_position_embeddings): {text[:80]!r}")


class PromptStream:
    """Prompts in a seeded order, an epoch at a time; ``position`` counts prompts consumed."""

    def __init__(self, n: int, seed: int, shuffle: bool, position: int = 0):
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            order = self._order(epoch)
            step = min(k - len(out), self.n - offset)
            out.extend(order[offset:offset + step])
            self.position += step
        return out
