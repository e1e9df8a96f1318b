"""The part of a trainer that varies: how a rollout batch is scored and what the loss is.

The trainer skeleton (``trainer.Trainer``) owns config, data, rollouts, optimization, logging and
checkpoints; an ``Algorithm`` builds its extra frozen models (``setup``), turns a rollout into training
signals (``prepare``: rewards, advantages, old log-probs) and gives the loss of a micro-batch (``loss``).
GRPO, on-policy distillation (OPD, G-OPD / ExOPD: a frozen teacher in ``setup``, ``onepass.opd_loss`` in
``loss``), KDRL (the GRPO loss plus a divergence to the teacher, from the same sweep), offline distillation
with SinKD, and BD-KD (online mutual distillation: the teacher trains too; ``trained_models`` hands it to the
trainer's optimizer and checkpoints) are implemented.

Every op call carries each model's logit soft-cap and scale (``modeling.Head.logit_kw``: the policy's, the
reference's and the teacher's, each from its own config), so the losses and log-probs are those of the
models' own logits c·tanh(s·ℓ/c) / T, the distribution HF ``generate`` and vLLM sample from.
"""
from __future__ import annotations

import abc

from dataclasses import replace
from typing import Optional

import torch

import onepass
from onepass.losses import aggregation_weights

from . import modeling, rewards as rewards_mod
from .config import Config
from .parallel import Parallel
from .rollout import Rollout, fixed_batch, generate


class Algorithm(abc.ABC):
    """Interface of a training algorithm (see the module docstring)."""

    name = "base"
    plotted = ("reward_mean", "kl", "entropy", "response_length")   # the panels of plots.png
    parallel = Parallel("none")      # set by the trainer: this rank's place in a torchrun job

    @abc.abstractmethod
    def setup(self, cfg: Config, model, tokenizer, initial_path: str, teacher_path: Optional[str] = None) -> None:
        """Load what the algorithm needs besides the policy (rewards, reference, teacher)."""

    engine = None                    # set by the trainer with rollout.engine: vllm (a rollout_vllm.VLLMEngine)

    def rollout(self, model, tokenizer, texts: list[str], columns: dict[str, list]) -> Rollout:
        """The step's batch: ``rollout.num_generations`` samples per prompt, from HF ``generate`` or the vLLM
        engine (offline algorithms override it)."""
        if self.engine is not None:
            return self.engine.generate(model, tokenizer, texts, columns, self.cfg.rollout)
        return generate(model, tokenizer, texts, columns, self.cfg.rollout)

    @abc.abstractmethod
    def prepare(self, model, batch: Rollout) -> dict:
        """Fill ``batch.extras`` with per-sequence / per-token tensors; return step metrics (floats)."""

    @abc.abstractmethod
    def loss(self, model, micro: Rollout) -> tuple[torch.Tensor, dict]:
        """(scalar loss of the micro-batch with its own aggregation, metrics of detached scalars)."""

    def trained_models(self) -> dict:
        """Models trained besides the policy, by name (BD-KD's teacher): the trainer optimizes their parameters
        with the policy's, checkpoints them as ``checkpoint-<step>/<name>`` and writes ``final_<name>``."""
        return {}


def completion_hidden(model, batch: Rollout) -> torch.Tensor:
    """Hidden states that predict the completion tokens: [N, C, D] (positions P−1 .. P+C−2), on the model's
    device (the batch is moved there)."""
    device = next(model.parameters()).device
    h = modeling.last_hidden(model, batch.input_ids.to(device), batch.attention_mask.to(device))
    return h[:, batch.prompt_len - 1:-1]


def masked_targets(batch: Rollout) -> torch.Tensor:
    """The completion tokens [N, C] with −100 after each sequence's end."""
    return torch.where(batch.completion_mask.bool(), batch.targets, torch.full_like(batch.targets, -100))


def frozen_hidden_and_head(model, batch: Rollout, device, offload: bool = False) -> tuple[torch.Tensor, modeling.Head]:
    """A frozen model's completion hidden states [N, C, D] and LM head (``modeling.Head``: weight [V, D], bias [V]
    or None, detached, with the model's logit soft-cap and scale), all on ``device`` (the trained model's: the
    fused sweep needs both heads on one device).  The forward runs on the frozen model's own device
    (``teacher.device``); with ``offload`` the model, kept on the CPU, is moved to ``device`` for the forward and
    back (a host-device copy of its weights each call, i.e. per micro-batch; its head stays on ``device`` until
    the returned tensors are freed)."""
    if offload:
        model.to(device)
    try:
        with torch.no_grad():
            # detached: tensors of their own, not the Parameters whose data ``model.to("cpu")`` swaps below
            return completion_hidden(model, batch).to(device), modeling.head(model).detached(device)
    finally:
        if offload:
            model.to("cpu")


