"""onepass: everything an RL / distillation trainer computes over the vocabulary, in one pass.

Public API (docs/api.md in the repository): token log-probs and entropy, KL to a reference, f-divergences, Sinkhorn
distances, group advantages and fused GRPO / OPD losses; ``onepass.nn`` holds module wrappers.
Importing onepass never initializes CUDA.
"""
from ._dispatch import available_backends
from .advantages import group_advantages, reinforce_pp_returns
from .divergence import divergence, linear_divergence
from .kl import kl_penalty, linear_policy_ref_stats
from .logprobs import linear_token_logprobs, token_logprobs
from .losses import grpo_loss, opd_loss, policy_loss
from .sinkhorn import sinkhorn_distance
from . import nn  # noqa: E402  (modules wrapping the functions above)
from . import distributed  # noqa: E402  (vocabulary-parallel variants, FSDP2 helper)
from . import corrections, presets  # noqa: E402  (off-policy corrections, peer-trainer loss presets)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "divergence",
    "group_advantages",
    "reinforce_pp_returns",
    "grpo_loss",
    "kl_penalty",
    "linear_divergence",
    "linear_policy_ref_stats",
    "linear_token_logprobs",
    "opd_loss",
    "policy_loss",
    "sinkhorn_distance",
    "token_logprobs",
]
