"""``onepass.distributed.grpo_loss`` with every kind of policy-loss option, on 2 gloo processes, against the
single-device ``onepass.grpo_loss`` on the gathered head.

One spawn of 2 ranks runs every case (spawning costs seconds): each rank holds its shard of the policy (and
reference) head, computes the vocab-parallel loss and compares the loss, every metric and the gradients
(hidden, its weight shard, its bias shard) with the single-device loss on the full head: in float32 within
|x − ref| ≤ 2e-5 + 2e-5·|ref| (the 2-rank loss goes through per-shard sums and the stats path, the
single-device one may take the one-pass chunked kernel), in float64 within 1e-10 + 2e-5·|ref|; gradcheck (float64)
of the loss w.r.t. the hidden states shared by the ranks.  The options' validation is the single-device one:
same exception and message, no process group needed.
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch

import onepass
from onepass import distributed as opd

from test_distributed import ATOL, WORLD, _compare_grads, _Errors, _grads, _layout, _leaf, _shard, _split, _targets
from _spawn import free_port, record_error, spawn_ranks

SPAWN_TIMEOUT_S = 150.0
V, D, DR = 37, 16, 12
#: float64: the 2-rank and the single-device losses are the same math up to the order of fp64 sums.
ATOL_FLOAT64 = 1e-10
#: Each case: (name, loss keywords beyond the common ones, uses the reference head, swapped shard layout).
#: ``OLD`` / ``REF`` / ``TOKEN_WEIGHTS`` / ``SEQ_WEIGHTS`` / ``SAMPLING`` stand for the per-token tensors built
#: in ``_check_variants``.
CASES = [
    ("gspo sequence ratio", dict(ratio_level="sequence", old_logp="OLD", epsilon_low=3e-2, epsilon_high=4e-2), False,
     False),
    ("gspo-token, clamp (None, 10), loss_scale", dict(ratio_level="sequence-token", old_logp="OLD",
                                                      log_ratio_clamp=(None, 10.0), loss_scale=0.5), False, True),
    ("cispo", dict(objective="cispo", old_logp="OLD", epsilon_high=0.1, loss_agg="seq-mean-token-sum"), False, False),
    ("sapo", dict(objective="sapo", old_logp="OLD", sapo_tau_pos=0.8, sapo_tau_neg=1.3), False, True),
    ("clip_cov", dict(objective="clip_cov", old_logp="OLD", cov_fraction=0.2, cov_bounds=(-5.0, 5.0)), False, False),
    ("kl_cov", dict(objective="kl_cov", old_logp="OLD", cov_fraction=0.2, kl_cov_coef=2.0), False, True),
    ("dro", dict(objective="dro", old_logp="OLD", dro_beta=0.7), False, False),
    ("dppo_tv, ratio_cap", dict(objective="dppo_tv", old_logp="OLD", ratio_cap=1.1), False, True),
    ("geo_mean, token_weights [B, T]", dict(objective="geo_mean", old_logp="OLD", token_weights="TOKEN_WEIGHTS"),
     False, False),
    ("vespo, token_weights [B]", dict(objective="vespo", old_logp="OLD", token_weights="SEQ_WEIGHTS"), False, True),
    ("ppo_clip dual_clip, token_weights", dict(old_logp="OLD", dual_clip=2.0, token_weights="TOKEN_WEIGHTS"), False,
     False),
    ("top_entropy_quantile, local-token-mean", dict(old_logp="OLD", top_entropy_quantile=0.4, entropy_coef=0.05,
                                                   entropy_agg="local-token-mean"), False, True),
    ("off_policy_threshold + sampling_logp", dict(old_logp="OLD", off_policy_threshold=0.05, sampling_logp="SAMPLING"),
     False, False),
    ("normalizers seq-mean-token-sum-norm", dict(loss_agg="seq-mean-token-sum-norm", num_sequences=4.0, horizon=7.0,
                                                 empty_sequences="count", entropy_coef=0.01), False, True),
    ("normalizers num_tokens, kl_agg", dict(num_tokens=11.0, ref_logp="REF", beta=0.1, kl_agg="seq-mean-token-mean"),
     False, False),
    ("ref_logp k3, kl clamps, k2_is, ratio weight", dict(old_logp="OLD", ref_logp="REF", beta=0.2, kl_estimator="k3",
                                                         kl_log_ratio_clamp=1.0, kl_value_clamp=(-0.5, 2.0),
                                                         kl_gradient="k2_is", kl_ratio_weight=True), False, True),
    ("ref head k3+", dict(old_logp="OLD", beta=0.1, kl_estimator="k3+", temperature=0.8), True, False),
    ("ref head kl full, seq-mean-token-mean", dict(old_logp="OLD", beta=0.1, kl_estimator="full",
                                                   loss_agg="seq-mean-token-mean", logit_softcap=3.0), True, True),
    ("ref head kl full jsd, gspo", dict(old_logp="OLD", beta=0.3, kl_estimator="full", ref_divergence="jsd",
                                        ref_divergence_beta=0.3, ratio_level="sequence"), True, False),
]
#: Options that single-device ``grpo_loss`` refuses; the distributed one must raise the same.
BAD_OPTIONS = [dict(objective="ppo"), dict(ratio_level="seq"), dict(epsilon_low=-0.1), dict(dual_clip=0.5),
               dict(top_entropy_quantile=1.5), dict(loss_agg="mean"), dict(num_tokens=0.0), dict(kl_estimator="k9"),
               dict(kl_gradient="none"), dict(kl_estimator="full", beta=0.1), dict(objective="dro", dro_beta=1.0),
               dict(sampling_logp="SAMPLING"), dict(ref_divergence="tv"), dict(beta=0.1),
               dict(cov_bounds=(1.0,)), dict(unknown_option=1)]


def _entry(rank, world, port, out_dir):
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        errs = _Errors()
        for dtype in (torch.float32, torch.float64):
            _check_variants(rank, world, errs, dtype)
            _check_packed(rank, world, errs, dtype)
        _check_gradcheck(rank, world)
        if rank == 0:
            (out_dir / "errors.json").write_text(json.dumps(errs.table, indent=1))
    except BaseException as exc:
        record_error(out_dir, rank, exc)
        raise
    finally:
        dist.destroy_process_group()


def _inputs(seed, dtype, b=4, t=6):
    """Policy head (with bias), reference head, targets, a mask with one fully masked sequence, per-token
    tensors with logp-like values near the policy's own (so that clipping and masks select some tokens)."""
    torch.manual_seed(seed)
    leaf = lambda *shape, scale=1.0: _leaf(*shape, scale=scale).to(dtype).detach().requires_grad_()  # noqa: E731
    h, w, bias = leaf(b, t, D), leaf(V, D, scale=0.5), leaf(V)
    rh, rw, rb = (torch.randn(b, t, DR, dtype=dtype), torch.randn(V, DR, dtype=dtype) * 0.5,
                  torch.randn(V, dtype=dtype))
    y = _targets((b, t), V, ignore=False)
    mask = (torch.rand(b, t) > 0.25).float()
    mask[1] = 0  # an empty sequence (left out of the sequence means unless empty_sequences="count")
    mask[0, 0] = 1
    with torch.no_grad():
        logp = onepass.linear_token_logprobs(h, w, y, bias=bias)
    noisy = lambda s: (logp + s * torch.randn(b, t, dtype=dtype)).detach()  # noqa: E731
    tensors = dict(OLD=noisy(0.1), REF=noisy(0.3), SAMPLING=noisy(0.2),
                   TOKEN_WEIGHTS=torch.rand(b, t, dtype=dtype) + 0.5, SEQ_WEIGHTS=torch.rand(b, dtype=dtype) + 0.5)
    return h, w, bias, (rh, rw, rb), y, mask, torch.randn(b, dtype=dtype), tensors