def naive_grpo_loss(hidden, weight, targets, advantages, *, mask, old_logp, ref_hidden, ref_weight, bias,
                    ref_bias, temperature, beta, kl_estimator, divergence, divergence_beta, divergence_alpha,
                    logit_softcap=None, logit_scale=1.0, ref_logit_softcap=None, ref_logit_scale=1.0, **policy_kw):
    """The GRPO loss from materialized logits [N, C, V] (plain PyTorch ops of onepass's "torch" backend, with
    each model's soft-cap and scale): what ``onepass.grpo_loss`` computes without them.  For tests and memory
    comparisons."""
    logits = (hidden @ weight.T + (bias if bias is not None else 0)).float()
    tk = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    cap = dict(logit_softcap=logit_softcap, logit_scale=logit_scale)
    ref_cap = dict(logit_softcap=ref_logit_softcap, logit_scale=ref_logit_scale)
    logp, ent = onepass.token_logprobs(logits, tk, temperature=temperature, return_entropy=True, backend="torch", **cap)
    kl = ref_logp = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logits = (ref_hidden @ ref_weight.T + (ref_bias if ref_bias is not None else 0)).float()
        if kl_estimator == "full":
            kl = onepass.divergence(logits, ref_logits, kind=divergence, beta=divergence_beta, alpha=divergence_alpha,
                                    temperature=temperature, targets=tk, backend="torch", **cap,
                                    teacher_logit_softcap=ref_logit_softcap, teacher_logit_scale=ref_logit_scale)
        else:   # the estimator (with the KL options' clamps and gradient) is applied by policy_loss
            ref_logp = onepass.token_logprobs(ref_logits, tk, temperature=temperature, backend="torch", **ref_cap)
    return onepass.policy_loss(logp, advantages, mask=mask, old_logp=old_logp, ref_logp=ref_logp, kl=kl, entropy=ent,
                               beta=beta, kl_estimator=kl_estimator, **policy_kw)


