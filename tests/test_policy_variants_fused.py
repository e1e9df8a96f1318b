"""Every policy-loss option of the fused ``grpo_loss`` (and ``policy_loss``) vs the float64 reference
``onepass.reference.policy_variants.policy_loss`` fed with float64 logits; the peer presets; packed
sequences vs the padded call; bad input.

Tolerances (float32 hidden states; the reference computes the logits in float64): loss within
2e-5·max(1, |loss|), gradients w.r.t. hidden and weight within 1e-4·max|grad| (+ floor), metrics within
2e-5.  Fresh random inputs per case (seeded by the case id), odd sizes, ragged masks with a fully masked
sequence, temperature 0.9.
"""
import zlib

import pytest
import torch

import onepass
from onepass import corrections, presets
from onepass._ops import vocab_stats
from onepass.reference import policy_variants as pv

from _helpers import backend_cases

F64 = torch.float64
BACKENDS = backend_cases()
NATIVE = backend_cases(("cpu", "torch"))
TEMPERATURE = 0.9


def _data(seed, B=4, T=7, D=12, V=53, per_token_adv=False):
    """Random policy (and reference) heads, ragged mask with the last sequence fully masked, old / sampling /
    reference log-probs near the policy's own (so ratios straddle the clip range)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5 * 2
    ref_h, ref_w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) / D ** 0.5 * 2
    t = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[0, 0] = 1
    mask[-1] = 0
    logp = _logp_entropy(h.double(), w.double(), t)[0]
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=F64)
    adv[0] = 0.0 if per_token_adv else adv[0]  # zero advantages exercise geo_mean's and vespo's A = 0 branch
    return dict(h=h, w=w, ref_h=ref_h, ref_w=ref_w, t=t, mask=mask, adv=adv.float(), old=old.float(),
                ref=(logp + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).float(),
                sampling=(old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)).float(),
                rollout=(old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)).float())


def _logp_entropy(h, w, t):
    logsm = torch.log_softmax((h @ w.T) / TEMPERATURE, -1)
    return logsm.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def _seed(name):
    return zlib.crc32(name.encode())


def _run(d, kw, tensors, backend, reference="logp"):
    """(fused loss, metrics, grads) and (reference loss, metrics, grads); ``tensors`` names the optional
    per-token inputs: old, ref (as ref_logp, or the reference head with ``reference="hidden"``),
    token_weights (a tensor), sampling."""
    extra = {}
    if "old" in tensors:
        extra["old_logp"] = d["old"]
    if "token_weights" in tensors:
        extra["token_weights"] = tensors["token_weights"]
    if "sampling" in tensors:
        extra["sampling_logp"] = d["sampling"]
    h, w = d["h"].clone().requires_grad_(), d["w"].clone().requires_grad_()
    ref_kw = {}
    if "ref" in tensors:
        ref_kw = dict(ref_hidden=d["ref_h"], ref_weight=d["ref_w"]) if reference == "hidden" else {"ref_logp": d["ref"]}
    loss, metrics = onepass.grpo_loss(h, w, d["t"], d["adv"], mask=d["mask"], temperature=TEMPERATURE,
                                      backend=backend, **extra, **ref_kw, **kw)
    loss.backward()
    hr, wr = d["h"].double().requires_grad_(), d["w"].double().requires_grad_()
    logp, entropy = _logp_entropy(hr, wr, d["t"])
    ref_logp = None
    if "ref" in tensors:
        ref_logp = (_logp_entropy(d["ref_h"].double(), d["ref_w"].double(), d["t"])[0] if reference == "hidden"
                    else d["ref"])
    rkw = dict(kw)
    if rkw.get("objective") == "clip_cov":  # the same draws as the fused loss's default generator
        rkw["generator"] = torch.Generator().manual_seed(0)
    if rkw.get("kl_estimator") == "full":
        raise AssertionError("the exact KL is compared in test_losses.py")
    rkw.setdefault("kl_log_ratio_clamp", 20.0)  # onepass's default
    rloss, rmetrics = pv.policy_loss(logp, d["adv"], mask=d["mask"], old_logp=extra.get("old_logp"),
                                     ref_logp=ref_logp, entropy=entropy, token_weights=_per_token_shape(extra),
                                     sampling_logp=extra.get("sampling_logp"), **rkw)
    rloss.backward()
    rmetrics["pg_loss"] = rmetrics["pg_loss"] * rkw.get("loss_scale", 1.0)  # onepass: the term's share of the loss
    return (loss, metrics, (h.grad, w.grad)), (rloss, rmetrics, (hr.grad, wr.grad))


def _per_token_shape(extra):
    """The reference takes per-sequence weights as [B, 1]."""
    tw = extra.get("token_weights")
    return tw[:, None] if tw is not None and tw.dim() == 1 else tw


def _assert_close(fused, ref, loss_tol=2e-5, grad_tol=1e-4, metric_names=None):
    (loss, metrics, grads), (rloss, rmetrics, rgrads) = fused, ref
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    err = abs(loss.item() - rloss.item())
    assert err <= loss_tol * max(1.0, abs(rloss.item())), ("loss", loss.item(), rloss.item())
    for name, g, rg in zip(("hidden", "weight"), grads, rgrads):
        scale = rg.abs().max().item()
        gerr = (g.double() - rg).abs().max().item()
        assert gerr <= grad_tol * max(scale, 1e-3), (name, gerr, scale)
    names = metric_names if metric_names is not None else [k for k in metrics if k in rmetrics]
    for k in names:
        assert abs(metrics[k].item() - rmetrics[k].item()) <= 2e-5 * max(1.0, abs(rmetrics[k].item())), k
    return err


# (id, options, per-token inputs, per-token advantages)
CASES = [
    # aggregation and normalizers
    ("token-sum", dict(loss_agg="token-sum"), ("old",), False),
    ("token-mean-global", dict(num_tokens=37.0, loss_scale=0.5), ("old",), False),
    ("seq-mean-token-mean-global", dict(loss_agg="seq-mean-token-mean", num_sequences=6), ("old",), True),
    ("seq-mean-token-sum-count", dict(loss_agg="seq-mean-token-sum", empty_sequences="count"), ("old",), False),
    ("dr-grpo-horizon", dict(loss_agg="seq-mean-token-sum-norm", horizon=11, empty_sequences="count"), ("old",), False),
    ("entropy-local-kl-agg", dict(loss_agg="seq-mean-token-mean", entropy_coef=0.05, entropy_agg="local-token-mean",
                                  beta=0.1, kl_agg="token-sum", num_tokens=20.0), ("old", "ref"), False),
    # importance ratio and objectives
    ("gspo", dict(ratio_level="sequence", log_ratio_clamp=None, loss_agg="seq-mean-token-mean"), ("old",), False),
    ("gspo-token", dict(ratio_level="sequence-token", log_ratio_clamp=(None, 10.0)), ("old",), True),
    ("gspo-on-policy", dict(ratio_level="sequence"), (), False),
    ("delta-dual", dict(ratio_cap=1.3, dual_clip=2.0, log_ratio_clamp=None, epsilon_high=0.28), ("old",), True),
    ("cispo", dict(objective="cispo", epsilon_low=float("inf"), epsilon_high=0.1), ("old",), False),
    ("sapo", dict(objective="sapo", sapo_tau_pos=0.9, sapo_tau_neg=1.2), ("old",), True),
    ("reinforce", dict(objective="reinforce"), ("old",), False),
    ("dppo_tv", dict(objective="dppo_tv", epsilon_low=2e-3, epsilon_high=1e-3, ratio_cap=1.2), ("old",), True),
    ("dppo_kl", dict(objective="dppo_kl", epsilon_low=1e-4, epsilon_high=2e-4, ratio_cap=1.2), ("old",), False),
    ("clip_cov", dict(objective="clip_cov", cov_fraction=0.2, cov_bounds=(0.01, 5.0), log_ratio_clamp=None),
     ("old",), True),
    ("kl_cov", dict(objective="kl_cov", cov_fraction=0.15, kl_cov_coef=0.7, log_ratio_clamp=None), ("old",), True),
    ("geo_mean", dict(objective="geo_mean", epsilon_low=0.1, epsilon_high=0.15, log_ratio_clamp=None), ("old",), True),
    ("dro", dict(objective="dro", dro_beta=0.3), ("old",), False),
    ("vespo", dict(objective="vespo", vespo_params=(1.5, 2.0, 2.5, 1.5)), ("old",), False),
    # corrections and entropy controls
    ("off-policy-mask", dict(off_policy_threshold=0.05), ("old", "sampling"), False),
    ("off-policy-mask-old", dict(off_policy_threshold=-0.02, loss_agg="seq-mean-token-mean"), ("old",), True),
    ("top-entropy", dict(top_entropy_quantile=0.4, entropy_coef=0.1, entropy_agg="local-token-mean"), ("old",), False),
    ("top-entropy-loss-agg", dict(top_entropy_quantile=0.7, entropy_coef=0.1, loss_agg="token-sum"), ("old",), False),
    # KL options
    ("kl-low_var_kl-clamps", dict(beta=0.2, kl_estimator="low_var_kl", kl_log_ratio_clamp=0.5, kl_value_clamp=0.05),
     ("old", "ref"), False),
    ("kl-kl-ratio-weight", dict(beta=0.2, kl_estimator="kl", kl_ratio_weight=True, ratio_level="sequence"),
     ("old", "ref"), False),
    ("kl-mse-k2_is", dict(beta=0.3, kl_estimator="mse", kl_gradient="k2_is", kl_value_clamp=(None, 0.02)),
     ("old", "ref"), True),
    ("kl-k3-k2-straight-through", dict(beta=0.3, kl_estimator="k3", kl_gradient="k2", kl_log_ratio_clamp=None),
     ("old", "ref"), False),
]
ROW_CASES = [c for c in CASES if c[0] in ("token-sum", "gspo", "cispo", "top-entropy", "kl-mse-k2_is")]


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_matches_reference(backend, device, case):
    name, kw, tensors, per_token_adv = case
    d = _data(_seed(name), per_token_adv=per_token_adv)
    _assert_close(*_run(d, kw, dict.fromkeys(tensors), backend))


@pytest.mark.parametrize("backend,device", [c for c in BACKENDS if c.id not in ("cpu", "torch")])
@pytest.mark.parametrize("case", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_fused_matches_reference_other_backends(backend, device, case):
    """triton (TRITON_INTERPRET=1 on CPU, or a GPU) and cuda: a sample of row-elementwise and cross-token cases."""
    name, kw, tensors, per_token_adv = case
    d = {k: v.to(device) for k, v in _data(_seed(name), per_token_adv=per_token_adv).items()}
    fused, ref = _run(d, kw, dict.fromkeys(tensors), backend)
    cpu = lambda x: x.detach().cpu()  # noqa: E731
    fused = (cpu(fused[0]), {k: cpu(v) for k, v in fused[1].items()}, tuple(cpu(g) for g in fused[2]))
    ref = (cpu(ref[0]), {k: cpu(v) for k, v in ref[1].items()}, tuple(cpu(g) for g in ref[2]))
    _assert_close(fused, ref)


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("weights", ["token", "sequence"])
@pytest.mark.parametrize("objective", ["ppo_clip", "geo_mean", "vespo"])
def test_token_weights(backend, device, weights, objective):
    """Correction weights on the policy term only (ppo_clip), or inside the objective (geo_mean, vespo)."""
    d = _data(_seed(f"tw-{weights}-{objective}"))
    level = "token" if weights == "token" else "sequence"
    tw = corrections.rollout_is_weights(d["old"], d["rollout"], d["mask"], level=level, mode="truncate", high=1.5)
    tw = tw if weights == "token" else tw[:, 0]
    kw = dict(objective=objective, beta=0.1, log_ratio_clamp=None)
    _assert_close(*_run(d, kw, {"old": None, "ref": None, "token_weights": tw}, backend))


@pytest.mark.parametrize("backend,device", NATIVE)
def test_reference_in_sweep_and_bf16(backend, device):
    """The reference head in the sweep with the new KL options; bfloat16 hidden states."""
    d = _data(_seed("ref-hidden"))
    kw = dict(beta=0.2, kl_estimator="low_var_kl", kl_value_clamp=10.0, kl_ratio_weight=True)
    _assert_close(*_run(d, kw, {"old": None, "ref": None}, backend, reference="hidden"))
    d16 = dict(d, h=d["h"].bfloat16(), w=d["w"].bfloat16())
    fused, ref = _run(d16, dict(objective="cispo", loss_agg="seq-mean-token-mean"), {"old": None}, backend)
    _assert_close(fused, ref, loss_tol=1e-2, grad_tol=5e-2, metric_names=())  # bf16 logits: ~3e-3 measured


def test_policy_loss_matches_reference():
    """``onepass.policy_loss`` (the post-sweep function) on per-token tensors, float64."""
    d = _data(_seed("policy_loss"), per_token_adv=True)
    logp, entropy = _logp_entropy(d["h"].double(), d["w"].double(), d["t"])
    x1, x2 = logp.detach().clone().requires_grad_(), logp.detach().clone().requires_grad_()
    kw = dict(objective="sapo", ratio_level="sequence-token", beta=0.1, kl_estimator="low_var_kl",
              kl_log_ratio_clamp=20.0, kl_value_clamp=10.0, entropy_coef=0.01, loss_agg="seq-mean-token-sum-norm",
              horizon=9, top_entropy_quantile=0.5)
    tensors = dict(mask=d["mask"], old_logp=d["old"].double(), ref_logp=d["ref"].double(), entropy=entropy)
    loss, metrics = onepass.policy_loss(x1, d["adv"].double(), **tensors, **kw)
    rloss, rmetrics = pv.policy_loss(x2, d["adv"].double(), **tensors, **kw)
    loss.backward()
    rloss.backward()
    assert loss.dtype == F64 and abs(loss.item() - rloss.item()) <= 1e-12
    assert (x1.grad - x2.grad).abs().max() <= 1e-12
    for k in ("pg_loss", "kl", "entropy", "ratio_mean", "ppo_kl"):
        assert abs(metrics[k].item() - rmetrics[k].item()) <= 1e-12, k


def test_clip_cov_generator_and_determinism():
    """Deterministic by default (a generator seeded 0); a given generator draws as the reference."""
    d = _data(_seed("clip_cov-gen"), per_token_adv=True)
    kw = dict(objective="clip_cov", cov_fraction=0.3, cov_bounds=(0.0, 10.0), old_logp=d["old"], mask=d["mask"])
    first = onepass.grpo_loss(d["h"], d["w"], d["t"], d["adv"], backend="cpu", **kw)[0]
    again = onepass.grpo_loss(d["h"], d["w"], d["t"], d["adv"], backend="cpu", **kw)[0]
    assert first.item() == again.item()
    logp = _logp_entropy(d["h"].double(), d["w"].double(), d["t"].clone())[0] * 1.0
    losses = []
    for seed in (1, 2, 3):
        gen = torch.Generator().manual_seed(seed)
        fused, metrics = onepass.grpo_loss(d["h"], d["w"], d["t"], d["adv"], backend="cpu", temperature=TEMPERATURE,
                                           generator=gen, **kw)
        rgen = torch.Generator().manual_seed(seed)
        ref, rmetrics = pv.policy_loss(logp, d["adv"], mask=d["mask"], old_logp=d["old"], objective="clip_cov",
                                       cov_fraction=0.3, cov_bounds=(0.0, 10.0), generator=rgen)
        assert abs(fused.item() - ref.item()) <= 2e-5 * max(1, abs(ref.item()))
        assert metrics["clip_frac"].item() == pytest.approx(rmetrics["clip_frac"].item(), abs=1e-7)
        assert gen.get_state().equal(rgen.get_state()), "one draw per call"
        losses.append(fused.item())
    assert len(set(losses)) > 1, "different generators draw different tokens"


# ------------------------------------------------------------------------------------------------
# Presets: the fused loss with each preset's keywords equals the reference with the same keywords (the
# reference with these presets equals the peers: tests/test_policy_variants_reference.py)
# ------------------------------------------------------------------------------------------------
PRESET_CASES = [
    ("trl-grpo", presets.trl_grpo, dict(loss_type="grpo", beta=0.04), ("old", "ref"), None),
    ("trl-dapo-gas", presets.trl_grpo, dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4,
                                            num_items_in_batch=30, entropy_coef=0.01, top_entropy_quantile=0.5),
     ("old",), None),
    ("trl-dr_grpo", presets.trl_grpo, dict(loss_type="dr_grpo", max_completion_length=10), ("old",), None),
    ("trl-bnpo-delta", presets.trl_grpo, dict(loss_type="bnpo", delta=1.4, epsilon_high=0.28), ("old",), None),
    ("trl-luspo-gspo", presets.trl_grpo, dict(loss_type="luspo", importance_sampling_level="sequence"),
     ("old",), None),
    ("trl-cispo-vllm-is", presets.trl_grpo, dict(loss_type="cispo", epsilon_high=1.2, num_items_in_batch=25),
     ("old",), "trl"),
    ("trl-sapo-off-policy", presets.trl_grpo, dict(loss_type="sapo", off_policy_mask_threshold=0.05),
     ("old", "sampling"), None),
    ("trl-vespo", presets.trl_grpo, dict(loss_type="vespo", num_items_in_batch=25), ("old",), None),
    ("verl-vanilla-tis", presets.verl_ppo, dict(use_kl_loss=True, kl_loss_coef=0.05, entropy_coeff=0.01,
                                                loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=8,
                                                dp_size=2, global_batch_size=6), ("old", "ref"), "verl"),
    ("verl-gspo", presets.verl_ppo, dict(loss_mode="gspo", use_kl_loss=True, kl_loss_type="k1"), ("old", "ref"),
     None),
    ("verl-token-sum-cov", presets.verl_ppo, dict(loss_mode="kl_cov", loss_agg_mode="token-sum", kl_cov_ratio=0.1),
     ("old",), None),
    ("verl-dppo-global", presets.verl_ppo, dict(loss_mode="dppo_tv", clip_ratio_low=0.01, clip_ratio_high=0.005,
                                                batch_num_tokens=40, dp_size=4), ("old",), None),
    ("verl-geo_mean", presets.verl_ppo, dict(loss_mode="geo_mean"), ("old",), None),
    ("openrlhf-ppo-k3", presets.openrlhf_ppo, dict(dual_clip=3.0, kl_coef=0.1, kl_estimator="k3"), ("old", "ref"),
     "openrlhf"),
    ("openrlhf-gspo-k2-unbiased", presets.openrlhf_ppo, dict(policy_loss_type="gspo", kl_coef=0.1,
                                                             kl_estimator="k2", unbiased_gradient=True),
     ("old", "ref"), None),
    ("openrlhf-seq-global", presets.openrlhf_ppo, dict(token_level_loss=False, global_batch_size=5, dp_size=2),
     ("old",), None),
]


def _preset_weights(d, which):
    if which == "trl":
        return corrections.trl_vllm_is_weights(d["old"], d["rollout"], d["mask"], mode="token_truncate", clip_max=1.5)
    if which == "verl":
        return corrections.rollout_is_weights(d["old"], d["rollout"], d["mask"], level="sequence", high=2.0,
                                              log_clamp=20.0)
    return corrections.rollout_is_weights(d["old"], d["rollout"], d["mask"], level="token", mode="mask", low=0.5,
                                          high=5.0, seq_reduce="mean", mask_weight="token")


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("case", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_presets_fused_vs_reference(backend, device, case):
    name, preset, config, tensors, weights = case
    d = _data(_seed(name))
    kw = preset(**config)
    inputs = dict.fromkeys(tensors)
    if weights is not None:
        inputs["token_weights"] = _preset_weights(d, weights)
    _assert_close(*_run(d, kw, inputs, backend))


def test_preset_trl_dapo_restated():
    """TRL dapo, restated from its definition: Σ m·ℓ / (num_items_in_batch / processes) with the PPO clip,
    k3 KL times the ratio, and the entropy bonus as a local token mean (gas 1)."""
    d = _data(_seed("dapo-restated"))
    logp, _ = _logp_entropy(d["h"].double(), d["w"].double(), d["t"])
    m, A = d["mask"].double(), d["adv"].double()[:, None]
    ratio = torch.exp(logp - d["old"].double())
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.28))
    x = d["ref"].double() - logp
    per_token = pg + 0.05 * (torch.exp(x) - x - 1) * ratio
    want = (per_token * m).sum() / (64 / 2)
    kw = presets.trl_grpo("dapo", epsilon_high=0.28, beta=0.05, num_items_in_batch=64, num_processes=2)
    loss, _ = onepass.grpo_loss(d["h"], d["w"], d["t"], d["adv"], mask=d["mask"], old_logp=d["old"],
                                ref_logp=d["ref"], temperature=TEMPERATURE, backend="cpu", **kw)
    assert abs(loss.item() - want.item()) <= 2e-5 * max(1.0, abs(want.item()))


# ------------------------------------------------------------------------------------------------
# Packed sequences
# ------------------------------------------------------------------------------------------------
def _packed(d, lengths):
    """The padded data truncated to ``lengths`` per sequence (prompt tokens masked inside), packed."""
    keep = torch.arange(d["t"].shape[1])[None, :] < torch.tensor(lengths)[:, None]
    pack = lambda x: x[keep]  # noqa: E731
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return keep, pack, cu, seq_ids


PACKED_CASES = [
    ("token-mean", dict()),
    ("seq-mean-token-mean", dict(loss_agg="seq-mean-token-mean", beta=0.1, kl_estimator="k3")),
    ("seq-mean-token-sum-norm", dict(loss_agg="seq-mean-token-sum-norm")),
    ("gspo", dict(ratio_level="sequence", loss_agg="seq-mean-token-mean", log_ratio_clamp=None)),
    ("geo_mean", dict(objective="geo_mean")),
    ("top-entropy-off-policy", dict(top_entropy_quantile=0.5, off_policy_threshold=0.0, entropy_coef=0.1)),
]


PACKED_FORMS = [(case, "cu_seqlens") for case in PACKED_CASES] + [
    (PACKED_CASES[0], "seq_ids"), (PACKED_CASES[3], "seq_ids"), (PACKED_CASES[4], "batch-of-one")]


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("case,form", PACKED_FORMS, ids=[f"{c[0]}-{f}" for c, f in PACKED_FORMS])
def test_packed_grpo_equals_padded(backend, device, form, case, monkeypatch):
    monkeypatch.setitem(vocab_stats.CHUNK_BYTES, "cpu", 1)  # 16-row chunks: the one-pass path sees 2 chunks
    name, kw = case
    d = _data(_seed("packed-" + name), T=9)
    lengths = [9, 0, 4, 7]  # the longest fills the padded T; an empty sequence
    keep, pack, cu, seq_ids = _packed(d, lengths)
    mask = d["mask"] * keep
    mask[2, :2] = 0  # prompt tokens inside a sequence
    common = dict(temperature=TEMPERATURE, backend=backend, **kw)
    h1, h2 = d["h"].clone().requires_grad_(), d["h"].clone().requires_grad_()
    tw = corrections.rollout_is_weights(d["old"], d["rollout"], mask, level="sequence", high=1.5)[:, 0]
    padded, pm = onepass.grpo_loss(h1, d["w"], d["t"], d["adv"], mask=mask, old_logp=d["old"], ref_logp=d["ref"],
                                   token_weights=tw, **common)
    padded.backward()
    layout = {"cu_seqlens": cu} if form == "cu_seqlens" else {"seq_ids": seq_ids}
    hp = pack(h2) if form != "batch-of-one" else pack(h2)[None]
    packed, km = onepass.grpo_loss(hp, d["w"], pack(d["t"]), d["adv"], mask=pack(mask), old_logp=pack(d["old"]),
                                   ref_logp=pack(d["ref"]), token_weights=tw, **layout, **common)
    packed.backward()
    assert abs(packed.item() - padded.item()) <= 1e-6 * max(1.0, abs(padded.item()))
    assert torch.allclose(h2.grad, h1.grad * keep[..., None], atol=1e-6)
    for k, v in pm.items():
        assert abs(km[k].item() - v.item()) <= 1e-6, k
    # per-token advantages given packed
    adv_tok = d["adv"][:, None].expand(mask.shape)
    again, _ = onepass.grpo_loss(hp.detach(), d["w"], pack(d["t"]), pack(adv_tok), mask=pack(mask),
                                 old_logp=pack(d["old"]), ref_logp=pack(d["ref"]), token_weights=tw, **layout, **common)
    assert abs(again.item() - padded.item()) <= 1e-6 * max(1.0, abs(padded.item()))


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("divergence,loss_agg", [("reverse_kl", "seq-mean-token-mean"),
                                                 ("sampled_reverse_kl", "seq-mean-token-sum-norm")])
def test_packed_opd_equals_padded(backend, device, divergence, loss_agg):
    d = _data(_seed("packed-opd" + divergence), T=8)
    lengths = [5, 8, 3, 2]
    keep, pack, cu, _ = _packed(d, lengths)
    mask = d["mask"] * keep
    h1, h2 = d["h"].clone().requires_grad_(), d["h"].clone().requires_grad_()
    common = dict(divergence=divergence, loss_agg=loss_agg, temperature=TEMPERATURE, backend=backend)
    padded, _ = onepass.opd_loss(h1, d["w"], d["ref_h"], d["ref_w"], d["t"], mask=mask, **common)
    padded.backward()
    packed, _ = onepass.opd_loss(pack(h2), d["w"], pack(d["ref_h"]), d["ref_w"], pack(d["t"]), mask=pack(mask),
                                 cu_seqlens=cu, **common)
    packed.backward()
    assert abs(packed.item() - padded.item()) <= 1e-6 * max(1.0, abs(padded.item()))
    assert torch.allclose(h2.grad, h1.grad * keep[..., None], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# KL details and bad input
# ------------------------------------------------------------------------------------------------
def test_k3_tiny_log_ratio_not_flushed_in_float32():
    x = torch.tensor([1e-4, -1e-4, 3e-5, -1e-5], dtype=torch.float32)
    for name in ("k3", "low_var_kl"):
        k3 = onepass.kl_penalty(x, torch.zeros_like(x), estimator=name)
        want = x.double() ** 2 / 2 - x.double() ** 3 / 6
        assert torch.all(k3 > 0)
        assert ((k3.double() - want).abs() / want).max() < 1e-2
    naive = torch.exp(-x) + x - 1  # what the textbook formula gives in float32
    assert (naive <= 0).any() or ((naive.double() - x.double() ** 2 / 2).abs() / (x.double() ** 2 / 2)).max() > 0.5


def test_kl_penalty_aliases_clamps_and_k2_is():
    g = torch.Generator().manual_seed(5)
    logp, ref, old = (torch.randn(3, 6, generator=g, dtype=F64) * 3 for _ in range(3))
    for name, base in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        assert torch.equal(onepass.kl_penalty(logp, ref, estimator=name), onepass.kl_penalty(logp, ref, estimator=base))
    for grad in ("estimator", "k2", "k2_is"):
        a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        ours = onepass.kl_penalty(a, ref, estimator="k3", clamp=(-10.0, None), value_clamp=10.0, gradient=grad,
                                  old_logp=old)
        want = pv.kl_penalty(b, ref, "k3", log_ratio_clamp=(-10.0, None), value_clamp=10.0, gradient=grad,
                             old_logp=old)
        ours.sum().backward()
        want.sum().backward()
        assert torch.allclose(ours, want, atol=1e-12) and torch.allclose(a.grad, b.grad, atol=1e-12), grad


def _bad(**kw):
    d = _data(1, B=2, T=3, D=4, V=7)
    base = dict(mask=d["mask"], old_logp=d["old"], backend="cpu")
    base.update(kw)
    return onepass.grpo_loss(d["h"], d["w"], d["t"], d["adv"], **base)


BAD = [
    (dict(objective="ppo"), "objective"),
    (dict(ratio_level="seq"), "ratio_level"),
    (dict(log_ratio_clamp=-1.0), "log_ratio_clamp"),
    (dict(log_ratio_clamp=(3.0, 1.0)), "log_ratio_clamp"),
    (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(ratio_cap=0.0), "ratio_cap"),
    (dict(sapo_tau_pos=0.0, objective="sapo"), "sapo_tau_pos"),
    (dict(objective="dro"), "dro_beta"),
    (dict(cov_bounds=(1.0,)), "cov_bounds"),
    (dict(cov_fraction=-1.0), "cov_fraction"),
    (dict(vespo_params=(1.0, 2.0)), "vespo_params"),
    (dict(generator=3), "generator"),
    (dict(off_policy_threshold="x"), "off_policy_threshold"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(kl_log_ratio_clamp=0.0), "kl_log_ratio_clamp"),
    (dict(kl_value_clamp="big"), "kl_value_clamp"),
    (dict(kl_gradient="k3"), "kl_gradient"),
    (dict(kl_ratio_weight=1), "kl_ratio_weight"),
    (dict(loss_agg="seq-mean"), "loss_agg"),
    (dict(kl_agg="local-token-mean"), "kl_agg"),
    (dict(entropy_agg="mean"), "entropy_agg"),
    (dict(num_tokens=0), "num_tokens"),
    (dict(num_sequences=-2), "num_sequences"),
    (dict(horizon=float("nan")), "horizon"),
    (dict(empty_sequences="drop"), "empty_sequences"),
    (dict(loss_scale=float("inf")), "loss_scale"),
    (dict(token_weights=torch.ones(3)), "token_weights"),
    (dict(sampling_logp=torch.zeros(2, 3)), "sampling_logp"),
    (dict(sampling_logp=torch.zeros(2, 4), off_policy_threshold=0.1), "sampling_logp"),
    (dict(top_entropy_quantile=0.5, cu_seqlens=torch.tensor([0, 2, 6])), "hidden"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6]), seq_ids=torch.zeros(6, dtype=torch.long)), "cu_seqlens or as seq_ids"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        _bad(**kw)


def test_bad_packed_inputs():
    d = _data(2, B=2, T=3, D=4, V=7)
    h, t, m = d["h"].reshape(6, 4), d["t"].reshape(6), d["mask"].reshape(6)
    call = lambda **kw: onepass.grpo_loss(h, d["w"], t, d["adv"], mask=m, backend="cpu", **kw)  # noqa: E731
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=torch.tensor([0, 4, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="seq_ids"):
        call(seq_ids=torch.tensor([0, 0, -1, 1, 1, 1]))
    with pytest.raises(ValueError, match="seq_ids"):
        call(seq_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="advantages"):
        call(cu_seqlens=torch.tensor([0, 2, 4, 6]))  # 3 sequences, advantages [2]
    with pytest.raises(TypeError, match="unexpected keyword"):
        call(cu_seqlens=torch.tensor([0, 2, 6]), loss_type="dapo")
    with pytest.raises(ValueError, match="old_logp"):
        call(cu_seqlens=torch.tensor([0, 2, 6]), objective="dppo_tv")
    with pytest.raises(ValueError, match="rollout_logp"):
        corrections.rollout_is_weights(d["old"], d["old"][:, :2], d["mask"])
    with pytest.raises(ValueError, match="level"):
        corrections.rollout_is_weights(d["old"], d["old"], d["mask"], level="seq")
    with pytest.raises(ValueError, match="mode"):
        corrections.trl_vllm_is_weights(d["old"], d["old"], d["mask"], mode="token_clip")
    with pytest.raises(ValueError, match="rejection option"):
        corrections.rollout_rejection_mask(d["old"], d["old"], d["mask"], {"token_k4": 1.0})


TRL_DIRECT = [dict(loss_type="grpo", beta=0.04), dict(loss_type="dapo", gradient_accumulation_steps=2,
                                                        steps_per_generation=4, entropy_coef=0.01),
              dict(loss_type="dr_grpo", max_completion_length=9),
              dict(loss_type="luspo", importance_sampling_level="sequence"),
              dict(loss_type="cispo", epsilon_high=1.2), dict(loss_type="sapo", beta=0.04)]


@pytest.mark.parametrize("cfg", TRL_DIRECT, ids=[c["loss_type"] for c in TRL_DIRECT])
def test_fused_vs_trl_itself(cfg):
    """The fused loss with ``presets.trl_grpo`` against TRL's own ``GRPOTrainer._compute_loss`` fed with the
    float64 log-probs of the same hidden states (loss and gradient w.r.t. hidden)."""
    pytest.importorskip("trl")
    from test_policy_variants_reference import _trl_loss

    d = _data(_seed("trl-" + cfg["loss_type"]))
    hr = d["h"].double().requires_grad_()
    logp, entropy = _logp_entropy(hr, d["w"].double(), d["t"])
    peer_inputs = dict(mask=d["mask"].long(), adv=d["adv"].double(), old=d["old"].double(), ref=d["ref"].double(),
                       entropy=entropy)  # with its gradient: the entropy bonus
    peer = _trl_loss(peer_inputs, logp, cfg)[0]
    peer.backward()
    h = d["h"].clone().requires_grad_()
    kw = presets.trl_grpo(num_items_in_batch=d["mask"].sum(), **cfg)
    loss, _ = onepass.grpo_loss(h, d["w"], d["t"], d["adv"], mask=d["mask"], old_logp=d["old"], ref_logp=d["ref"],
                                temperature=TEMPERATURE, backend="cpu", **kw)
    loss.backward()
    assert abs(loss.item() - peer.item()) <= 2e-5 * max(1.0, abs(peer.item()))
    assert (h.grad.double() - hr.grad).abs().max() <= 1e-4 * max(hr.grad.abs().max().item(), 1e-3)


def test_entropy_quantile_matches_torch_quantile():
    """The high-entropy threshold (sort-based: no 2^24-element limit) equals ``torch.quantile``."""
    from onepass.policy_terms import _quantile
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 9, 1000):
        x = torch.randn(n, generator=g)
        for q in (0.0, 0.25, 0.6, 0.999, 1.0):
            assert torch.allclose(_quantile(x, q), torch.quantile(x, q), rtol=0, atol=1e-6), (n, q)


def test_kl_penalty_bad_arguments():
    x = torch.zeros(2, 3)
    for kw, name in ((dict(value_clamp=-1.0), "value_clamp"), (dict(clamp=(2.0, 1.0)), "clamp"),
                     (dict(gradient="k4"), "kl_gradient"), (dict(old_logp=torch.zeros(3)), "old_logp"),
                     (dict(estimator="low_var"), "estimator")):
        with pytest.raises(ValueError, match=name):
            onepass.kl_penalty(x, x, **kw)