def _compare(errs, case, dtype, out, ref, dist_inputs, full_inputs, slices):
    atol = ATOL if dtype == torch.float32 else ATOL_FLOAT64
    (loss, metrics), (loss_ref, metrics_ref) = out, ref
    assert loss.dtype == loss_ref.dtype == dtype, f"{case}: loss dtype {loss.dtype}, single-device {loss_ref.dtype}"
    errs(f"{case} loss", loss, loss_ref, atol=atol)
    assert metrics.keys() == metrics_ref.keys(), f"{case}: metrics {sorted(metrics)} != {sorted(metrics_ref)}"
    for k in metrics:
        errs(f"{case} metric {k}", metrics[k], metrics_ref[k], atol=atol)
    g, gf = _grads(loss, dist_inputs), _grads(loss_ref, full_inputs)
    assert max(x.abs().max().item() for x in gf) > 1e-3, f"{case}: gradient too small to test"
    _compare_grads(errs, case, g, gf, slices, atol=atol)


def _check_variants(rank, world, errs, dtype):
    h, w, bias, (rh, rw, rb), y, mask, adv, tensors = _inputs(11, dtype)
    adv_token = torch.randn(y.shape, dtype=dtype)
    for i, (name, options, with_ref, swapped) in enumerate(CASES):
        start, size, vocab_start = _layout(V, rank, world, swapped)
        ws, bs = _shard(w, start, size), _shard(bias, start, size)
        kw = {k: tensors[x] if isinstance(x, str) and x in tensors else x for k, x in options.items()}
        kw["mask"] = mask
        full_ref, shard_ref = {}, {}
        if with_ref:
            full_ref = dict(ref_hidden=rh, ref_weight=rw, ref_bias=rb)
            shard_ref = dict(ref_hidden=rh, ref_weight=rw[start:start + size], ref_bias=rb[start:start + size])
        a = adv_token if i % 3 == 2 else adv  # per-token advantages on every third case
        out = opd.grpo_loss(h, ws, y, a, bias=bs, vocab_start=vocab_start, **shard_ref, **kw)
        ref = onepass.grpo_loss(h, w, y, a, bias=bias, **full_ref, **kw)
        sl = (start, size)
        _compare(errs, f"{dtype} {name}", dtype, out, ref, [h, ws, bs], [h, w, bias], [None, sl, sl])


