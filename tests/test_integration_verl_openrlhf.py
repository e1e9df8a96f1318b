"""onepass.integrations.verl / .openrlhf against the installed verl 0.9 and OpenRLHF 0.11 functions.

What runs here (CPU, no Ray / vLLM / DeepSpeed / flash-attn): verl's and OpenRLHF's pure-PyTorch functions,
imported from the installed packages without their package ``__init__`` by ``_peers.import_peer``, with
``deepspeed`` (OpenRLHF's ZeRO-3 helpers) and ``flash_attn.bert_padding`` / ``flash_attn.utils.distributed``
(OpenRLHF's packed-sequence path, which the integration refuses) stubbed during the import when absent.
verl's Triton ``linear_cross_entropy`` needs a CUDA device: it is compared on GPU only.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import onepass.integrations.openrlhf as onepass_openrlhf
import onepass.integrations.verl as onepass_verl
from onepass.integrations import UnsupportedOption

from _peers import import_peer
from _tiny_lm import tiny_lm


def _verl(module):
    pytest.importorskip("tensordict")
    return import_peer("verl", [], lambda: importlib.import_module(module))


def _openrlhf(module):
    stubs = ["deepspeed", "flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed"]
    return import_peer("openrlhf", stubs, lambda: importlib.import_module(module), subpackages=["openrlhf.models"])


def _inputs(dtype, n=(3, 7), d=20, v=131, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, d, generator=g, dtype=dtype)
    weight = torch.randn(v, d, generator=g, dtype=dtype) * 0.7
    targets = torch.randint(0, v, n, generator=g)
    return hidden, weight, targets


def _grads(fn, leaves, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(((o.double() * u).sum() for o, u in zip(outs, upstream)), torch.zeros((), dtype=torch.float64)).backward()
    return [o.detach().double() for o in outs] + [x.grad.double() for x in leaves]


def _assert_all_close(got, want, rtol, atol):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"output/gradient {i}")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_verl_fused_linear_for_ppo(temperature):
    verl_fused = _verl("verl.utils.experimental.torch_functional")
    hidden, weight, targets = _inputs(torch.float32)
    upstream = [torch.randn(targets.shape, dtype=torch.float64) for _ in range(2)]
    want = _grads(lambda h, w: verl_fused.FusedLinearForPPO(chunk_size=16)(h, w, targets, temperature),
                  [hidden, weight], upstream)
    got = _grads(lambda h, w: onepass_verl.FusedLinearForPPO()(h, w, targets, temperature), [hidden, weight],
                 upstream)
    _assert_all_close(got, want, rtol=1e-5, atol=1e-5)


def _float64_logits(lead, v, scale, seed):
    """(logits [*lead, V] float64, labels [*lead], one upstream gradient [*lead])."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, v, generator=g, dtype=torch.float64) * scale
    return logits, torch.randint(0, v, lead, generator=g), [torch.randn(*lead, generator=g, dtype=torch.float64)]


def test_verl_logits_functions_float64():
    verl_f = _verl("verl.utils.torch_functional")
    logits, labels, upstream = _float64_logits((4, 9), 157, 3.0, seed=1)
    for ours, theirs in [(lambda x: onepass_verl.logprobs_from_logits(x, labels),
                          lambda x: verl_f.logprobs_from_logits(x, labels)),
                         (onepass_verl.entropy_from_logits, verl_f.entropy_from_logits)]:
        _assert_all_close(_grads(ours, [logits], upstream), _grads(theirs, [logits], upstream), 1e-10, 1e-10)


def test_verl_patch_routes_the_fused_forward():
    """verl's ``use_fused_kernels`` forward (``dense_common.forward_with_torch_backend``) on a tiny Qwen2, after
    ``patch()``: same log-probs and entropy as verl's own torch fused path, and onepass did the work."""
    dense = _verl("verl.models.transformers.dense_common")
    verl_f = _verl("verl.utils.torch_functional")
    model = tiny_lm(96)
    ids = torch.randint(3, 96, (2, 11))
    want = dense.forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=0.8)
    original_logprobs = verl_f.logprobs_from_logits
    onepass_verl.patch()
    try:
        import verl.utils.experimental.torch_functional as fused_module
        assert fused_module.FusedLinearForPPO is onepass_verl.FusedLinearForPPO
        assert verl_f.logprobs_from_logits is onepass_verl.logprobs_from_logits
        got = dense.forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=0.8)
    finally:
        onepass_verl.unpatch()
    assert verl_f.logprobs_from_logits is original_logprobs
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_verl_triton_linear_cross_entropy_gpu():
    verl_lce = _verl("verl.utils.kernel.linear_cross_entropy")
    hidden, weight, targets = (x.cuda() for x in _inputs(torch.float32, n=(64,), d=128, v=4096))
    want = verl_lce.linear_cross_entropy(hidden, weight, targets, 0.7)
    got = onepass_verl.linear_cross_entropy(hidden, weight, targets, 0.7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-3)


