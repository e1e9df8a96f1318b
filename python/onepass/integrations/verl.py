"""verl (0.9) at the log-prob level.

Functions with the signatures and meaning of verl's own (importing this module does not import verl):

* ``FusedLinearForPPO`` / ``fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature)`` →
  (log_probs, entropy): verl's torch fused path (``verl.utils.experimental.torch_functional``), used by the
  actor with ``use_fused_kernels=True, fused_kernels_backend="torch"``.
* ``linear_cross_entropy(hidden, weight, labels, temperature, reduction="none", dist_process_group=None)`` →
  (log_probs, entropy): verl's Triton fused path (``verl.utils.kernel.linear_cross_entropy``), used with
  ``fused_kernels_backend="triton"``.
* ``logprobs_from_logits(logits, labels)`` and ``entropy_from_logits(logits)`` on logits input
  (``verl.utils.torch_functional``).

``patch()`` installs them in verl's modules (the fused forwards of ``verl.models.transformers`` import the
fused functions at call time, so the actor's ``use_fused_kernels`` path then runs onepass); modules that
already imported ``logprobs_from_logits`` / ``entropy_from_logits`` by name are rebound too.  ``unpatch()``
restores verl's.  Refused (``UnsupportedOption``): ``reduction`` other than "none" and a vocabulary-parallel
``dist_process_group`` in ``linear_cross_entropy``.  Outputs are float32 (verl's logits path returns the
logits' dtype).
"""
from __future__ import annotations

import sys

import torch

import onepass

from ._common import UnsupportedOption, refuse

__all__ = ["FusedLinearForPPO", "UnsupportedOption", "entropy_from_logits", "fused_linear_for_ppo",
           "linear_cross_entropy", "logprobs_from_logits", "patch", "unpatch"]


def fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
    """hidden_states [..., D], vocab_weights [V, D], input_ids [...] → (log_probs, entropy) [...] float32 of
    softmax(hidden_states @ vocab_weights.T / T); both differentiable, the [.., V] logits never built."""
    return onepass.linear_token_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                         temperature=float(temperature), return_entropy=True)


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``chunk_size`` is accepted
    for compatibility; onepass tiles the vocabulary itself)."""

    def __init__(self, chunk_size: int = 512):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature)


def linear_cross_entropy(hidden, weight, labels, temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None):
    """Drop-in for verl's Triton ``linear_cross_entropy``: hidden [..., D] or [N, D], weight [V, D], labels →
    (log_probs [N], entropy [N]) float32, flattened over the leading dimensions like verl's."""
    if reduction != "none":
        raise refuse(f"reduction={reduction!r}", "verl's fused actor path uses reduction='none'; only that is provided")
    if dist_process_group is not None:
        raise refuse("dist_process_group", "a vocabulary-parallel LM head is not supported")
    logp, entropy = fused_linear_for_ppo(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                         temperature)
    return logp, entropy


def logprobs_from_logits(logits, labels, inplace_backward: bool = True):
    """log_softmax(logits)[labels]: logits [..., V], labels [...] → [...] float32 (``inplace_backward`` is
    accepted for compatibility; no logits-sized gradient buffer is kept either way)."""
    return onepass.token_logprobs(logits, labels)


def entropy_from_logits(logits):
    """Entropy of softmax(logits): [..., V] → [...] float32, differentiable."""
    placeholder_targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return onepass.token_logprobs(logits, placeholder_targets, return_entropy=True)[1]


_REPLACEMENTS = {
    "verl.utils.experimental.torch_functional": {"FusedLinearForPPO": FusedLinearForPPO},
    "verl.utils.kernel.linear_cross_entropy": {"linear_cross_entropy": linear_cross_entropy},
    "verl.utils.torch_functional": {"logprobs_from_logits": logprobs_from_logits,
                                    "entropy_from_logits": entropy_from_logits},
}
_originals: list[tuple[object, str, object]] = []


def patch() -> None:
    """Install the drop-ins in verl (idempotent).  Needs verl's modules importable (see the docs page)."""
    import importlib

    if _originals:
        return
    swapped = {}
    for module_name, names in _REPLACEMENTS.items():
        module = importlib.import_module(module_name)
        for name, replacement in names.items():
            original = getattr(module, name)
            swapped[id(original)] = replacement
            _originals.append((module, name, original))
            setattr(module, name, replacement)
    # Modules that did `from verl.utils.torch_functional import logprobs_from_logits` hold the original object.
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("verl.") and module is not None:
            for name, value in list(vars(module).items()):
                if id(value) in swapped and (module, name, value) not in _originals:
                    _originals.append((module, name, value))
                    setattr(module, name, swapped[id(value)])


def unpatch() -> None:
    for module, name, original in reversed(_originals):
        setattr(module, name, original)
    _originals.clear()
