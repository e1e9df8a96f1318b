"""The kernel contract: the one Python source of the integer codes shared with the kernels.

``Kind`` (divergence kinds), ``Stat`` (columns of the per-row stats array), ``Grad`` (columns of the
per-row upstream gradients) and ``DType`` (dtype codes of ``onepass._C``) are mirrored in
``csrc/common.h`` (a test compares the compiled values) and used by the Triton kernels; no other module
writes these integers.  ``VocabStats`` is the named view of a stats array (docs/vocab_stats.md).
"""
from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch
from torch import Tensor


class Kind(enum.IntEnum):
    """What the vocab-stats kernels compute besides lse/logp/entropy (docs/vocab_stats.md, φ table)."""

    NONE = 0
    REVERSE_KL = 1
    FORWARD_KL = 2
    JSD = 3
    TV = 4
    HELLINGER = 5
    CHI2 = 6
    ALPHA = 7


NUM_KINDS = len(Kind)


class Stat(enum.IntEnum):
    """Columns of the per-row stats array [N, NUM_STATS] written by the forward kernels."""

    LSE_A = 0
    LSE_B = 1
    LOGP_A = 2
    LOGP_B = 3
    ENTROPY = 4
    DIV = 5
    SUM_A = 6
    SUM_B = 7


NUM_STATS = len(Stat)


class Grad(enum.IntEnum):
    """Columns of the per-row upstream gradients [N, NUM_GRADS] read by the backward kernels."""

    LOGP_A = 0
    LOGP_B = 1
    ENTROPY = 2
    DIV = 3


NUM_GRADS = len(Grad)
#: The stats column each upstream-gradient column differentiates.
GRAD_STATS = (Stat.LOGP_A, Stat.LOGP_B, Stat.ENTROPY, Stat.DIV)


class DType(enum.IntEnum):
    """dtype codes of the compiled kernels."""

    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2
    FLOAT64 = 3


TORCH_DTYPES = {torch.float32: DType.FLOAT32, torch.float16: DType.FLOAT16, torch.bfloat16: DType.BFLOAT16,
                torch.float64: DType.FLOAT64}

class Cost(enum.IntEnum):
    """Ground costs of the Sinkhorn distance (``onepass.sinkhorn_distance(cost=...)``)."""

    L1 = 0
    SQEUCLIDEAN = 1
    HELLINGER = 2


#: Group-advantage estimators and scales; the position is the kernels' code.
ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
ADVANTAGE_SCALES = ("group", "batch", "none")

#: Public divergence names (``onepass.divergence(kind=...)``) and their kernel kinds.
DIVERGENCES = {"reverse_kl": Kind.REVERSE_KL, "forward_kl": Kind.FORWARD_KL, "jsd": Kind.JSD, "tv": Kind.TV,
               "hellinger": Kind.HELLINGER, "chi2": Kind.CHI2, "alpha": Kind.ALPHA}


def kernel_kind(name: str, beta: float, alpha: float) -> tuple[Kind, float, float]:
    """Validate a public divergence (name, β, α) and return the kernel's (kind, β, α): the KL end
    points of jsd (β ∈ {0, 1}) and alpha (α ∈ {1, 0}) run as the KL kinds, so kernels see 0 < β < 1
    and α ∉ {0, 1}."""
    if name not in DIVERGENCES:
        raise ValueError(f"kind must be one of {tuple(DIVERGENCES)}, got {name!r}")
    beta, alpha = float(beta), float(alpha)
    kind = DIVERGENCES[name]
    if kind == Kind.JSD:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] for kind='jsd', got {beta}")
        kind = {0.0: Kind.FORWARD_KL, 1.0: Kind.REVERSE_KL}.get(beta, kind)
    if kind == Kind.ALPHA:
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        kind = {1.0: Kind.REVERSE_KL, 0.0: Kind.FORWARD_KL}.get(alpha, kind)
    return kind, beta, alpha


def hyperparameters(*values: float) -> Tensor:
    """Continuous hyperparameters (1/T, β, α, ...) as the float64 CPU tensor [len(values)] the custom ops
    take: a float argument of a custom op is specialized (a new value recompiles under torch.compile),
    a tensor input is not.  Built as ``ones * value``, which torch.compile's float-to-tensor pass keeps
    symbolic (``torch.tensor([value])`` would bake the value into the graph)."""
    return torch.cat([torch.ones(1, dtype=torch.float64) * v for v in values])


