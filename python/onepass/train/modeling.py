"""Hugging Face causal LMs as onepass sees them: the decoder's last hidden states and the LM head.

The trainer never asks the model for training logits: it calls the backbone (``get_decoder()``) for the
hidden states [B, T, D] and hands them with the LM-head weight [V, D] (the input embedding when the
embeddings are tied; ``nn.Linear`` layout either way) to onepass's fused ops.  Architectures that change
the logits after the head (a final logit soft-cap, a logit scale) are refused with a clear error: the fused ops
take them (``logit_softcap`` / ``logit_scale``), but the trainer's algorithms do not pass them yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Head:
    weight: torch.Tensor            # [V, D]
    bias: Optional[torch.Tensor]    # [V] or None


def check_supported(model: nn.Module) -> None:
    cfg = model.config
    for key in ("final_logit_softcapping", "logit_softcapping"):
        if getattr(cfg, key, None):
            raise ValueError(f"{type(model).__name__} applies a final logit soft-cap ({key}={getattr(cfg, key)}); "
                             "the onepass ops take it (logit_softcap=...), but the trainer's algorithms do not pass it "
                             "yet")
    for key in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} scales its logits ({key}={getattr(cfg, key)}); the onepass "
                             "ops take it (logit_scale=...), but the trainer's algorithms do not pass it yet")
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")


def load_model(path: str | Path, dtype: str, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    check_supported(model)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()  # transformers renamed it (v5); the old name warns
        model.config.use_cache = False
    return model


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def head(model: nn.Module) -> Head:
    """The LM head as (weight [V, D], bias [V] or None); tied embeddings share the input embedding."""
    out = model.get_output_embeddings()
    return Head(out.weight, getattr(out, "bias", None))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as HF generation assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states [B, L, D]."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_reference(initial_path: str, ref_path: Optional[str], soup: list[str], dtype: str) -> nn.Module:
    """The frozen reference: the initial model, a given checkpoint, or the weight average of ``soup``."""
    if soup:
        models = [load_model(p, "float32") for p in soup]
        ref = models[0]
        names = set(ref.state_dict())
        for p, m in zip(soup[1:], models[1:]):
            if set(m.state_dict()) != names:
                raise ValueError(f"reference.soup: {p} does not have the parameters of {soup[0]}")
        with torch.no_grad():
            avg = {k: sum(m.state_dict()[k].double() for m in models) / len(models) for k in names}
            ref.load_state_dict({k: v.to(torch.float32) for k, v in avg.items()})
        return frozen(ref.to(DTYPES[dtype]))
    return frozen(load_model(ref_path or initial_path, dtype))
