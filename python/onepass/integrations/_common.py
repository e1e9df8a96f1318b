"""Helpers shared by the trainer integrations: the LM head of a (possibly PEFT-wrapped) causal LM, its
logit post-processing, and the fused per-token log-prob / entropy call at the trainer's temperature.

Only onepass's public functions are used here; the trainers' own loss math is never copied.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

import onepass


class UnsupportedOption(ValueError):
    """A trainer option or model feature that the onepass integration cannot reproduce exactly."""


def refuse(option: str, why: str) -> UnsupportedOption:
    return UnsupportedOption(f"onepass integration: `{option}` is not supported: {why}")


def logit_postprocessing(config) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) of a transformers config (its text config for VLMs).

    The scale multiplies the logits before any soft-cap; the names follow the model families that use them
    (Cohere ``logit_scale``, ``output_multiplier``, Falcon-H1 ``lm_head_multiplier``, Granite/MiniCPM3 divide
    by ``logits_scaling`` and HyperCLOVA X multiplies by it).  Unscaled models give 1.0.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1.0 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def check_logit_postprocessing(logit_scale: float, softcap: float | None, who: str) -> None:
    """Refuse what the fused ops cannot reproduce: a non-positive logit scale or soft-cap.  A positive scale
    s and a soft-cap c > 0 are applied inside the ops as c·tanh(s·z/c) (the models' and TRL's order)."""
    if not logit_scale > 0:
        raise refuse(f"{who}logit_scale={logit_scale}", "the fused ops take a logit scale > 0")
    if softcap is not None and not softcap > 0:
        raise refuse(f"{who}final_logit_softcapping={softcap}", "a soft-cap c·tanh(z/c) needs c > 0")


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (LoRA adapters stay in place inside it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, D], bias [V] or None) of the model's LM head.  Tied embeddings give the embedding matrix
    itself, so its gradient accumulates into the one shared parameter as in the model's own forward.
    A PEFT adapter on the LM head is refused: its low-rank update is not part of ``weight``."""
    head = unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise refuse(f"{type(model).__name__} without get_output_embeddings()", "no LM head to fuse")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        raise refuse("PEFT adapter on lm_head",
                     "remove `lm_head` from the adapter's target_modules / modules_to_save")
    return head.weight, getattr(head, "bias", None)


def fused_token_logprobs(hidden, weight, bias, targets, *, temperature: float, logit_scale: float = 1.0,
                         logit_softcap: float | None = None, return_entropy: bool = False, ignore_index: int = -100):
    """Per-token log-prob (and entropy) of ``targets`` under softmax(c·tanh(s·z/c) / T), z = hidden @ weight.T
    + bias, s = ``logit_scale``, c = ``logit_softcap`` (None: softmax(s·z / T)).

    hidden [..., D], weight [V, D], bias [V] or None, targets [...] int64 → float32 [...] (or a pair).
    Under autocast the head runs in the autocast dtype (as the model's own ``lm_head`` would); otherwise a
    hidden state whose dtype differs from the weight is cast to the weight's dtype.  Accumulation is fp32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    ctx = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()
    with ctx:
        return onepass.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=float(temperature),
                                             logit_scale=logit_scale, logit_softcap=logit_softcap,
                                             ignore_index=ignore_index, return_entropy=return_entropy)


@torch.no_grad()
def mean_scaled_logits(hidden, weight, bias, *, temperature: float, logit_scale: float = 1.0,
                       logit_softcap: float | None = None, vocab_tile: int = 8192):
    """Mean over the vocabulary of the transformed logits c·tanh(s·z/c) / T (s·z / T without a cap),
    z = hidden @ weight.T + bias.  [N, D] → [N] float32.  Without a cap it is exact through
    hidden @ mean_v(weight) (+ mean(bias)); with one, summed over tiles of ``vocab_tile`` columns (memory
    N·vocab_tile)."""
    if logit_softcap is None:
        mean = hidden.float() @ weight.float().mean(0)
        if bias is not None:
            mean = mean + bias.float().mean()
        return mean * (logit_scale / temperature)
    total = torch.zeros(hidden.shape[0], device=hidden.device)
    for start in range(0, weight.shape[0], vocab_tile):
        tile = hidden.float() @ weight[start:start + vocab_tile].float().t()
        if bias is not None:
            tile += bias[start:start + vocab_tile].float()
        total += (logit_softcap * torch.tanh(tile * (logit_scale / logit_softcap))).sum(-1)
    return total / (weight.shape[0] * temperature)


@torch.no_grad()
def target_is_argmax(hidden, weight, bias, targets, *, vocab_tile: int = 8192):
    """Whether each target is the first arg-max of hidden @ weight.T (+ bias): [N, D], [V, D], [N] → [N] bool.

    A metric (no gradient): tiles of ``vocab_tile`` columns keep the memory at N·vocab_tile.
    A positive scale, a soft-cap (monotone) and the temperature do not move the arg-max, so they are not
    needed here.
    """
    n, v = hidden.shape[0], weight.shape[0]
    best = torch.full((n,), float("-inf"), device=hidden.device)
    best_before_target = torch.full((n,), float("-inf"), device=hidden.device)
    target_logit = torch.zeros((n,), device=hidden.device)
    for start in range(0, v, vocab_tile):
        stop = min(start + vocab_tile, v)
        tile = (hidden @ weight[start:stop].t()).float()
        if bias is not None:
            tile += bias[start:stop].float()
        columns = torch.arange(start, stop, device=hidden.device)
        best = torch.maximum(best, tile.max(-1).values)
        before = columns.unsqueeze(0) < targets.unsqueeze(1)
        best_before_target = torch.maximum(best_before_target,
                                           tile.masked_fill(~before, float("-inf")).max(-1).values)
        in_tile = (targets >= start) & (targets < stop)
        picked = tile.gather(1, (targets - start).clamp(0, stop - start - 1).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(in_tile, picked, target_logit)
    return (target_logit >= best) & (target_logit > best_before_target)