class LogitMap(NamedTuple):
    """The kernels' per-model map of a raw logit ℓ (loaded or computed from hidden @ weight.T + bias) to
    the logit the softmax sees:

        a = inv_temp_a · softcap_a · tanh(ℓ / softcap_a)   (a = inv_temp_a · ℓ when softcap_a = 0)

    and b likewise with ``inv_temp_b``, ``softcap_b`` (a = policy / student, b = reference / teacher).
    The public keywords map to it by ``from_public``: logit scale s, soft-cap c, temperature T give
    c·tanh(s·ℓ/c)/T, the order of HF's Gemma-2/Cohere heads and TRL's chunked kernels (scale, cap,
    then temperature).  The four floats are runtime values of every kernel (docs/vocab_stats.md)."""

    inv_temp_a: float = 1.0
    softcap_a: float = 0.0
    inv_temp_b: float = 1.0
    softcap_b: float = 0.0

    def apply(self, z: Tensor, model: int = 0) -> Tensor:
        """The map of model ``model`` (0 = a, 1 = b) on raw logits ``z`` (any shape; plain torch ops)."""
        inv_temp, softcap = self[2 * model], self[2 * model + 1]
        if softcap > 0:
            z = softcap * torch.tanh(z / softcap)
        return z * inv_temp

    @staticmethod
    def model(temperature: float, softcap: float | None, scale: float) -> tuple[float, float]:
        """(inv_temp, softcap) of one model: c·tanh(s·ℓ/c)/T = (s/T)·(c/s)·tanh(ℓ/(c/s))."""
        return scale / temperature, (0.0 if softcap is None else softcap / scale)

    @classmethod
    def plain(cls, inv_temp: float) -> "LogitMap":
        """Both models at the inverse temperature ``inv_temp``, no scale, no cap."""
        return cls(inv_temp, 0.0, inv_temp, 0.0)

    @classmethod
    def from_public(cls, temperature: float, softcap_a: float | None = None, scale_a: float = 1.0,
                    softcap_b: float | None = None, scale_b: float = 1.0) -> "LogitMap":
        """The map of validated public values (T > 0, caps None or > 0, scales > 0)."""
        return cls(*cls.model(temperature, softcap_a, scale_a), *cls.model(temperature, softcap_b, scale_b))


def stats_dtype(x: Tensor) -> torch.dtype:
    """Stats (and every op output) are float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class VocabStats:
    """Named view of a stats array [..., NUM_STATS]: ``stats.logp_a`` is ``tensor[..., Stat.LOGP_A]``.

    a = policy / student, b = reference / teacher.  Columns: ``lse_a``, ``lse_b`` (log-sum-exp of the
    scaled logits), ``logp_a``, ``logp_b`` (target log-probs), ``entropy`` (of a), ``div`` (the
    divergence of ``kind``), ``sum_a``, ``sum_b`` (backward workspace).  Ignored rows are all 0."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def _col(self, stat: Stat) -> Tensor:
        return self.tensor[..., int(stat)]

    lse_a = property(lambda self: self._col(Stat.LSE_A))
    lse_b = property(lambda self: self._col(Stat.LSE_B))
    logp_a = property(lambda self: self._col(Stat.LOGP_A))
    logp_b = property(lambda self: self._col(Stat.LOGP_B))
    entropy = property(lambda self: self._col(Stat.ENTROPY))
    div = property(lambda self: self._col(Stat.DIV))
    sum_a = property(lambda self: self._col(Stat.SUM_A))
    sum_b = property(lambda self: self._col(Stat.SUM_B))

    def view(self, *shape: int) -> "VocabStats":
        """The stats of rows reshaped to ``shape`` (leading dims of the inputs)."""
        return VocabStats(self.tensor.reshape(*shape, NUM_STATS))

    def __getitem__(self, rows) -> "VocabStats":
        return VocabStats(self.tensor[rows])

    def detach(self) -> "VocabStats":
        return VocabStats(self.tensor.detach())
