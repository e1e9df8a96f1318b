"""The trainers on models whose logits are soft-capped / scaled after the LM head (Gemma 2
``final_logit_softcapping``, Granite ``logits_scaling``, Cohere ``logit_scale``): the (cap, scale) read from the
config reproduces the HF forward's logits; GRPO's, KDRL's, OPD's and offline distillation's loss and policy
gradients equal float64 references computed from the models' OWN logits (``model(...).logits``, where HF applies
the map) with ``onepass.reference``; BD-KD fused equals naive; the rollout log-probs (HF generate's old
log-probs, the vLLM engine's sampling log-probs) are those of the capped distribution; short runs; what is
still refused."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import onepass
from onepass import reference
from onepass.train import Trainer, modeling, run
from onepass.train.algorithms import completion_hidden, masked_targets
from onepass.train.tiny import arith_words, build_tokenizer

import _fake_vllm
from _train_helpers import assert_same_loss, loss_and_grads, small_config

MAX_OPERAND = 3
LOSS_RTOL = 1e-5        # fp32 trainer (fused CPU kernels) vs the float64 reference on the model's own logits (≤ 5e-7)
GRAD_RTOL = 2e-5        # of each parameter gradient's largest entry (measured: ≤ 2.2e-6)


def tiny_capped_model(arch: str, *, seed: int, **logit_config) -> nn.Module:
    """A 1-layer random-init causal LM over the arith vocabulary with the given final-logit config (head weights
    × 8, so that a cap of a few units bends the logits)."""
    import transformers

    vocab = len(arith_words(MAX_OPERAND))
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    extra = {"gemma2": dict(head_dim=16, query_pre_attn_scalar=16)}.get(arch, {})
    names = {"gemma2": "Gemma2", "granite": "Granite", "cohere": "Cohere", "llama": "Llama"}[arch]
    config = getattr(transformers, f"{names}Config")(**common, **extra, **logit_config)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{names}ForCausalLM")(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


MODELS = {   # name: (arch, seed, logit config, expected (softcap, scale))
    "gemma2": ("gemma2", 0, dict(final_logit_softcapping=3.0), (3.0, 1.0)),
    "gemma2_other": ("gemma2", 1, dict(final_logit_softcapping=1.5), (1.5, 1.0)),
    "granite": ("granite", 2, dict(logits_scaling=0.5), (None, 2.0)),      # Granite divides by logits_scaling
    "cohere": ("cohere", 3, dict(logit_scale=0.25), (None, 0.25)),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Each of ``MODELS`` saved with the arith tokenizer, as a local HF model directory."""
    tokenizer = build_tokenizer(arith_words(MAX_OPERAND))
    dirs = {}
    for name, (arch, seed, logit_config, _) in MODELS.items():
        out = tmp_path_factory.mktemp(name) / "model"
        tiny_capped_model(arch, seed=seed, **logit_config).save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs[name] = out
    return dirs


def own_logits(model, batch, grad: bool):
    """(float64 copy of ``model``, its HF-forward logits [N, C, V] that predict the completion tokens)."""
    model64 = copy.deepcopy(model).double()
    am = batch.attention_mask
    with torch.set_grad_enabled(grad):
        logits = model64(input_ids=batch.input_ids, attention_mask=am, position_ids=modeling.position_ids(am),
                         use_cache=False).logits
    return model64, logits[:, batch.prompt_len - 1:-1]


def raw_logits(model, batch):
    """The LM head's output without the model's cap / scale (float64) [N, C, V]: the negative control."""
    with torch.no_grad():
        return completion_hidden(model, batch).double() @ modeling.head(model).weight.double().T


def perturb(model, seed: int = 3, std: float = 0.05):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def assert_matches_reference(trainer_result, loss64, model64, metric64):
    """The trainer's (loss, metric, grads) equal the float64 reference's loss, metric and parameter gradients."""
    loss, metric, grads = trainer_result
    loss64.backward()
    assert loss == pytest.approx(loss64.item(), rel=LOSS_RTOL, abs=1e-7)
    assert metric == pytest.approx(float(metric64), rel=LOSS_RTOL, abs=1e-7)
    want = {n: p.grad for n, p in model64.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys() and grads
    for name, g in want.items():
        scale = g.abs().max().item()
        assert (grads[name].double() - g).abs().max().item() <= GRAD_RTOL * max(scale, 1e-8), name


@pytest.mark.parametrize("name", list(MODELS))
def test_head_map_reproduces_the_models_logits(name):
    """``modeling.head`` reads (cap, scale) from the config as transformers' modeling code applies it: its
    logits c·tanh(s·ℓ/c) equal the HF forward's, with left padding; the raw head output does not."""
    arch, seed, logit_config, expected = MODELS[name]
    model = tiny_capped_model(arch, seed=seed, **logit_config).double()
    hd = modeling.head(model)
    assert (hd.softcap, hd.scale) == expected
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(seed))
    am = torch.ones_like(ids)
    am[0, :2] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am, position_ids=modeling.position_ids(am)).logits
        h = modeling.last_hidden(model, ids, am)
    real = am.bool()                         # left-padded positions attend to nothing (NaN in eager Gemma 2)
    torch.testing.assert_close(hd.logits(h)[real], want[real], rtol=1e-10, atol=1e-10)
    assert (h @ hd.weight.T - want)[real].abs().max() > 0.1


