"""OpenRLHF (0.11) at the log-prob level.

* ``log_probs_from_logits(logits, labels, temperature)``, ``compute_entropy(logits)`` and
  ``compute_approx_kl(log_probs, log_probs_base, log_probs_old, kl_estimator, unbiased_gradient)``: the
  functions of ``openrlhf.models.utils`` with the same meaning (``log_probs_from_logits`` does not divide
  ``logits`` in place, unlike OpenRLHF's).
* ``actor_log_probs(model, sequences, attention_mask, action_mask, temperature, return_entropy)``: what
  ``openrlhf.models.Actor.forward`` computes for unpacked batches, from the backbone's last hidden states
  and the LM head in one fused vocabulary sweep (no [B, L, V] logits, no fp32 copy of them).
* ``patch_actor(actor)``: routes an ``Actor`` instance's ``forward`` through ``actor_log_probs``.  Refused
  (``UnsupportedOption``): ``packing_samples`` / ring attention, multimodal inputs, and calls that want the
  logits themselves (``return_output=True`` without ``action_mask`` or ``return_logprobs``).

Importing this module does not import openrlhf (which needs DeepSpeed and flash-attn).
"""
from __future__ import annotations

import types

import torch

import onepass

from ._common import (UnsupportedOption, check_logit_postprocessing, fused_token_logprobs, logit_postprocessing,
                      output_head, refuse, unwrap_peft)

__all__ = ["UnsupportedOption", "actor_log_probs", "compute_approx_kl", "compute_entropy", "log_probs_from_logits",
           "patch_actor"]

# OpenRLHF bounds every estimator's value to ±10; the log-ratio clamp of onepass.kl_penalty (20) is wide
# enough that it never changes a value inside those bounds nor a gradient outside the saturated region.
KL_VALUE_BOUND = 10.0
KL_LOG_RATIO_CLAMP = 20.0
KL_IS_WEIGHT_CLIP = 10.0


def log_probs_from_logits(logits, labels, temperature: float = 1.0):
    """log softmax(logits / T)[labels]: [..., V], [...] → [...] float32."""
    return onepass.token_logprobs(logits, labels, temperature=float(temperature))


def compute_entropy(logits):
    """Entropy of softmax(logits): [..., V] → [...] float32."""
    placeholder_targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return onepass.token_logprobs(logits, placeholder_targets, return_entropy=True)[1]


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator: str = "k1",
                      unbiased_gradient: bool = False):
    """Sampled-token KL estimate, x = log_probs − log_probs_base: "k1" x, "k2" x²/2, "k3" exp(−x) + x − 1,
    bounded to ±10 as in OpenRLHF.  ``unbiased_gradient``: the value of the estimator with the gradient of
    w·x²/2, w = exp(log_probs − log_probs_old) clipped at 10 and detached (w = 1 without ``log_probs_old``)."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
    log_probs, log_probs_base = log_probs.float(), log_probs_base.float()
    value = onepass.kl_penalty(log_probs, log_probs_base, estimator=kl_estimator, clamp=KL_LOG_RATIO_CLAMP)
    value = value.clamp(-KL_VALUE_BOUND, KL_VALUE_BOUND)
    if not unbiased_gradient:
        return value
    weight = 1.0
    if log_probs_old is not None:
        weight = (log_probs - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = weight * (log_probs - log_probs_base) ** 2 / 2.0
    return value.detach() + surrogate - surrogate.detach()


def _backbone_hidden(model, sequences, attention_mask):
    """Last hidden states [B, L, D] of a causal LM (PEFT-wrapped or not), positions as OpenRLHF's actor."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    backbone = unwrap_peft(model).base_model
    out = backbone(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def actor_log_probs(model, sequences, attention_mask, action_mask=None, temperature: float = 1.0,
                    return_entropy: bool = False):
    """OpenRLHF ``Actor.forward`` (unpacked) from hidden states.

    sequences, attention_mask [B, L]; action_mask [B, A] or None.  Returns log_probs [B, L−1] of each next
    token under softmax(logits / T), the logits with the model's logit scale and final soft-cap applied
    inside the op (or, with ``action_mask``, the last A of them times the mask), and with
    ``return_entropy`` the entropy [B, L−1] as well.  float32, differentiable.
    """
    base = unwrap_peft(model)
    scale, softcap = logit_postprocessing(base.config)
    check_logit_postprocessing(scale, softcap, "model.config.")
    weight, bias = output_head(model)
    hidden = _backbone_hidden(model, sequences, attention_mask)
    next_tokens = torch.roll(sequences, shifts=-1, dims=1)
    result = fused_token_logprobs(hidden, weight, bias, next_tokens, temperature=temperature, logit_scale=scale,
                                  logit_softcap=softcap, return_entropy=return_entropy)
    log_probs, entropy = result if return_entropy else (result, None)
    log_probs = log_probs[:, :-1]
    if action_mask is not None:
        log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
    return (log_probs, entropy[:, :-1]) if return_entropy else log_probs


def patch_actor(actor):
    """Replace ``actor.forward`` (an ``openrlhf.models.Actor``) by the fused path; returns ``actor``."""
    if getattr(actor, "packing_samples", False):
        raise refuse("packing_samples=True", "packed / ring-attention batches are not supported")

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False, allgather_logits=False,
                return_logprobs=False, ring_attn_group=None, packed_seq_lens=None, return_entropy=False,
                **mm_inputs):
        if ring_attn_group is not None or packed_seq_lens is not None:
            raise refuse("ring_attn_group / packed_seq_lens", "packed / ring-attention batches are not supported")
        if mm_inputs:
            raise refuse(f"multimodal inputs {sorted(mm_inputs)}", "only text actors are supported")
        if action_mask is None and not return_logprobs:
            raise refuse("return_output without action_mask or return_logprobs", "the logits are never built")
        result = actor_log_probs(self.model, sequences, attention_mask, action_mask,
                                 temperature=self.temperature, return_entropy=return_entropy)
        log_probs, entropy = result if return_entropy else (result, None)
        if not return_output:
            return log_probs
        from transformers.modeling_outputs import CausalLMOutputWithPast

        output = CausalLMOutputWithPast()
        if return_entropy:
            output.entropy = entropy
        return log_probs, output

    actor.forward = types.MethodType(forward, actor)
    return actor
