"""Hugging Face causal LMs as onepass sees them: the decoder's last hidden states and the LM head.

The trainer never asks the model for training logits: it calls the backbone (``get_decoder()``) for the
hidden states [B, T, D] and hands them with the LM-head weight [V, D] (the input embedding when the
embeddings are tied; ``nn.Linear`` layout either way) to onepass's fused ops.  Architectures that change
the logits after the head with a logit scale s and/or a final soft-cap c (the model's logits are
c·tanh(s·ℓ/c) of the head's output ℓ: Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
``logits_scaling``, ...) are trained with the same map inside the ops: ``Head`` carries (softcap, scale) and
``Head.logit_kw`` gives the ops' ``logit_softcap`` / ``logit_scale`` keywords (``ref_`` / ``teacher_`` ones
for the second model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from onepass._contract import LogitMap
from onepass.integrations._common import check_logit_postprocessing, logit_postprocessing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Config keys that read like a final-logit cap or scale but that no transformers causal LM applies: their
# meaning is unknown, so a model that sets one is refused rather than trained with a guessed map.
UNKNOWN_LOGIT_KEYS = ("logit_softcapping", "output_multiplier_scale")


@dataclass
class Head:
    """An LM head and the map of its output ℓ = hidden @ weight.T + bias to the model's logits:
    c·tanh(s·ℓ/c) with s = ``scale`` and c = ``softcap`` (s·ℓ when ``softcap`` is None)."""

    weight: torch.Tensor            # [V, D]
    bias: Optional[torch.Tensor]    # [V] or None
    softcap: Optional[float] = None
    scale: float = 1.0

    def logit_kw(self, prefix: str = "") -> dict:
        """The onepass ops' keywords for this map: ``{prefix}logit_softcap`` and ``{prefix}logit_scale``
        (prefix "" for the policy / student, "ref_" or "teacher_" for the second model of a two-model op)."""
        return {f"{prefix}logit_softcap": self.softcap, f"{prefix}logit_scale": self.scale}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits, materialized: hidden [..., D] → [..., V] float32 (float64 for a float64 head), for
        the naive paths and SinKD.  The matmul runs in the head's dtype, the map in float32 (float64)."""
        z = hidden @ self.weight.T
        z = z if self.bias is None else z + self.bias
        z = z if z.dtype == torch.float64 else z.float()
        return LogitMap.from_public(1.0, self.softcap, self.scale).apply(z)

    def detached(self, device=None) -> "Head":
        """The same map with the weight and bias detached (tensors of their own, not the Parameters), moved to
        ``device`` (None: where they are)."""
        return replace(self, weight=self.weight.detach().to(device),
                       bias=None if self.bias is None else self.bias.detach().to(device))


def logit_softcap_and_scale(model: nn.Module) -> tuple[Optional[float], float]:
    """(c, s) of a Hugging Face causal LM whose forward returns the logits c·tanh(s·ℓ/c) (s·ℓ when c is None) of
    its LM head's output ℓ.

    Which config key means what is read by ``onepass.integrations._common.logit_postprocessing`` (one table for
    the integrations and the trainer), checked against transformers' modeling code: ``final_logit_softcapping``
    is c (Gemma 2/3/3n/4, VaultGemma, nanochat, ...); ``logit_scale`` (Cohere, Cohere 2), ``output_multiplier``
    (applied before the cap) and ``lm_head_multiplier`` (Falcon-H1) multiply; Granite and MiniCPM3 divide by
    ``logits_scaling`` (s = 1/logits_scaling), HyperCLOVA X multiplies by it.  Raises ``ValueError`` naming the
    key for a cap or scale that is not a finite number > 0, for a key of unknown meaning (``UNKNOWN_LOGIT_KEYS``)
    and for an LM head whose forward is not ``nn.Linear``'s (e.g. Dory's learned per-token logit scale).
    """
    name, cfg = type(model).__name__, model.config
    for key in UNKNOWN_LOGIT_KEYS:
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            raise ValueError(f"{name}: config.{key}={getattr(cfg, key)!r} is not a logit soft-cap or scale that the "
                             "trainer knows the meaning of (no transformers causal LM reads it)")
    out = model.get_output_embeddings()
    if out is None:
        raise ValueError(f"{name} has no output embeddings (LM head)")
    if not isinstance(out, nn.Linear) or type(out).forward is not nn.Linear.forward:
        raise ValueError(f"{name}: its LM head ({type(out).__name__}) is not a plain nn.Linear; the trainer "
                         "computes the logits as hidden @ weight.T + bias and would miss what its forward adds")
    try:
        scale, softcap = logit_postprocessing(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: its config's logit scale is not a number: {e}") from e
    check_logit_postprocessing(scale, softcap, f"{name}.config.")
    if not math.isfinite(scale) or (softcap is not None and not math.isfinite(softcap)):
        raise ValueError(f"{name}: the logit scale {scale} and final_logit_softcapping {softcap} of its config must "
                         "be finite")
    return (None if softcap is None else float(softcap)), scale


def load_model(path: str | Path, dtype: str, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    logit_softcap_and_scale(model)   # refuse what the trainer cannot reproduce, before training starts
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
    """The LM head (weight [V, D], bias [V] or None; tied embeddings share the input embedding) with the
    model's logit soft-cap and scale (``logit_softcap_and_scale``)."""
    out = model.get_output_embeddings()
    return Head(out.weight, getattr(out, "bias", None), *logit_softcap_and_scale(model))


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