GRPO_CASES = [("gemma2", "gemma2_other", "k3"), ("gemma2", "gemma2_other", "full"), ("granite", "cohere", "full"),
              ("gemma2", "gemma2_other", "kdrl")]


@pytest.mark.parametrize("policy,ref,penalty", GRPO_CASES, ids=["-".join(c) for c in GRPO_CASES])
def test_grpo_loss_and_gradients_on_the_models_own_logits(model_dirs, tmp_path, policy, ref, penalty):
    """GRPO with a capped / scaled policy and a reference with its own map (k3 or the exact KL; KDRL: the teacher
    in the reference's place, its JSD in the same sweep): old log-probs are the log-probs of the policy's own
    logits at the rollout temperature; loss and policy gradients (clipped ratio, penalty, entropy bonus) equal
    the float64 reference on both models' own logits."""
    if penalty == "kdrl":
        extra = ["algorithm=kdrl", f"teacher.path={model_dirs[ref]}", "distill.coef=0.2", "distill.divergence=jsd",
                 "distill.temperature=0.8"]
    else:
        extra = ["loss.beta=0.2", f"reference.path={model_dirs[ref]}", f"loss.kl_estimator={penalty}"]
    cfg = small_config(model_dirs[policy], tmp_path, "loss.entropy_coef=0.01", "rollout.temperature=0.8",
                       "rollout.max_new_tokens=3", *extra)
    trainer = Trainer(cfg)
    algo, T = trainer.algorithm, cfg.rollout.temperature
    L = algo.loss_cfg                                             # KDRL: beta = distill.coef, the exact penalty
    batch = trainer._rollout()
    algo.prepare(trainer.model, batch)
    tk, mask = masked_targets(batch), batch.completion_mask
    _, logits0 = own_logits(trainer.model, batch, grad=False)
    old_logp = batch.extras["old_logp"]
    torch.testing.assert_close(old_logp.double(), reference.token_logprobs(logits0, tk, temperature=T),
                               rtol=1e-5, atol=1e-5)
    uncapped = reference.token_logprobs(raw_logits(trainer.model, batch), tk, temperature=T)
    assert (uncapped - old_logp.double()).abs().max() > 1e-2     # the map matters at these logits

    batch.extras["advantages"] = torch.randn(mask.shape[0], generator=torch.Generator().manual_seed(5))
    perturb(trainer.model)                                        # ratio ≠ 1: clipping is active somewhere
    result = loss_and_grads(trainer, batch, "divergence" if penalty == "kdrl" else "kl")

    model64, logits = own_logits(trainer.model, batch, grad=True)
    _, ref_logits = own_logits(algo.reference, batch, grad=False)
    logp, ent = reference.token_logprobs(logits, tk, temperature=T, return_entropy=True)
    kl = ref_logp = None
    if L.kl_estimator == "full":
        kl = reference.divergence(logits, ref_logits, kind=L.divergence, beta=L.divergence_beta, temperature=T,
                                  targets=tk)
    else:
        ref_logp = reference.token_logprobs(ref_logits, tk, temperature=T)
    loss64, m = onepass.policy_loss(logp, batch.extras["advantages"].double(), mask=mask.double(),
                                    old_logp=old_logp.double(), ref_logp=ref_logp, kl=kl, entropy=ent, beta=L.beta,
                                    kl_estimator=L.kl_estimator, epsilon_low=L.epsilon_low,
                                    epsilon_high=L.epsilon_high, loss_agg=L.loss_agg, entropy_coef=L.entropy_coef)
    assert abs(result[1]) > 1e-3
    assert_matches_reference(result, loss64, model64, m["kl"])


OPD_CASES = [("reverse_kl", 1.0), ("jsd", 1.0), ("sampled_reverse_kl", 1.5)]