def _packed(x, mask):
    """The unmasked-length prefix of each row of x [B, T, ...] (sequence b keeps its first n_b tokens),
    concatenated: [N, ...]."""
    return torch.cat([x[b, :int(n)] for b, n in enumerate(mask.sum(-1))])


def _check_packed(rank, world, errs, dtype):
    """Packed sequences (hidden [N, D], cu_seqlens; seq_ids in [1, N, D]) with a sequence ratio, a random
    objective and the full penalty to the reference head."""
    h, w, bias, (rh, rw, rb), y, _, adv, tensors = _inputs(12, dtype)
    lengths = torch.tensor([5, 0, 3, 6])  # an empty sequence too
    grid_mask = (torch.arange(y.shape[1])[None] < lengths[:, None]).float()
    hp = _packed(h.detach(), grid_mask).requires_grad_()
    yp, old, rhp = _packed(y, grid_mask), _packed(tensors["OLD"], grid_mask), _packed(rh, grid_mask)
    mask = torch.ones(yp.shape)
    mask[2] = 0  # a masked token inside a sequence
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    start, size = _split(V, rank, world)
    ws, bs = _shard(w, start, size), _shard(bias, start, size)
    cases = {
        "packed cu_seqlens gspo, clip_cov": (hp, dict(cu_seqlens=cu, ratio_level="sequence", objective="clip_cov",
                                                      cov_fraction=0.3, cov_bounds=(-9.0, 9.0))),
        "packed seq_ids [1, N, D], kl full, seq-mean-token-mean": (
            hp[None], dict(seq_ids=seq_ids, kl_estimator="full", beta=0.2, loss_agg="seq-mean-token-mean",
                           ref_hidden=rhp[None], top_entropy_quantile=0.5)),
    }
    for name, (hidden, kw) in cases.items():
        with_ref = "ref_hidden" in kw
        full = dict(kw, ref_weight=rw, ref_bias=rb) if with_ref else kw
        shard = dict(kw, ref_weight=rw[start:start + size], ref_bias=rb[start:start + size]) if with_ref else kw
        common = dict(mask=mask, old_logp=old)
        out = opd.grpo_loss(hidden, ws, yp, adv, bias=bs, **common, **shard)
        ref = onepass.grpo_loss(hidden, w, yp, adv, bias=bias, **common, **full)
        sl = (start, size)
        _compare(errs, f"{dtype} {name}", dtype, out, ref, [hp, ws, bs], [hp, w, bias], [None, sl, sl])


