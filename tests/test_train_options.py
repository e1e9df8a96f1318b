"""The GRPO trainer's wiring of the loss variants (``loss.options``), the advantage options and the vLLM
rollout engine (against a CPU stand-in of vLLM's API, ``_fake_vllm``: vLLM itself runs on GPUs only)."""
from __future__ import annotations

import importlib.machinery
import sys

import pytest
import torch

from onepass.train import ConfigError, Trainer
from onepass.train.tiny import build_tiny_model

import _fake_vllm
from _train_helpers import assert_fused_equals_naive, perturbed_rollout, small_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_operand=3, seed=0)


@pytest.fixture(scope="module")
def options_trainer(tiny_dir, tmp_path_factory):
    cfg = small_config(tiny_dir, tmp_path_factory.mktemp("options"), "loss.beta=0.2", "loss.entropy_coef=0.01",
                       "rollout.temperature=0.9")
    trainer = Trainer(cfg)
    return trainer, perturbed_rollout(trainer)


OPTIONS = [{"objective": "cispo"}, {"ratio_level": "sequence"},
           {"objective": "sapo"}, {"objective": "clip_cov"}, {"top_entropy_quantile": 0.5},
           {"kl_value_clamp": 0.01}, {"ratio_cap": 1.05, "empty_sequences": "count"}]


@pytest.mark.parametrize("options", OPTIONS, ids=["cispo", "gspo", "sapo", "clip_cov", "top-entropy", "kl-clamp",
                                                  "delta"])
def test_loss_options_fused_equal_naive(options_trainer, options):
    trainer, batch = options_trainer
    trainer.cfg.loss.options = dict(options)
    try:
        assert_fused_equals_naive(trainer, batch, "kl")
    finally:
        trainer.cfg.loss.options = {}


@pytest.mark.parametrize("override,match", [
    (["loss.options={objective: nope}"], "loss.options: objective"),
    (["loss.options={num_tokens: 7}"], r"loss.options must not set \['num_tokens'\]"),
    (["loss.options={not_an_option: 1}"], "loss.options"),
    (["loss.rollout_correction={level: token}"], "loss.rollout_correction needs"),
    (["advantage.whiten=tokens"], "advantage.whiten"),
    (["advantage.singleton=one"], "advantage.singleton"),
])
def test_option_errors_name_the_key(tiny_dir, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        small_config(tiny_dir, tmp_path, *override)


def test_vllm_engine_without_vllm_is_a_config_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)   # import vllm raises; find_spec reports it absent
    with pytest.raises((ConfigError, ValueError), match="vllm"):
        small_config(tiny_dir, tmp_path, "rollout.engine=vllm")


@pytest.mark.parametrize("overrides,adv_shape", [
    (["advantage.estimator=opo"], "seq"),
    (["advantage.estimator=reinforce_pp", "advantage.whiten=token", "advantage.variance=unbiased"], "token"),
    (["advantage.estimator=rloo", "advantage.normalize=true"], "seq"),
    (["advantage.estimator=grpo", "advantage.singleton=verl", "advantage.eps=1e-4"], "seq"),
], ids=["opo", "reinforce-pp-token", "rloo-normalize", "grpo-verl"])
def test_advantage_options_reach_the_loss(tiny_dir, tmp_path, overrides, adv_shape):
    trainer = Trainer(small_config(tiny_dir, tmp_path, "train.max_steps=1", "train.save_steps=5", *overrides))
    batch = trainer._rollout()
    trainer.algorithm.prepare(trainer.model, batch)
    adv = batch.extras["advantages"]
    n, c = batch.completion_mask.shape
    assert adv.shape == ((n, c) if adv_shape == "token" else (n,))
    assert torch.isfinite(adv).all()
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    trainer.train_step()
    assert any(not torch.equal(before[k], p) for k, p in trainer.model.named_parameters())


@pytest.fixture
def fake_vllm(monkeypatch):
    module = _fake_vllm.module()
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_engine_samples_with_the_current_policy(tiny_dir, tmp_path, fake_vllm):
    """Through vLLM's API: the engine loads the policy's weights before the first generation after each
    update, builds the HF engine's batch layout, keeps vLLM's log-probs, and the TIS correction
    (``loss.rollout_correction``) multiplies the loss by truncated weights."""
    cfg = small_config(tiny_dir, tmp_path, "rollout.engine=vllm", "rollout.top_k=3", "train.save_steps=5",
                       "loss.rollout_correction={level: token, mode: truncate, high: 2.0}")
    trainer = Trainer(cfg)
    llm = fake_vllm.LLM.instances[-1]
    snapshots = []
    for _ in range(2):
        snapshots.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        trainer.train_step()
        synced = llm.model.state_dict()
        assert all(torch.equal(synced[k], v) for k, v in snapshots[-1].items()), "vLLM sampled with stale weights"
    generates = [c for c in llm.calls if isinstance(c, tuple)]
    assert [c for c in llm.calls if c == "load_weights"] and len(generates) == 2
    assert llm.calls.index("load_weights") < llm.calls.index(generates[0])
    sp = generates[0][2]
    assert (sp.n, sp.top_k, sp.max_tokens, sp.temperature, sp.logprobs) == (4, 3, 2, cfg.rollout.temperature, 0)

    batch = trainer.last_batch
    n, c = batch.completion_mask.shape
    assert n == cfg.train.prompts_per_step * cfg.rollout.num_generations
    enc = trainer.tokenizer(batch.prompts, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids[:, :batch.prompt_len], enc["input_ids"])
    s, w = batch.extras["sampling_logp"], batch.extras["token_weights"]
    m = batch.completion_mask.bool()
    assert s.shape == (n, c) and (s[m] < 0).all() and (s[~m] == 0).all()
    # TIS: min(π_old / π_vllm, 2) per token; vLLM's log-probs are top-k renormalized, the trainer's are not
    expected = torch.exp(batch.extras["old_logp"] - s).clamp(max=2.0)
    torch.testing.assert_close(w[m], expected[m], rtol=1e-5, atol=1e-6)
    assert (w[m] < 1.0).all()   # top-k renormalization raises the sampler's probabilities


def test_vllm_engine_refuses_parallel_and_fixed_completions(tiny_dir, tmp_path, fake_vllm):
    with pytest.raises(ConfigError, match="parallel"):
        small_config(tiny_dir, tmp_path, "rollout.engine=vllm", "parallel=ddp")