@pytest.mark.parametrize("divergence,reward_scale", OPD_CASES, ids=[c[0] for c in OPD_CASES])
def test_opd_loss_and_gradients_with_a_teacher_of_another_cap(model_dirs, tmp_path, divergence, reward_scale):
    """OPD: a student capped at 3 and a teacher capped at 1.5 (G-OPD with λ = 1.5 and the initial student as
    π_ref): loss, divergence and student gradients equal the float64 reference on the models' own logits."""
    cfg = small_config(model_dirs["gemma2"], tmp_path, "algorithm=opd", f"teacher.path={model_dirs['gemma2_other']}",
                       f"distill.divergence={divergence}", f"distill.reward_scale={reward_scale}",
                       "distill.temperature=0.8", "rollout.temperature=0.8", "rollout.max_new_tokens=3")
    trainer = Trainer(cfg)
    algo, d = trainer.algorithm, cfg.distill
    perturb(trainer.model)                                        # the student moves away from π_ref
    batch = trainer._rollout()
    algo.prepare(trainer.model, batch)
    tk, mask = masked_targets(batch), batch.completion_mask.double()
    n = mask.sum()
    result = loss_and_grads(trainer, batch, "divergence")

    model64, logits = own_logits(trainer.model, batch, grad=True)
    _, t_logits = own_logits(algo.teacher, batch, grad=False)
    if divergence == "sampled_reverse_kl":
        _, ref_logits = own_logits(algo.reference, batch, grad=False)
        ref_logp = reference.token_logprobs(ref_logits, tk, temperature=d.temperature)
        torch.testing.assert_close(batch.extras["ref_logp"].double(), ref_logp, rtol=1e-5, atol=1e-5)
        logp = reference.token_logprobs(logits, tk, temperature=d.temperature)
        t_logp = reference.token_logprobs(t_logits, tk, temperature=d.temperature)
        reward = (reward_scale * (t_logp - ref_logp) - (logp.detach() - ref_logp)) * mask
        loss64 = -(reward * torch.exp(logp - logp.detach()) * mask).sum() / n
        metric64 = ((logp.detach() - t_logp) * mask).sum() / n
    else:
        div = reference.divergence(logits, t_logits, kind=divergence, beta=d.beta, alpha=d.alpha,
                                   temperature=d.temperature, targets=tk)
        loss64 = (div * mask).sum() / n
        metric64 = loss64.detach()
    assert abs(result[1]) > 1e-3
    assert_matches_reference(result, loss64, model64, metric64)


def test_offline_kd_with_sinkhorn_on_the_models_own_logits(model_dirs, tmp_path):
    """Offline distillation (forward KL + SinKD) from a Granite-scaled student to a Gemma-capped teacher: loss and
    gradients equal the float64 reference (``reference.divergence`` + ``reference.sinkhorn_distance``) on the
    models' own logits."""
    cfg = small_config(model_dirs["granite"], tmp_path, "algorithm=offline", f"teacher.path={model_dirs['gemma2']}",
                       "distill.completion_column=answer", "distill.divergence=forward_kl", "distill.coef=0.7",
                       "distill.sinkhorn_coef=0.5", "distill.sinkhorn_temperature=2.0", "distill.temperature=0.9",
                       "rollout.num_generations=1", "train.prompts_per_step=4")
    trainer = Trainer(cfg)
    algo, d = trainer.algorithm, cfg.distill
    batch = trainer._rollout()
    tk, mask = masked_targets(batch), batch.completion_mask
    result = loss_and_grads(trainer, batch, "divergence")

    model64, logits = own_logits(trainer.model, batch, grad=True)
    _, t_logits = own_logits(algo.teacher, batch, grad=False)
    div = reference.divergence(logits, t_logits, kind="forward_kl", temperature=d.temperature, targets=tk)
    div_mean = (div * mask).sum() / mask.sum()
    sink = reference.sinkhorn_distance(logits[mask.bool()], t_logits[mask.bool()], epsilon=d.sinkhorn_epsilon,
                                       n_iters=d.sinkhorn_iters, temperature=d.sinkhorn_temperature)
    assert_matches_reference(result, d.coef * div_mean + d.sinkhorn_coef * sink, model64, div_mean.detach())