def test_verl_refusals():
    hidden, weight, targets = _inputs(torch.float32)
    with pytest.raises(UnsupportedOption, match="reduction"):
        onepass_verl.linear_cross_entropy(hidden, weight, targets, 1.0, reduction="mean")
    with pytest.raises(UnsupportedOption, match="dist_process_group"):
        onepass_verl.linear_cross_entropy(hidden, weight, targets, 1.0, dist_process_group=object())


def test_openrlhf_logits_functions_float64():
    utils = _openrlhf("openrlhf.models.utils")
    logits, labels, upstream = _float64_logits((3, 8), 211, 2.0, seed=2)
    want = _grads(lambda x: utils.log_probs_from_logits(x.clone(), labels, temperature=0.7), [logits], upstream)
    got = _grads(lambda x: onepass_openrlhf.log_probs_from_logits(x, labels, temperature=0.7), [logits], upstream)
    _assert_all_close(got, want, 1e-10, 1e-10)
    want = utils.compute_entropy.__wrapped__(logits)  # its eager body: compiling it on CPU takes ~10 s
    torch.testing.assert_close(onepass_openrlhf.compute_entropy(logits).double(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_openrlhf_compute_approx_kl(estimator, unbiased):
    utils = _openrlhf("openrlhf.models.utils")
    g = torch.Generator().manual_seed(3)
    # log-ratios from small to far beyond both clamps (±10 on values, -10 / 20 on log-ratios)
    lp = torch.randn(5, 40, generator=g) * 8
    base = torch.randn(5, 40, generator=g) * 8
    old = lp + torch.randn(5, 40, generator=g)
    upstream = [torch.randn(5, 40, dtype=torch.float64)]
    want = _grads(lambda a: utils.compute_approx_kl(a, base, old, kl_estimator=estimator, unbiased_gradient=unbiased),
                  [lp], upstream)
    got = _grads(lambda a: onepass_openrlhf.compute_approx_kl(a, base, old, kl_estimator=estimator,
                                                              unbiased_gradient=unbiased), [lp], upstream)
    _assert_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_openrlhf_patched_actor(arch, monkeypatch):
    actor_module = _openrlhf("openrlhf.models.actor")
    # OpenRLHF's compute_entropy is torch.compile'd; run its eager body (compiling on CPU takes ~40 s).
    monkeypatch.setattr(actor_module, "compute_entropy", actor_module.compute_entropy.__wrapped__)
    model = tiny_lm(96, arch=arch)
    reference = actor_module.Actor(model, temperature=0.7)
    reference.packing_samples = False
    patched = onepass_openrlhf.patch_actor(actor_module.Actor(model, temperature=0.7))
    patched.packing_samples = False
    g = torch.Generator().manual_seed(4)
    sequences = torch.randint(3, 96, (3, 12), generator=g)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # left padding
    sequences[0, :3] = 0
    action_mask = torch.ones(3, 5)
    action_mask[1, -2:] = 0
    results = []
    for actor in (reference, patched):
        model.zero_grad()
        logp, out = actor(sequences, action_mask, attention_mask, return_output=True, return_entropy=True)
        (logp.sum() + out.entropy[:, -5:].sum()).backward()
        results.append([logp.detach(), out.entropy.detach()] + [p.grad.clone() for p in model.parameters()])
    _assert_all_close(results[1], results[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedOption, match="return_output"):
        patched(sequences, None, attention_mask, return_output=True)
    with pytest.raises(UnsupportedOption, match="packed_seq_lens"):
        patched(sequences, action_mask, attention_mask, packed_seq_lens=[12])
    reference.packing_samples = True
    with pytest.raises(UnsupportedOption, match="packing_samples"):
        onepass_openrlhf.patch_actor(reference)
