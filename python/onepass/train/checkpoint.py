"""Atomic checkpoints: everything is written into a temporary directory that is then renamed.

Layout of ``<output_dir>/checkpoint-<step>``: ``model/`` (``save_pretrained``, safetensors, with the
tokenizer), ``trainer_state.pt`` (optimizer, scheduler, the RNG states of every rank, step, data position)
and ``config.yaml``.  Under FSDP2 (``parallel: fsdp2``) ``model/`` and the optimizer are replaced by
``dcp/``, a ``torch.distributed.checkpoint`` of the sharded model and optimizer states written by all
ranks; rank 0 writes the rest and renames the directory after a barrier.  ``<output_dir>/checkpoint-last`` is a symbolic link swapped atomically to the newest
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
SHARDED_DIR = "dcp"
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


def write_model(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of the model (of ``state_dict`` when given: the gathered FSDP2 weights) and tokenizer."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


def save(output_dir: Path, step: int, model, tokenizer, trainer_state: dict, config_yaml: str,
         extra_models: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically and point ``checkpoint-last`` at it; ``extra_models`` (other
    trained models, e.g. BD-KD's teacher) go to ``checkpoint-<step>/<name>``."""
    tmp = _fresh_tmp(output_dir, step)
    write_model(model, tokenizer, tmp / "model")
    for name, extra in (extra_models or {}).items():
        write_model(extra, tokenizer, tmp / name)
    return _publish(output_dir, step, tmp, trainer_state, config_yaml)


def save_sharded(output_dir: Path, step: int, policy, optimizer, trainer_state: dict, config_yaml: str,
                 parallel) -> Path:
    """FSDP2: every rank writes its shards of the model and optimizer states (``torch.distributed.checkpoint``)
    into the temporary directory; after a barrier rank 0 writes the rest and publishes it as ``save`` does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = output_dir / f".tmp-checkpoint-{step}"
    if parallel.is_main:
        _fresh_tmp(output_dir, step)
    parallel.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))
    parallel.barrier()
    if parallel.is_main:
        _publish(output_dir, step, tmp, trainer_state, config_yaml)
    parallel.barrier()
    return output_dir / f"checkpoint-{step}"


def load_sharded(path: Path, policy, optimizer) -> None:
    """Load ``save_sharded``'s model and optimizer shards into the FSDP2-wrapped ``policy`` and ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / SHARDED_DIR).is_dir():
        raise FileNotFoundError(f"--resume {path}: no {SHARDED_DIR}/ (not a parallel: fsdp2 checkpoint)")
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model) -> dict:
    """The full (unsharded) state dict of an FSDP2-sharded model on rank 0, on CPU (a collective; empty on
    the other ranks), with each tied parameter once (under its first name, as ``save_pretrained`` writes it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first_name[id(p)] != name}
    return {k: v for k, v in state.items() if k not in tied}


def _fresh_tmp(output_dir: Path, step: int) -> Path:
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(output_dir: Path, step: int, tmp: Path, trainer_state: dict, config_yaml: str) -> Path:
    """Complete ``tmp`` (trainer state, config, fsync), rename it to ``checkpoint-<step>``, swap ``checkpoint-last``."""
    final = output_dir / f"checkpoint-{step}"
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
    if not (p / STATE_FILE).is_file() or not ((p / "model").is_dir() or (p / SHARDED_DIR).is_dir()):
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (no {STATE_FILE}, or neither model/ "
                                f"nor {SHARDED_DIR}/)")
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