def test_bdkd_fused_equals_naive_with_capped_models(model_dirs, tmp_path):
    """BD-KD (both models train) with a student capped at 3 and a teacher capped at 1.5: the fused loss and both
    models' gradients equal the naive ones on the materialized capped logits (``Head.logits``, which equal the
    HF forward's: ``test_head_map_reproduces_the_models_logits``)."""
    cfg = small_config(model_dirs["gemma2"], tmp_path, "algorithm=bdkd", f"teacher.path={model_dirs['gemma2_other']}",
                       "distill.completion_column=answer", "rollout.num_generations=1", "train.prompts_per_step=4",
                       "distill.temperature=2.0")
    trainer = Trainer(cfg)
    batch, teacher = trainer._rollout(), trainer.algorithm.teacher
    results = {}
    for impl in ("fused", "naive"):
        trainer.cfg.loss.impl = impl
        teacher.zero_grad(set_to_none=True)
        loss, metric, grads = loss_and_grads(trainer, batch, "divergence")
        grads.update({f"teacher.{n}": p.grad.clone() for n, p in teacher.named_parameters() if p.grad is not None})
        results[impl] = loss, metric, grads
    assert any(k.startswith("teacher.") for k in results["fused"][2])
    assert_same_loss(results["fused"], results["naive"])


@pytest.mark.parametrize("algorithm", ["grpo", "opd"])
def test_short_runs_with_capped_models(model_dirs, tmp_path, algorithm):
    """Three steps of grpo (capped reference, β > 0) and opd (teacher of another cap): finite metrics, a loss
    that changes between steps, weights written."""
    extra = (["loss.beta=0.1", f"reference.path={model_dirs['gemma2_other']}"] if algorithm == "grpo" else
             ["algorithm=opd", f"teacher.path={model_dirs['gemma2_other']}"])
    run(small_config(model_dirs["gemma2"], tmp_path, "train.max_steps=3", "train.save_steps=10", *extra))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k, v in r.items():
            assert v is None or isinstance(v, str) or math.isfinite(v), (k, v)
    assert len({r["loss"] for r in rows}) > 1, rows
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.fixture
def fake_vllm(monkeypatch):
    import importlib.machinery
    import sys

    module = _fake_vllm.module()
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_sampling_logprobs_match_the_old_logprobs(model_dirs, tmp_path, fake_vllm):
    """The vLLM engine's sampling log-probs (vLLM applies the model's cap, as the HF forward of the stand-in
    does) equal the trainer's old log-probs, so off-policy corrections see ratio 1 on-policy."""
    cfg = small_config(model_dirs["gemma2"], tmp_path, "rollout.engine=vllm", "rollout.temperature=0.8",
                       "rollout.max_new_tokens=3", "loss.rollout_correction={level: token, mode: truncate, high: 2.0}")
    trainer = Trainer(cfg)
    batch = trainer._rollout()
    trainer.algorithm.prepare(trainer.model, batch)
    m = batch.completion_mask.bool()
    sampling, old = batch.extras["sampling_logp"], batch.extras["old_logp"]
    torch.testing.assert_close(old[m], sampling[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.extras["token_weights"][m], torch.ones_like(old[m]), rtol=1e-5, atol=1e-5)
    uncapped = reference.token_logprobs(raw_logits(trainer.model, batch), masked_targets(batch), temperature=0.8)
    assert (uncapped[m] - sampling[m].double()).abs().max() > 1e-2


class ScaledHead(nn.Linear):
    """An LM head whose forward changes the logits (as Dory's learned per-token scale does)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("arch,change,match", [
    ("llama", dict(logit_softcapping=30.0), "logit_softcapping"),
    ("llama", dict(output_multiplier_scale=2.0), "output_multiplier_scale"),
    ("gemma2", dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
    ("cohere", dict(logit_scale=0.0), "logit_scale"),
    ("mpt", dict(logit_scale="inv_sqrt_d_model"), "logit scale is not a number"),   # MosaicML's remote code
    ("llama", dict(lm_head=ScaledHead), "not a plain nn.Linear"),
])
def test_what_the_trainer_cannot_reproduce_is_refused(arch, change, match, tmp_path):
    """Keys of unknown meaning, non-positive caps / scales, and LM heads with their own forward raise a
    ValueError naming the key or the head, at load time."""
    if arch == "mpt":
        from transformers import MptConfig, MptForCausalLM

        model = MptForCausalLM(MptConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=11, max_seq_len=32))
    else:
        model = tiny_capped_model(arch, seed=0)
    if "lm_head" in change:
        old = model.lm_head
        model.lm_head = change["lm_head"](old.in_features, old.out_features, bias=False)
    else:
        for k, v in change.items():
            setattr(model.config, k, v)
    with pytest.raises(ValueError, match=match):
        modeling.head(model)
    if "lm_head" not in change:
        model.save_pretrained(tmp_path)
        with pytest.raises(ValueError, match=match):
            modeling.load_model(tmp_path, "float32")
