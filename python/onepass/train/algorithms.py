"""The part of a trainer that varies: how a rollout batch is scored and what the loss is.

The trainer skeleton (``trainer.Trainer``) owns config, data, rollouts, optimization, logging and
checkpoints; an ``Algorithm`` builds its extra frozen models (``setup``), turns a rollout into training
signals (``prepare``: rewards, advantages, old log-probs) and gives the loss of a micro-batch (``loss``).
GRPO is the one implemented here; on-policy distillation plugs in the same way (a teacher in ``setup``,
``onepass.opd_loss`` in ``loss``).
"""
from __future__ import annotations

from typing import Optional

import torch

import onepass

from . import modeling, rewards as rewards_mod
from .config import Config
from .rollout import Rollout


class Algorithm:
    """Interface of a training algorithm (see the module docstring)."""

    name = "base"

    def setup(self, cfg: Config, model, tokenizer, initial_path: str) -> None:
        raise NotImplementedError

    def prepare(self, model, batch: Rollout) -> dict:
        """Fill ``batch.extras`` with per-sequence / per-token tensors; return step metrics (floats)."""
        raise NotImplementedError

    def loss(self, model, micro: Rollout) -> tuple[torch.Tensor, dict]:
        """(scalar loss of the micro-batch with its own aggregation, metrics of detached scalars)."""
        raise NotImplementedError


def completion_hidden(model, batch: Rollout) -> torch.Tensor:
    """Hidden states that predict the completion tokens: [N, C, D] (positions P−1 .. P+C−2)."""
    h = modeling.last_hidden(model, batch.input_ids, batch.attention_mask)
    return h[:, batch.prompt_len - 1:-1]


def naive_grpo_loss(hidden, weight, targets, advantages, *, mask, old_logp, ref_hidden, ref_weight, bias,
                    ref_bias, temperature, beta, kl_estimator, divergence, divergence_beta, divergence_alpha,
                    **policy_kw):
    """The GRPO loss from materialized logits [N, C, V] (plain PyTorch ops of onepass's "torch" backend):
    what ``onepass.grpo_loss`` computes without them.  For tests and memory comparisons."""
    logits = (hidden @ weight.T + (bias if bias is not None else 0)).float()
    tk = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    logp, ent = onepass.token_logprobs(logits, tk, temperature=temperature, return_entropy=True, backend="torch")
    kl = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logits = (ref_hidden @ ref_weight.T + (ref_bias if ref_bias is not None else 0)).float()
        if kl_estimator == "full":
            kl = onepass.divergence(logits, ref_logits, kind=divergence, beta=divergence_beta, alpha=divergence_alpha,
                                    temperature=temperature, targets=tk, backend="torch")
        else:
            ref_logp = onepass.token_logprobs(ref_logits, tk, temperature=temperature, backend="torch")
            kl = onepass.kl_penalty(logp, ref_logp, estimator=kl_estimator)
    return onepass.policy_loss(logp, advantages, mask=mask, old_logp=old_logp, kl=kl, entropy=ent, beta=beta,
                               **policy_kw)


class GRPO(Algorithm):
    """Group-relative policy optimization with onepass's fused loss (``onepass.grpo_loss``)."""

    name = "grpo"

    def setup(self, cfg: Config, model, tokenizer, initial_path: str) -> None:
        self.cfg = cfg
        self.rewards = [rewards_mod.load_reward(r.function, r.weight) for r in cfg.rewards]
        self.reference: Optional[torch.nn.Module] = None
        if cfg.loss.beta != 0.0:
            self.reference = modeling.load_reference(initial_path, cfg.reference.path, list(cfg.reference.soup),
                                                     cfg.model.dtype)

    def prepare(self, model, batch: Rollout) -> dict:
        total, per_reward = rewards_mod.score(self.rewards, batch.prompts, batch.completions, batch.columns)
        r = torch.tensor(total, dtype=torch.float32)
        adv = onepass.group_advantages(r, group_size=self.cfg.rollout.num_generations,
                                       estimator=self.cfg.advantage.estimator, scale=self.cfg.advantage.scale)
        with torch.no_grad():
            h = completion_hidden(model, batch)
            hd = modeling.head(model)
            tk = torch.where(batch.completion_mask.bool(), batch.targets, torch.full_like(batch.targets, -100))
            old_logp = onepass.linear_token_logprobs(h, hd.weight, tk, bias=hd.bias,
                                                     temperature=self.cfg.rollout.temperature,
                                                     backend=self.cfg.loss.backend)
        batch.extras.update(advantages=adv, old_logp=old_logp, rewards=r)
        metrics = {"reward_mean": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 0.0}
        for name, values in per_reward.items():
            metrics[f"reward/{name}"] = sum(values) / len(values)
        return metrics

    def loss(self, model, micro: Rollout):
        L = self.cfg.loss
        h = completion_hidden(model, micro)
        hd = modeling.head(model)
        ref_h = ref_w = ref_b = None
        if self.reference is not None:
            with torch.no_grad():
                ref_h = completion_hidden(self.reference, micro)
                rhd = modeling.head(self.reference)
                ref_w, ref_b = rhd.weight, rhd.bias
        kw = dict(mask=micro.completion_mask, old_logp=micro.extras["old_logp"], ref_hidden=ref_h, ref_weight=ref_w,
                  bias=hd.bias, temperature=self.cfg.rollout.temperature, beta=L.beta, kl_estimator=L.kl_estimator,
                  epsilon_low=L.epsilon_low, epsilon_high=L.epsilon_high, dual_clip=L.dual_clip,
                  loss_agg=L.loss_agg, entropy_coef=L.entropy_coef)
        div = dict(divergence=L.divergence, divergence_beta=L.divergence_beta, divergence_alpha=L.divergence_alpha)
        if L.impl == "naive":
            return naive_grpo_loss(h, hd.weight, micro.targets, micro.extras["advantages"], ref_bias=ref_b, **kw,
                                   **div)
        return onepass.grpo_loss(h, hd.weight, micro.targets, micro.extras["advantages"], ref_bias=ref_b,
                                 ref_divergence=div["divergence"], ref_divergence_beta=div["divergence_beta"],
                                 ref_divergence_alpha=div["divergence_alpha"], backend=L.backend, **kw)


ALGORITHMS = {"grpo": GRPO}