def _check_gradcheck(rank, world):
    """float64 gradcheck of the 2-rank loss w.r.t. the hidden states (the same perturbation on every rank,
    as the hidden states are shared): GSPO with the reference head's k3, and sapo with a per-token ratio."""
    h, w, bias, (rh, rw, _), y, mask, adv, tensors = _inputs(13, torch.float64, b=2, t=3)
    start, size = _split(V, rank, world)
    ws, rws = w.detach()[start:start + size], rw[start:start + size]
    cases = {"gspo ref head k3": dict(ratio_level="sequence", beta=0.1, ref_hidden=rh, ref_weight=rws),
             "sapo token_weights": dict(objective="sapo", token_weights=tensors["TOKEN_WEIGHTS"])}
    for name, kw in cases.items():
        def loss(hidden):
            return opd.grpo_loss(hidden, ws, y, adv, mask=mask, old_logp=tensors["OLD"], **kw)[0]

        assert torch.autograd.gradcheck(loss, (h,), fast_mode=True), name


def test_grpo_loss_variants_match_single_device(tmp_path):
    spawn_ranks(_entry, (WORLD, free_port(), tmp_path), WORLD, SPAWN_TIMEOUT_S, "grpo_loss variants")
    table = json.loads((tmp_path / "errors.json").read_text())
    assert len(table) >= 2 * (len(CASES) + 2) * 3, f"only {len(table)} cases recorded"
    for dtype in ("float32", "float64"):
        worst = max(((k, x) for k, x in table.items() if dtype in k), key=lambda kv: kv[1][0])
        print(f"\n{dtype}: worst abs error {worst[1][0]:.2e} ({worst[0]})")


def test_same_signature_as_single_device():
    single = inspect.signature(onepass.grpo_loss).parameters
    parallel = inspect.signature(opd.grpo_loss).parameters
    assert [p for p in parallel if p not in ("group", "vocab_start")] == list(single)
    for name, p in single.items():
        assert (parallel[name].kind, parallel[name].default) == (p.kind, p.default), name


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_bad_option_same_error_as_single_device(options):
    """Validation happens before any collective: no process group needed."""
    h, w, _, (rh, rw, _), y, mask, adv, tensors = _inputs(14, torch.float32, b=2, t=3)
    kw = {k: tensors[x] if isinstance(x, str) and x in tensors else x for k, x in options.items()}
    if options.get("ref_divergence") == "tv":
        kw.update(ref_hidden=rh, ref_weight=rw)
    errors = []
    for fn in (onepass.grpo_loss, opd.grpo_loss):
        with pytest.raises((ValueError, TypeError)) as info:
            fn(h, w, y, adv, mask=mask, **kw)
        errors.append((info.type, str(info.value).replace("distributed.grpo_loss", "grpo_loss")))
    assert errors[0] == errors[1]


def test_bad_packed_input_same_error_as_single_device():
    h, w, _, _, y, mask, adv, _ = _inputs(15, torch.float32, b=2, t=5)
    for kw in (dict(cu_seqlens=torch.tensor([0, 2, 4])), dict(seq_ids=torch.tensor([0, 0, -1, 1, 1])),
               dict(cu_seqlens=torch.tensor([0, 5]), seq_ids=torch.zeros(5, dtype=torch.int64))):
        errors = []
        for fn in (onepass.grpo_loss, opd.grpo_loss):
            with pytest.raises(ValueError) as info:
                fn(h[0], w, y[0], adv, mask=mask[0], **kw)
            errors.append(str(info.value))
        assert errors[0] == errors[1], kw
