"""Atomic checkpoints: everything is written into a temporary directory that is then renamed.

Layout of ``<output_dir>/checkpoint-<step>``: ``model/`` (``save_pretrained``, safetensors, with the
tokenizer), ``trainer_state.pt`` (optimizer, scheduler, RNG states, step, data position) and
``config.yaml``.  ``<output_dir>/checkpoint-last`` is a symbolic link swapped atomically to the newest
complete checkpoint, so a kill at any moment leaves the previous checkpoint intact and loadable.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
LAST = "checkpoint-last"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_model(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def save(output_dir: Path, step: int, model, tokenizer, trainer_state: dict, config_yaml: str,
         extra_models: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically and point ``checkpoint-last`` at it; ``extra_models`` (other
    trained models, e.g. BD-KD's teacher) go to ``checkpoint-<step>/<name>``."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_model(model, tokenizer, tmp / "model")
    for name, extra in (extra_models or {}).items():
        write_model(extra, tokenizer, tmp / name)
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    link_tmp = output_dir / f".tmp-{LAST}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, output_dir / LAST)
    return final


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def clean_partial(output_dir: Path) -> None:
    """Remove temporary directories left by a save that was killed."""
    for p in output_dir.glob(".tmp-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def resolve(path: str | Path) -> Path:
    """The checkpoint directory (following ``checkpoint-last``); raises if it is not a complete checkpoint."""
    p = Path(path).resolve()
    if not (p / STATE_FILE).is_file() or not (p / "model").is_dir():
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (no {STATE_FILE} or model/)")
    return p


def load_weights(model, directory: Path) -> None:
    """Load the weights that ``write_model`` wrote to ``directory`` into ``model`` (in place, same device)."""
    from .modeling import load_model

    saved = load_model(directory, "float32").state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(saved[k])


def load_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, weights_only=False)
