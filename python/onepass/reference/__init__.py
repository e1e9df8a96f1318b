"""Plain-PyTorch references (float64-capable): the oracle of every backend, the ``"torch"`` backend and
the naive side of every benchmark."""
from .vocab import (  # noqa: F401
    divergence,
    divergence_from_logprobs,
    kl_penalty,
    linear_divergence,
    linear_policy_ref_stats,
    linear_token_logprobs,
    token_logprobs,
)
from .advantages import group_advantages  # noqa: F401
from .sinkhorn import sinkhorn_distance  # noqa: F401