class GRPO(Algorithm):
    """Group-relative policy optimization with onepass's fused loss (``onepass.grpo_loss``)."""

    name = "grpo"

    def setup(self, cfg: Config, model, tokenizer, initial_path: str, teacher_path: Optional[str] = None) -> None:
        self.cfg = cfg
        self.loss_cfg = cfg.loss
        self.rewards = [rewards_mod.load_reward(r.function, r.weight) for r in cfg.rewards]
        self.reference: Optional[torch.nn.Module] = None
        self.reference_offload = False
        if cfg.loss.beta != 0.0:
            self.reference = modeling.load_reference(initial_path, cfg.reference.path, list(cfg.reference.soup),
                                                     cfg.model.dtype)

    def prepare(self, model, batch: Rollout) -> dict:
        r, metrics = self.score(batch)
        adv = self.advantages(r, batch.completion_mask)
        with torch.no_grad():
            h = completion_hidden(model, batch)
            hd = modeling.head(model)
            old_logp = onepass.linear_token_logprobs(h, hd.weight, masked_targets(batch), bias=hd.bias,
                                                     temperature=self.cfg.rollout.temperature,
                                                     backend=self.cfg.loss.backend, **hd.logit_kw())
        batch.extras.update(advantages=adv, old_logp=old_logp)
        if self.loss_cfg.rollout_correction is not None:
            batch.extras["token_weights"] = onepass.corrections.rollout_is_weights(
                old_logp, batch.extras["sampling_logp"], batch.completion_mask, **self.loss_cfg.rollout_correction)
        return metrics

    def advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``onepass.group_advantages`` of this rank's sequences ([N], or [N, C] with token whitening), computed
        over every rank's rewards (batch-level scales and whitening see the whole batch)."""
        a = self.cfg.advantage
        all_r, all_mask = self.parallel.gather(rewards), self.parallel.gather(mask)
        kw = dict(estimator=a.estimator, scale=a.scale, eps=a.eps, singleton=a.singleton)
        if a.estimator == "rloo":
            kw["normalize"] = a.normalize
        if a.estimator == "opo":
            kw["lengths"] = all_mask.sum(-1)
        if a.estimator == "reinforce_pp":
            kw.update(whiten=a.whiten, variance=a.variance, mask=all_mask if a.whiten == "token" else None)
        adv = onepass.group_advantages(all_r, group_size=self.cfg.rollout.num_generations, **kw)
        return adv[self.parallel.local_slice(len(all_r))]

    def score(self, batch: Rollout) -> tuple[torch.Tensor, dict]:
        """The task rewards [N] (also stored as ``batch.extras["rewards"]``) and their step metrics."""
        total, per_reward = rewards_mod.score(self.rewards, batch.prompts, batch.completions, batch.columns)
        r = torch.tensor(total, dtype=torch.float32)
        batch.extras["rewards"] = r
        metrics = {"reward_mean": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 0.0}
        for name, values in per_reward.items():
            metrics[f"reward/{name}"] = sum(values) / len(values)
        return r, metrics

    def loss(self, model, micro: Rollout):
        L = self.loss_cfg
        h = completion_hidden(model, micro)
        hd = modeling.head(model)
        ref_h = ref = None
        if self.reference is not None:
            ref_h, ref = frozen_hidden_and_head(self.reference, micro, h.device, self.reference_offload)
        kw = dict(mask=micro.completion_mask, old_logp=micro.extras["old_logp"], ref_hidden=ref_h,
                  ref_weight=None if ref is None else ref.weight, bias=hd.bias,
                  ref_bias=None if ref is None else ref.bias, **hd.logit_kw(),
                  **({} if ref is None else ref.logit_kw("ref_")),
                  temperature=self.cfg.rollout.temperature, beta=L.beta, kl_estimator=L.kl_estimator,
                  epsilon_low=L.epsilon_low, epsilon_high=L.epsilon_high, dual_clip=L.dual_clip,
                  loss_agg=L.loss_agg, entropy_coef=L.entropy_coef, token_weights=micro.extras.get("token_weights"),
                  sampling_logp=micro.extras.get("sampling_logp") if "off_policy_threshold" in L.options else None,
                  **L.options)
        div = dict(divergence=L.divergence, divergence_beta=L.divergence_beta, divergence_alpha=L.divergence_alpha)
        if L.impl == "naive":
            return naive_grpo_loss(h, hd.weight, micro.targets, micro.extras["advantages"], **kw, **div)
        return onepass.grpo_loss(h, hd.weight, micro.targets, micro.extras["advantages"],
                                 ref_divergence=div["divergence"], ref_divergence_beta=div["divergence_beta"],
                                 ref_divergence_alpha=div["divergence_alpha"], backend=L.backend, **kw)


def naive_opd_loss(hidden, weight, teacher_hidden, teacher_weight, targets, *, mask, divergence, beta, alpha,
                   reward_scale, ref_logp, temperature, loss_agg, logit_softcap=None, logit_scale=1.0,
                   teacher_logit_softcap=None, teacher_logit_scale=1.0):
    """The OPD loss from materialized logits [N, C, V] (plain PyTorch ops of onepass's "torch" backend, with
    each model's soft-cap and scale):
    a full-vocabulary kind is agg(D(p, q)); sampled_reverse_kl is agg(−r·ratio) with the detached G-OPD reward
    r = λ(log q − log π_ref) − (log p − log π_ref) (π_ref = p when ``ref_logp`` is None) and ratio 1 carrying
    the gradient of log p.  What ``onepass.opd_loss`` computes without the logits; for tests and memory
    comparisons.  Returns (loss, mean per-token divergence)."""
    logits = (hidden @ weight.T).float()
    with torch.no_grad():
        t_logits = (teacher_hidden @ teacher_weight.T).float()
    tk = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    n = mask.sum().clamp_min(1)
    cap = dict(logit_softcap=logit_softcap, logit_scale=logit_scale)
    t_cap = dict(logit_softcap=teacher_logit_softcap, logit_scale=teacher_logit_scale)
    if divergence == "sampled_reverse_kl":
        logp = onepass.token_logprobs(logits, tk, temperature=temperature, backend="torch", **cap)
        t_logp = onepass.token_logprobs(t_logits, tk, temperature=temperature, backend="torch", **t_cap)
        ref = logp.detach() if ref_logp is None else ref_logp
        reward = (reward_scale * (t_logp - ref) - (logp.detach() - ref)) * mask
        loss, _ = onepass.policy_loss(logp, reward, mask=mask, loss_agg=loss_agg)
        return loss, ((logp.detach() - t_logp) * mask).sum() / n
    div = onepass.divergence(logits, t_logits, kind=divergence, beta=beta, alpha=alpha, temperature=temperature,
                             targets=tk, backend="torch", teacher_logit_softcap=teacher_logit_softcap,
                             teacher_logit_scale=teacher_logit_scale, **cap)
    logp = onepass.token_logprobs(logits.detach(), tk, temperature=temperature, backend="torch", **cap)
    loss, _ = onepass.policy_loss(logp, torch.zeros_like(logp), mask=mask, kl=div, beta=1.0, loss_agg=loss_agg)
    return loss, (div.detach() * mask).sum() / n


def load_teacher(cfg: Config, tokenizer, model, teacher_path: str, trained: bool = False):
    """The teacher on ``teacher.device`` (on the CPU with ``teacher.offload``), frozen unless ``trained``
    (BD-KD); its tokenizer and LM head must match the student's vocabulary."""
    teacher = modeling.load_model(teacher_path, cfg.model.dtype)
    if not trained:
        modeling.frozen(teacher)
    if cfg.teacher.device and not cfg.teacher.offload:
        teacher.to(cfg.teacher.device)
    check_same_vocabulary(tokenizer, modeling.load_tokenizer(teacher_path), model, teacher, teacher_path)
    return teacher


def check_same_vocabulary(student_tok, teacher_tok, student, teacher, teacher_path) -> None:
    """Distillation compares the two models token by token: same token → id map and the same LM-head rows."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s, only_t = sorted(sv.keys() - tv.keys())[:5], sorted(tv.keys() - sv.keys())[:5]
        moved = sorted(k for k in sv.keys() & tv.keys() if sv[k] != tv[k])[:5]
        raise ValueError(f"teacher.path {teacher_path!r}: the teacher's tokenizer does not share the student's "
                         f"vocabulary ({len(tv)} vs {len(sv)} tokens; only in the student: {only_s}, only in "
                         f"the teacher: {only_t}, different ids: {moved}); distillation needs the same vocabulary")
    vs, vt = modeling.head(student).weight.shape[0], modeling.head(teacher).weight.shape[0]
    if vs != vt:
        raise ValueError(f"teacher.path {teacher_path!r}: the teacher's LM head has {vt} rows, the student's {vs}; "
                         "distillation needs the same vocabulary size")


class OPD(Algorithm):
    """On-policy distillation: the student samples, the frozen teacher scores the samples, the loss is
    ``onepass.opd_loss`` (both LM heads in one vocabulary sweep).  With distill.divergence: sampled_reverse_kl
    and distill.reward_scale λ ≠ 1 it is G-OPD (λ > 1: ExOPD) with the reference π_ref (reference.path, by
    default the initial student).  The task rewards are computed and logged, not trained on."""

    name = "opd"
    plotted = ("reward_mean", "divergence", "response_length", "grad_norm")

    def setup(self, cfg: Config, model, tokenizer, initial_path: str, teacher_path: Optional[str] = None) -> None:
        self.cfg = cfg
        self.rewards = [rewards_mod.load_reward(r.function, r.weight) for r in cfg.rewards]
        self.teacher = load_teacher(cfg, tokenizer, model, teacher_path)
        self.reference = None
        if cfg.distill.reward_scale != 1.0:
            self.reference = modeling.load_reference(initial_path, cfg.reference.path, list(cfg.reference.soup),
                                                     cfg.model.dtype)

    score = GRPO.score

    def prepare(self, model, batch: Rollout) -> dict:
        _, metrics = self.score(batch)
        if self.reference is not None:
            ref_h, ref = frozen_hidden_and_head(self.reference, batch, batch.input_ids.device)
            batch.extras["ref_logp"] = onepass.linear_token_logprobs(
                ref_h, ref.weight, masked_targets(batch), bias=ref.bias, temperature=self.cfg.distill.temperature,
                backend=self.cfg.loss.backend, **ref.logit_kw())
        return metrics

    def loss(self, model, micro: Rollout):
        d, L = self.cfg.distill, self.cfg.loss
        h = completion_hidden(model, micro)
        hd = modeling.head(model)
        t_h, t = frozen_hidden_and_head(self.teacher, micro, h.device, self.cfg.teacher.offload)
        kw = dict(mask=micro.completion_mask, divergence=d.divergence, beta=d.beta, alpha=d.alpha,
                  reward_scale=d.reward_scale, temperature=d.temperature,
                  ref_logp=micro.extras.get("ref_logp") if d.divergence == "sampled_reverse_kl" else None,
                  loss_agg=L.loss_agg, **hd.logit_kw(), **t.logit_kw("teacher_"))
        if L.impl == "naive":
            if hd.bias is not None or t.bias is not None:
                raise ValueError("loss.impl: naive does not handle LM-head biases; use loss.impl: fused")
            loss, div = naive_opd_loss(h, hd.weight, t_h, t.weight, micro.targets, **kw)
            return loss, {"divergence": div}
        loss, m = onepass.opd_loss(h, hd.weight, t_h, t.weight, micro.targets, student_bias=hd.bias,
                                   teacher_bias=t.bias, backend=L.backend, **kw)
        div = m["reverse_kl_sampled"] if d.divergence == "sampled_reverse_kl" else m["divergence"]
        return loss, {"divergence": div}


class KDRL(GRPO):
    """KDRL: the GRPO loss with the trainer's rewards plus distill.coef · D(student, teacher), D any
    full-vocabulary divergence, in the same sweep (``onepass.grpo_loss`` with the teacher in the place of
    the reference and the exact penalty).  A penalty to a reference (loss.beta) is not combined with it."""

    name = "kdrl"
    plotted = ("reward_mean", "divergence", "entropy", "response_length")

    def setup(self, cfg: Config, model, tokenizer, initial_path: str, teacher_path: Optional[str] = None) -> None:
        if cfg.loss.beta != 0.0:
            raise ValueError("kdrl: loss.beta must be 0 (the teacher takes the reference's place; use distill.coef)")
        self.cfg = cfg
        d = cfg.distill
        self.loss_cfg = replace(cfg.loss, beta=d.coef, kl_estimator="full", divergence=d.divergence,
                                divergence_beta=d.beta, divergence_alpha=d.alpha)
        self.rewards = [rewards_mod.load_reward(r.function, r.weight) for r in cfg.rewards]
        self.reference = load_teacher(cfg, tokenizer, model, teacher_path)
        self.reference_offload = cfg.teacher.offload

    def loss(self, model, micro: Rollout):
        loss, m = super().loss(model, micro)
        m = dict(m)
        m["divergence"] = m.pop("kl")
        return loss, m


def token_logits(hidden, head: modeling.Head, mask) -> torch.Tensor:
    """The model's logits (soft-cap and scale applied in float32), [n, V] in the hidden states' dtype, of the n
    masked-in tokens only (SinKD's point clouds)."""
    return head.logits(hidden[mask.bool()]).to(hidden.dtype)


class OfflineKD(OPD):
    """Offline distillation on fixed completions (data column distill.completion_column; no sampling):
    distill.coef · D(student, teacher) (``onepass.opd_loss``, any full-vocabulary kind) plus
    distill.sinkhorn_coef · SinKD's Sinkhorn distance (``onepass.sinkhorn_distance``) between the student's
    and the teacher's next-token distributions over all completion tokens of the micro-batch.  SinKD needs
    the logits of those tokens, [n_tokens, V]; the divergence term never materializes them."""

    name = "offline"
    plotted = ("divergence", "sinkhorn", "loss", "grad_norm")

    def rollout(self, model, tokenizer, texts, columns):
        col = self.cfg.distill.completion_column
        if col not in columns:
            raise ValueError(f"distill.completion_column {col!r} is not a data column (columns: {sorted(columns)})")
        return fixed_batch(tokenizer, texts, [str(c) for c in columns[col]], columns,
                           next(model.parameters()).device)

    def prepare(self, model, batch: Rollout) -> dict:
        return {"reward_mean": None}

    def loss(self, model, micro: Rollout):
        d, L = self.cfg.distill, self.cfg.loss
        h = completion_hidden(model, micro)
        hd = modeling.head(model)
        t_h, t = frozen_hidden_and_head(self.teacher, micro, h.device, self.cfg.teacher.offload)
        div_loss, m = onepass.opd_loss(h, hd.weight, t_h, t.weight, micro.targets, mask=micro.completion_mask,
                                       divergence=d.divergence, beta=d.beta, alpha=d.alpha,
                                       temperature=d.temperature, student_bias=hd.bias, teacher_bias=t.bias,
                                       loss_agg=L.loss_agg, backend=L.backend, **hd.logit_kw(),
                                       **t.logit_kw("teacher_"))
        metrics = {"divergence": m["divergence"]}
        loss = d.coef * div_loss
        if d.sinkhorn_coef:
            sink = onepass.sinkhorn_distance(token_logits(h, hd, micro.completion_mask),
                                             token_logits(t_h, t, micro.completion_mask),
                                             epsilon=d.sinkhorn_epsilon, n_iters=d.sinkhorn_iters,
                                             temperature=d.sinkhorn_temperature, backend=L.backend)
            loss = loss + d.sinkhorn_coef * sink
            metrics["sinkhorn"] = sink.detach()
        return loss, metrics


def bdkd_token_terms(hidden, head: modeling.Head, teacher_hidden, teacher_head: modeling.Head, targets, *,
                     temperature, backend):
    """BD-KD's per-token pieces with onepass's fused ops, [N, C] float32 each (−100 targets give 0), on each
    model's logits (its own soft-cap and scale, ``modeling.Head``):
    ce / teacher_ce: −log p(y), −log q(y) at temperature 1 (p the student, q the teacher);
    entropy / teacher_entropy: H(p_T), H(q_T) at ``temperature`` (no gradient: they only pick the weights);
    forward_kl = KL(q_T‖p_T) and reverse_kl = KL(p_T‖q_T) with gradients to the student only;
    teacher_kl = KL(p_T‖q_T) with gradients to the teacher only (the same value as reverse_kl)."""
    T = temperature
    s, t = (hidden, head), (teacher_hidden, teacher_head)
    s_d, t_d = (hidden.detach(), head.detached()), (teacher_hidden.detach(), teacher_head.detached())

    def kl(a, b, kind):
        return onepass.linear_divergence(a[0], a[1].weight, b[0], b[1].weight, student_bias=a[1].bias,
                                         teacher_bias=b[1].bias, kind=kind, temperature=T, targets=targets,
                                         backend=backend, **a[1].logit_kw(), **b[1].logit_kw("teacher_"))

    def ce_and_entropy(m, m_d):
        logp = onepass.linear_token_logprobs(m[0], m[1].weight, targets, bias=m[1].bias, backend=backend,
                                             **m[1].logit_kw())
        with torch.no_grad():
            _, ent = onepass.linear_token_logprobs(m_d[0], m_d[1].weight, targets, bias=m_d[1].bias, temperature=T,
                                                   return_entropy=True, backend=backend, **m_d[1].logit_kw())
        return -logp, ent

    ce, ent = ce_and_entropy(s, s_d)
    t_ce, t_ent = ce_and_entropy(t, t_d)
    return dict(ce=ce, teacher_ce=t_ce, entropy=ent, teacher_entropy=t_ent, forward_kl=kl(s, t_d, "forward_kl"),
                reverse_kl=kl(s, t_d, "reverse_kl"), teacher_kl=kl(s_d, t, "reverse_kl"))


def naive_bdkd_token_terms(hidden, head: modeling.Head, teacher_hidden, teacher_head: modeling.Head, targets, *,
                           temperature, backend=None):
    """``bdkd_token_terms`` from materialized logits [N, C, V] (plain PyTorch); for tests and memory comparisons."""
    logits, t_logits = head.logits(hidden), teacher_head.logits(teacher_hidden)
    valid = targets != -100
    y = targets.clamp_min(0).unsqueeze(-1)

    def per_token(x):
        return torch.where(valid, x, torch.zeros_like(x))

    def kl(a, b):   # KL(softmax a ‖ softmax b) at temperature T
        la, lb = torch.log_softmax(a / temperature, -1), torch.log_softmax(b / temperature, -1)
        return per_token((la.exp() * (la - lb)).sum(-1))

    def entropy(x):
        with torch.no_grad():
            lx = torch.log_softmax(x / temperature, -1)
            return per_token(-(lx.exp() * lx).sum(-1))

    return dict(ce=per_token(-torch.log_softmax(logits, -1).gather(-1, y).squeeze(-1)),
                teacher_ce=per_token(-torch.log_softmax(t_logits, -1).gather(-1, y).squeeze(-1)),
                entropy=entropy(logits), teacher_entropy=entropy(t_logits),
                forward_kl=kl(t_logits.detach(), logits), reverse_kl=kl(logits, t_logits.detach()),
                teacher_kl=kl(logits.detach(), t_logits))


class BDKD(OfflineKD):
    """Online mutual distillation with BD-KD's balanced divergences (Amara, Sepahvand, Meyer, Gross, Clark,
    "BD-KD: Balancing the Divergences for Online Knowledge Distillation", arXiv:2212.12965): the student and
    the teacher train together on the fixed completions (data column distill.completion_column, as offline;
    the paper's supervised setting, its cross-entropy on the labels being our cross-entropy on the completion
    tokens).  Per completion token, with p the student's and q the teacher's next-token distribution at
    distill.temperature T (cross-entropies at T = 1):

        student:  task_coef · CE(y, p) + coef · (w_f · KL(q‖p) + w_r · KL(p‖q))
        teacher:  task_coef · CE(y, q) + teacher_coef · KL(p‖q)        (the reverse KL as the teacher's regularizer)

    The weights are set per token (the paper's "sample-wise" weighting; a token is a sample here) from the two
    entropies: where the student is the more confident, H(p) < H(q), the mass-covering forward KL, which raises
    H(p), gets w_f = balance_major and the reverse KL w_r = balance_minor; elsewhere the mode-seeking reverse
    KL gets balance_major.  Only that rule's structure is taken from the paper (both KL directions in the
    student's loss, weighted per sample by comparing the two entropies; the reverse KL in the teacher's loss):
    the paper's weight values were not available to us, so balance_major / balance_minor are configuration.
    The student's terms train the student only, the teacher's terms the teacher only (each sees the other
    detached); the summed loss is aggregated with loss.loss_agg, and the trainer steps one AdamW (optim.*) and
    clips one gradient norm over both models' parameters (``trained_models``).  Five vocabulary sweeps (two KL
    directions for the student, one for the teacher, since their per-token weights differ; one cross-entropy
    per model), no [tokens, V] logits.  ``divergence`` in the metrics is the mean per-token KL(p‖q)."""

    name = "bdkd"
    plotted = ("divergence", "task_loss", "teacher_task_loss", "forward_weight")

    def setup(self, cfg: Config, model, tokenizer, initial_path: str, teacher_path: Optional[str] = None) -> None:
        self.cfg = cfg
        self.teacher = load_teacher(cfg, tokenizer, model, teacher_path, trained=True)

    def trained_models(self) -> dict:
        return {"teacher": self.teacher}

    def loss(self, model, micro: Rollout):
        d, L = self.cfg.distill, self.cfg.loss
        h = completion_hidden(model, micro)
        hd, thd = modeling.head(model), modeling.head(self.teacher)
        t_h = completion_hidden(self.teacher, micro).to(h.device)
        thd = replace(thd, weight=thd.weight.to(h.device), bias=None if thd.bias is None else thd.bias.to(h.device))
        mask = micro.completion_mask
        terms_fn = naive_bdkd_token_terms if L.impl == "naive" else bdkd_token_terms
        x = terms_fn(h, hd, t_h, thd, masked_targets(micro), temperature=d.temperature, backend=L.backend)
        student_confident = x["entropy"] < x["teacher_entropy"]
        w_f = torch.where(student_confident, d.balance_major, d.balance_minor)
        w_r = torch.where(student_confident, d.balance_minor, d.balance_major)
        student = d.task_coef * x["ce"] + d.coef * (w_f * x["forward_kl"] + w_r * x["reverse_kl"])
        teacher = d.task_coef * x["teacher_ce"] + d.teacher_coef * x["teacher_kl"]
        agg = aggregation_weights(mask, L.loss_agg)
        n = mask.sum().clamp_min(1)

        def mean(v):
            return (v.detach() * mask).sum() / n

        return (agg * (student + teacher)).sum(), {
            "divergence": mean(x["reverse_kl"]), "forward_kl": mean(x["forward_kl"]), "task_loss": mean(x["ce"]),
            "teacher_task_loss": mean(x["teacher_ce"]), "forward_weight": mean(w_f.float()),
            "entropy": mean(x["entropy"]), "teacher_entropy": mean(x["teacher_entropy"])}


ALGORITHMS = {"grpo": GRPO, "opd": OPD, "kdrl": KDRL, "offline": OfflineKD, "bdkd": BDKD}
