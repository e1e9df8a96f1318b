"""Vocabulary-parallel ops (onepass.distributed) on 2 gloo processes against the single-process ops.

Every check runs inside ONE spawn of 2 ranks (spawning costs seconds): each rank holds its shard of the
LM head(s), computes the vocab-parallel op and a loss with random coefficients, and compares values and
gradients (hidden, its weight shard, its bias shard) with the single-process op on the full head, in fp32:
|x − ref| ≤ ATOL + RTOL·|ref| (chi2, whose values reach 10²–10³: ATOL·max(1, max |ref|) + RTOL·|ref|);
float64 checks compare with the reference oracle to 1e-10.  Rank 0 writes the max abs errors (and / max
|reference|) per case to a JSON file.
"""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import onepass
from onepass import distributed as opd

from _helpers import assert_tolerance
from _spawn import free_port, record_error, spawn_ranks

WORLD = 2
ATOL, RTOL = 2e-5, 2e-5
SPAWN_TIMEOUT_S = 150.0


def _entry(rank, world, port, check, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        CHECKS[check](rank, world, Path(out_dir))
    except BaseException as exc:  # which rank failed first: its error is the job's root cause
        record_error(out_dir, rank, exc)
        raise
    finally:
        dist.destroy_process_group()


def _spawn(check: str, out_dir: Path) -> None:
    """Run CHECKS[check] on WORLD gloo ranks; a rank's exception is re-raised here; no hang past the timeout."""
    spawn_ranks(_entry, (WORLD, free_port(), check, str(out_dir)), WORLD, SPAWN_TIMEOUT_S, check)


# ------------------------------------------------------------------------------------------------
# Checks run on every rank.
# ------------------------------------------------------------------------------------------------
class _Errors:
    """Compares and records per case the max abs error and the max abs error / max |reference|.

    ``scaled``: the floor is atol · max(1, max |reference|), for outputs whose entries reach 10²–10³
    (chi2 on random heads), where fp32 rounding of the largest terms exceeds a fixed floor."""

    def __init__(self):
        self.table = {}

    def __call__(self, case, got, ref, atol=ATOL, scaled=False):
        got, ref = got.detach().double(), ref.detach().double()
        assert got.shape == ref.shape, f"{case}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        err = (got - ref).abs()
        if scaled:
            atol = atol * max(1.0, ref.abs().max().item())
        bad = err > atol + RTOL * ref.abs()
        assert not bad.any(), f"{case}: max abs error {err.max().item():.3e} above {atol} + {RTOL}·|ref|"
        rel = err.max().item() / max(ref.abs().max().item(), 1e-30)  # relative to the largest reference entry
        old = self.table.get(case, (0.0, 0.0))
        self.table[case] = (max(old[0], err.max().item()), max(old[1], rel))


def _split(v, rank, world):
    """Default layout: ceil(V/world) rows per rank, the last rank the remainder."""
    size = -(-v // world)
    start = rank * size
    return start, min(v, start + size) - start


def _shard(full, start, size):
    return full.detach()[start:start + size].clone().requires_grad_(full.requires_grad)


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()


def _targets(shape, v, ignore=True):
    """Random global ids with the first and the last id (owned by different ranks in any layout), and one
    ignore_index at flat position 2."""
    t = torch.randint(0, v, shape)
    flat = t.view(-1)
    flat[0], flat[1] = 0, v - 1
    if ignore:
        flat[2] = -100
    return t


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _compare_grads(errs, case, dist_grads, full_grads, shard_slices, scaled=False, atol=ATOL):
    """full_grads sliced to this rank's rows where shard_slices says so (None: compare whole)."""
    for i, (g, gf, sl) in enumerate(zip(dist_grads, full_grads, shard_slices)):
        errs(f"{case} grad[{i}]", g, gf if sl is None else gf[sl[0]:sl[0] + sl[1]], atol=atol, scaled=scaled)


def _check_token_logprobs(rank, world, errs):
    for v, explicit in ((37, False), (40, True)):
        torch.manual_seed(v)
        d, lead = 16, (3, 5)
        h, w, bias = _leaf(*lead, d), _leaf(v, d, scale=0.5), _leaf(v)
        start, size = _split(v, rank, world)
        if explicit:  # rank order swapped: rank 0 holds the upper rows
            start = (world - 1 - rank) * (v // world)
            size = v // world
        y = _targets(lead, v)
        coef_lp, coef_ent = torch.randn(lead), torch.randn(lead)
        T = 0.7 if explicit else 1.0
        ws, bs = _shard(w, start, size), _shard(bias, start, size)
        use_bias = not explicit
        group = dist.new_group(list(range(world))) if explicit else None  # an explicit group, same ranks
        lp, ent = opd.linear_token_logprobs(h, ws, y, bias=bs if use_bias else None, temperature=T,
                                            return_entropy=True, vocab_start=start if explicit else None,
                                            group=group)
        lp_ref, ent_ref = onepass.linear_token_logprobs(h, w, y, bias=bias if use_bias else None, temperature=T,
                                                        return_entropy=True)
        case = f"linear_token_logprobs V={v}" + (" swapped shards T=0.7" if explicit else " bias")
        errs(f"{case} logp", lp, lp_ref)
        errs(f"{case} entropy", ent, ent_ref)
        assert (lp[0, 2] == 0) and (ent[0, 2] == 0), "ignore_index rows must be 0"
        inputs = [h, ws] + ([bs] if use_bias else [])
        full = [h, w] + ([bias] if use_bias else [])
        g = _grads((coef_lp * lp).sum() + (coef_ent * ent).sum(), inputs)
        gf = _grads((coef_lp * lp_ref).sum() + (coef_ent * ent_ref).sum(), full)
        _compare_grads(errs, case, g, gf, [None] + [(start, size)] * (len(inputs) - 1))
        with torch.no_grad():
            logp_only = opd.linear_token_logprobs(h, ws, y, bias=bs if use_bias else None, temperature=T,
                                                  vocab_start=start if explicit else None)
        errs(f"{case} logp", logp_only, lp_ref)


def _check_bf16(rank, world, errs):
    """bf16 inputs: the 2-rank op's error against the float64 single-process op is within the tests' rule
    (≤ 2 × the single-process bf16 op's error + floor), values and gradients (hidden, weight): token
    log-probs and entropy, and a second-sweep divergence (the teacher in bf16 too), whose gradients get
    factor 4: measured 3.8× on the hidden gradient, a sum of separately rounded bf16 partial gradients (the
    first sweep's, the lse identity's, the second sweep's), where the single-device op rounds once."""
    torch.manual_seed(7)
    v, d, lead = 37, 32, (4, 6)
    start, size = _split(v, rank, world)
    h64, w64 = torch.randn(*lead, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64) * 0.3
    y, coef = _targets(lead, v), torch.randn(lead)
    th64, tw64 = torch.randn(*lead, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64) * 0.3
    ops = {
        "linear_token_logprobs": (2.0, ("logp", "entropy"), lambda module, h, w, th, tw: module.linear_token_logprobs(
            h, w, y, temperature=0.9, return_entropy=True)),
        "linear_divergence hellinger": (4.0, ("value",), lambda module, h, w, th, tw: (module.linear_divergence(
            h, w, th, tw, kind="hellinger", temperature=0.9, targets=y),)),
    }

    def run(outputs, module, h, w, th, tw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = outputs(module, h, w, th, tw)
        return (*out, *_grads(sum((coef * x).sum() for x in out), [h, w]))

    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731
    for op, (factor, names, outputs) in ops.items():
        truth = run(outputs, onepass, h64, w64, th64, tw64)
        single = run(outputs, onepass, bf(h64), bf(w64), bf(th64), bf(tw64))
        par = run(outputs, opd, bf(h64), bf(w64[start:start + size]), bf(th64), bf(tw64[start:start + size]))
        names = (*names, "grad hidden", "grad weight")
        shard = lambda i, x: x[start:start + size] if i == len(names) - 1 else x  # noqa: E731
        for i, name in enumerate(names):
            assert_tolerance(par[i], shard(i, truth[i]), shard(i, single[i]), torch.bfloat16, f"bf16 {op} {name}",
                             factor=factor if name.startswith("grad") else 2.0)
            # recorded only (the bound is the rule above): bf16 gradients may differ by an ulp
            errs(f"bf16 {op} {name} (vs single-process bf16)", par[i].float(), shard(i, single[i]).float(),
                 atol=float("inf"))


def _check_policy_ref(rank, world, errs):
    torch.manual_seed(1)
    v, d, dr, lead = 37, 16, 12, (4, 3)
    h, w, bias = _leaf(*lead, d), _leaf(v, d, scale=0.5), _leaf(v)
    rh, rw, rb = torch.randn(*lead, dr), torch.randn(v, dr) * 0.5, torch.randn(v)
    start, size = _split(v, rank, world)
    y = _targets(lead, v)
    ws, bs = _shard(w, start, size), _shard(bias, start, size)
    caps = dict(temperature=0.8, logit_softcap=3.0, ref_logit_softcap=2.0, ref_logit_scale=1.2)  # per-model caps
    ref = onepass.linear_policy_ref_stats(h, w, rh, rw, y, bias=bias, ref_bias=rb, **caps)
    coef = {k: torch.randn(lead) for k in ref}
    gf = _grads(sum((coef[k] * ref[k]).sum() for k in ref), [h, w, bias])
    for backend in onepass.available_backends("cpu"):  # the shard op of every backend (torch: autograd)
        out = opd.linear_policy_ref_stats(h, ws, rh, rw[start:start + size], y, bias=bs,
                                          ref_bias=rb[start:start + size], backend=backend, **caps)
        for k in ref:
            errs(f"linear_policy_ref_stats {k}", out[k], ref[k])
        g = _grads(sum((coef[k] * out[k]).sum() for k in out), [h, ws, bs])
        _compare_grads(errs, "linear_policy_ref_stats", g, gf, [None, (start, size), (start, size)])


#: Every divergence: the KL kinds (one sweep) and the kinds of the second sweep, with β and α on both sides
#: of the kernels' branch points (alpha: α < ½ and α ≥ ½, α > 1; jsd: β ≠ ½).
KL_KINDS = [("reverse_kl", {}), ("forward_kl", {})]
SWEEP2_KINDS = [("jsd", dict(beta=0.3)), ("tv", {}), ("hellinger", {}), ("chi2", {}), ("alpha", dict(alpha=0.25)),
                ("alpha", dict(alpha=1.5))]


def _case_name(kind, params):
    return kind + "".join(f" {k}={x}" for k, x in params.items())


def _layout(v, rank, world, swapped):
    """(start, size, vocab_start keyword): the default layout, or (swapped) explicit uneven shards in reverse
    rank order, rank 0 holding the upper V − ⌈V/2⌉ − 1 rows."""
    if not swapped:
        return (*_split(v, rank, world), None)
    assert world == 2
    low = v // 2 + 2
    start, size = (low, v - low) if rank == 0 else (0, low)
    return start, size, start


def _check_divergence(rank, world, errs):
    """Every kind with gradients to both models (the teacher requires grad here), student bias, temperature,
    ignore_index; the second-sweep kinds alternate between the two layouts."""
    torch.manual_seed(2)
    v, ds, dt, lead = 37, 16, 12, (2, 7)
    for i, (kind, params) in enumerate(KL_KINDS + SWEEP2_KINDS):
        start, size, vocab_start = _layout(v, rank, world, swapped=i % 2 == 1)
        sh, sw, sb = _leaf(*lead, ds), _leaf(v, ds, scale=0.5), _leaf(v)
        th, tw = _leaf(*lead, dt), _leaf(v, dt, scale=0.5)
        y = _targets(lead, v)
        sws, sbs, tws = _shard(sw, start, size), _shard(sb, start, size), _shard(tw, start, size)
        kw = dict(kind=kind, temperature=1.3, targets=y, **params)
        out = opd.linear_divergence(sh, sws, th, tws, student_bias=sbs, vocab_start=vocab_start, **kw)
        ref = onepass.linear_divergence(sh, sw, th, tw, student_bias=sb, **kw)
        case, scaled = f"linear_divergence {_case_name(kind, params)}", kind == "chi2"
        errs(case, out, ref, scaled=scaled)
        assert out[0, 2] == 0, "ignore_index rows must be 0"
        coef = torch.randn(lead)
        g = _grads((coef * out).sum(), [sh, sws, sbs, th, tws])
        gf = _grads((coef * ref).sum(), [sh, sw, sb, th, tw])
        sl = (start, size)
        _compare_grads(errs, case, g, gf, [None, sl, sl, None, sl], scaled)
        with torch.no_grad():  # no normalizer needs a gradient: the second sweep sends D only
            no_grad = opd.linear_divergence(sh, sws, th, tws, student_bias=sbs, vocab_start=vocab_start, **kw)
        errs(case, no_grad, ref, scaled=scaled)


def _check_divergence_float64(rank, world, errs):
    """float64, the second-sweep kinds: values and every gradient equal the float64 reference oracle
    (``onepass.reference``, autograd on the materialized logits) to 1e-10; gradcheck of both hidden states
    (shared by the ranks, so a perturbation moves both ranks' logits, as in one process)."""
    from onepass import reference

    torch.manual_seed(9)
    v, d, lead = 11, 5, (2, 3)
    start, size = _split(v, rank, world)
    sl = (start, size)
    for kind, params in SWEEP2_KINDS:
        sh, sw, sb = (_leaf(*shape).double().detach().requires_grad_() for shape in ((*lead, d), (v, d), (v,)))
        th, tw = (_leaf(*shape).double().detach().requires_grad_() for shape in ((*lead, d), (v, d)))
        y = _targets(lead, v)
        sws, sbs, tws = _shard(sw, start, size), _shard(sb, start, size), _shard(tw, start, size)
        kw = dict(kind=kind, temperature=0.7, targets=y, **params)

        def par(s_hidden, t_hidden):
            return opd.linear_divergence(s_hidden, sws, t_hidden, tws, student_bias=sbs, **kw)

        out = par(sh, th)
        ref = reference.linear_divergence(sh, sw, th, tw, student_bias=sb, **kw)
        case = f"float64 linear_divergence {_case_name(kind, params)}"
        errs(case, out, ref, atol=1e-10)
        coef = torch.randn(lead, dtype=torch.float64)
        g = _grads((coef * out).sum(), [sh, sws, sbs, th, tws])
        gf = _grads((coef * ref).sum(), [sh, sw, sb, th, tw])
        _compare_grads(errs, case, g, gf, [None, sl, sl, None, sl], atol=1e-10)
        assert torch.autograd.gradcheck(par, (sh, th), fast_mode=True), case


def _check_divergence_chunks(rank, world, errs):
    """The second sweep over several row chunks (the chunk budget shrunk to its 16-row floor; 35 rows that are
    not ignored: 3 chunks in the forward and 3 in the backward) equals the single-process op."""
    from onepass._ops import vocab_stats

    torch.manual_seed(8)
    v, d, lead = 37, 16, (4, 9)
    start, size = _split(v, rank, world)
    sh, sw, th, tw = _leaf(*lead, d), _leaf(v, d, scale=0.5), torch.randn(*lead, d), torch.randn(v, d) * 0.5
    y = _targets(lead, v)
    sws = _shard(sw, start, size)
    calls = []
    phi_sum = opd._phi_sum
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setitem(vocab_stats.CHUNK_BYTES, "cpu", 1)
        mp_.setattr(opd, "_phi_sum", lambda za, *a: calls.append(za.shape[0]) or phi_sum(za, *a))
        out = opd.linear_divergence(sh, sws, th, tw[start:start + size], kind="jsd", beta=0.6, targets=y)
        g = _grads(out.sum(), [sh, sws])
    assert calls == [16, 16, 3] * 2, calls
    ref = onepass.linear_divergence(sh, sw, th, tw, kind="jsd", beta=0.6, targets=y)
    errs("linear_divergence jsd beta=0.6, 3 row chunks", out, ref)
    _compare_grads(errs, "linear_divergence jsd beta=0.6, 3 row chunks", g, _grads(ref.sum(), [sh, sw]),
                   [None, (start, size)])


def _loss_inputs(seed, v, rank, world, d=16):
    torch.manual_seed(seed)
    b, t = 3, 5
    h, w, bias = _leaf(b, t, d), _leaf(v, d, scale=0.5), _leaf(v)
    start, size = _split(v, rank, world)
    y = _targets((b, t), v, ignore=False)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    mask[2, 0] = 0
    return h, w, bias, y, mask, start, size


def _compare_loss(errs, case, out, ref, dist_inputs, full_inputs, slices, scaled=False):
    (loss, metrics), (loss_ref, metrics_ref) = out, ref
    errs(f"{case} loss", loss, loss_ref, scaled=scaled)
    assert metrics.keys() == metrics_ref.keys(), f"{case}: metrics {sorted(metrics)} != {sorted(metrics_ref)}"
    for k in metrics:
        errs(f"{case} metrics", metrics[k], metrics_ref[k], scaled=scaled)
    _compare_grads(errs, case, _grads(loss, dist_inputs), _grads(loss_ref, full_inputs), slices, scaled)


def _check_grpo(rank, world, errs):
    v = 37
    h, w, bias, y, mask, start, size = _loss_inputs(3, v, rank, world)
    rh, rw = torch.randn(3, 5, 12), torch.randn(v, 12) * 0.5
    ws, bs = _shard(w, start, size), _shard(bias, start, size)
    sl = (start, size)
    adv, old = torch.randn(3), torch.randn(3, 5) * 0.3 - 2.0
    kw = dict(mask=mask, old_logp=old, beta=0.1, kl_estimator="full", entropy_coef=0.01, temperature=0.9,
              logit_softcap=2.5, logit_scale=1.1, ref_logit_softcap=4.0)
    out = opd.grpo_loss(h, ws, y, adv, bias=bs, ref_hidden=rh, ref_weight=rw[start:start + size], **kw)
    ref = onepass.grpo_loss(h, w, y, adv, bias=bias, ref_hidden=rh, ref_weight=rw, **kw)
    _compare_loss(errs, "grpo_loss ref head, kl full", out, ref, [h, ws, bs], [h, w, bias], [None, sl, sl])
    for i, (kind, params) in enumerate(SWEEP2_KINDS):  # the full penalty of every other divergence
        start_i, size_i, vocab_start = _layout(v, rank, world, swapped=i % 2 == 0)
        ws_i, bs_i = _shard(w, start_i, size_i), _shard(bias, start_i, size_i)
        div_kw = dict(ref_divergence=kind, **{f"ref_divergence_{k}": x for k, x in params.items()})
        out = opd.grpo_loss(h, ws_i, y, adv, bias=bs_i, ref_hidden=rh, ref_weight=rw[start_i:start_i + size_i],
                            vocab_start=vocab_start, **kw, **div_kw)
        ref = onepass.grpo_loss(h, w, y, adv, bias=bias, ref_hidden=rh, ref_weight=rw, **kw, **div_kw)
        _compare_loss(errs, f"grpo_loss kl full {_case_name(kind, params)}", out, ref, [h, ws_i, bs_i],
                      [h, w, bias], [None, (start_i, size_i), (start_i, size_i)], scaled=kind == "chi2")
    adv_tok, ref_lp = torch.randn(3, 5), torch.randn(3, 5) * 0.3 - 2.0
    kw = dict(mask=mask, ref_logp=ref_lp, beta=0.05, kl_estimator="k3", loss_agg="seq-mean-token-mean",
              dual_clip=3.0)
    out = opd.grpo_loss(h, ws, y, adv_tok, **kw)
    ref = onepass.grpo_loss(h, w, y, adv_tok, **kw)
    _compare_loss(errs, "grpo_loss ref_logp, k3", out, ref, [h, ws], [h, w], [None, sl])


def _check_opd(rank, world, errs):
    v = 37
    h, w, bias, y, mask, start, size = _loss_inputs(4, v, rank, world)
    th, tw = torch.randn(3, 5, 12), torch.randn(v, 12) * 0.5
    ws, bs, tws = _shard(w, start, size), _shard(bias, start, size), tw[start:start + size]
    sl = (start, size)
    cases = [dict(divergence="reverse_kl"),
             dict(divergence="forward_kl", temperature=0.8, loss_agg="seq-mean-token-sum", teacher_logit_softcap=2.0),
             dict(divergence="sampled_reverse_kl", reward_scale=1.5, ref_logp=torch.randn(3, 5) - 2.0)]
    for kw in cases:
        out = opd.opd_loss(h, ws, th, tws, y, mask=mask, student_bias=bs, **kw)
        ref = onepass.opd_loss(h, w, th, tw, y, mask=mask, student_bias=bias, **kw)
        _compare_loss(errs, f"opd_loss {kw['divergence']}", out, ref, [h, ws, bs], [h, w, bias], [None, sl, sl])
    for i, (kind, params) in enumerate(SWEEP2_KINDS):
        start_i, size_i, vocab_start = _layout(v, rank, world, swapped=i % 2 == 1)
        ws_i, bs_i = _shard(w, start_i, size_i), _shard(bias, start_i, size_i)
        kw = dict(divergence=kind, temperature=0.8 if i % 2 else 1.0, **params)
        out = opd.opd_loss(h, ws_i, th, tw[start_i:start_i + size_i], y, mask=mask, student_bias=bs_i,
                           vocab_start=vocab_start, **kw)
        ref = onepass.opd_loss(h, w, th, tw, y, mask=mask, student_bias=bias, **kw)
        _compare_loss(errs, f"opd_loss {_case_name(kind, params)}", out, ref, [h, ws_i, bs_i], [h, w, bias],
                      [None, (start_i, size_i), (start_i, size_i)], scaled=kind == "chi2")


def _check_bad_input(rank, world, errs):
    h, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="do not tile"):
        opd.linear_token_logprobs(h, w, torch.zeros(4, dtype=torch.int64), vocab_start=0)
    for bad in (10, -5):
        with pytest.raises(ValueError, match=rf"value {bad} .* outside \[0, 10\)"):
            opd.linear_token_logprobs(h, w, torch.full((4,), bad))
    with pytest.raises(ValueError, match="vocab_start must be given on every rank"):
        opd.linear_token_logprobs(h, w, torch.zeros(4, dtype=torch.int64), vocab_start=5 if rank == 1 else None)
    with pytest.raises(ValueError, match="temperature"):
        opd.linear_token_logprobs(h, w, torch.zeros(4, dtype=torch.int64), temperature=0.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        opd.linear_divergence(h, w, h, w, kind="kl")
    with pytest.raises(ValueError, match="beta must be in"):
        opd.linear_divergence(h, w, h, w, kind="jsd", beta=1.5)
    y, mask = torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4)
    with pytest.raises(ValueError, match="needs kl_estimator='full'"):
        opd.grpo_loss(h[None], w, y, torch.zeros(1), mask=mask, ref_hidden=h[None], ref_weight=w, ref_divergence="tv")


class _TinyPolicy(torch.nn.Module):
    """Embedding -> tanh(Linear) -> a fused loss on the LM head (``HeadLoss``)."""

    def __init__(self, vocab, dim, loss_fn, bias_keyword):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.loss = opd.HeadLoss(torch.nn.Linear(dim, vocab), loss_fn, bias_keyword)

    def forward(self, ids, *args, **kwargs):
        return self.loss(torch.tanh(self.body(self.embed(ids))), *args, **kwargs)


def _check_fsdp2(rank, world, errs):
    """FSDP2 with HeadLoss: the 2 ranks each take half of the sequences; loss "seq-mean-token-mean" over
    equal halves, so the rank-mean loss and FSDP2's rank-averaged gradients equal the 1-process ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    v, d, b, t = 23, 8, 4, 6
    torch.manual_seed(5)
    ids, targets = torch.randint(0, v, (b, t)), torch.randint(0, v, (b, t))
    mask = (torch.rand(b, t) > 0.3).float()
    mask[:, 0] = 1
    teacher_h, teacher_w = torch.randn(b, t, 5), torch.randn(v, 5)
    adv = torch.randn(b)
    cases = {
        "grpo_loss": (onepass.grpo_loss, "bias", lambda rows: (targets[rows], adv[rows]),
                      dict(entropy_coef=0.01, temperature=0.9)),
        "opd_loss": (onepass.opd_loss, "student_bias", lambda rows: (teacher_h[rows], teacher_w, targets[rows]),
                     dict(divergence="forward_kl")),
    }
    mine = slice(rank * b // world, (rank + 1) * b // world)
    for name, (loss_fn, bias_kw, args, kw) in cases.items():
        torch.manual_seed(6)
        model = _TinyPolicy(v, d, loss_fn, bias_kw)
        full = _TinyPolicy(v, d, loss_fn, bias_kw)
        full.load_state_dict(model.state_dict())
        loss_ref, _ = full(ids, *args(slice(None)), mask=mask, loss_agg="seq-mean-token-mean", **kw)
        loss_ref.backward()
        fully_shard(model.loss, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert model.loss.head.weight.to_local().shape[0] < v, "the head weight must be sharded"
        loss, _ = model(ids[mine], *args(mine), mask=mask[mine], loss_agg="seq-mean-token-mean", **kw)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        errs(f"FSDP2 HeadLoss {name} loss (rank mean)", mean_loss / world, loss_ref)
        ref_grads = dict(full.named_parameters())
        for pname, p in model.named_parameters():
            assert ref_grads[pname].grad.abs().max() > 100 * ATOL, f"{pname}: gradient too small to test"
            errs(f"FSDP2 HeadLoss {name} grads", p.grad.full_tensor(), ref_grads[pname].grad)


class _CountCollectives:
    """Records (collective, op, shape) of every all_reduce / all_gather while active."""

    def __init__(self, monkeypatch):
        self.calls, self.mp = [], monkeypatch

    def __enter__(self):
        real_reduce, real_gather = dist.all_reduce, dist.all_gather

        def all_reduce(t, op=dist.ReduceOp.SUM, **kw):
            self.calls.append(("all_reduce", str(op).rsplit(".", 1)[-1], tuple(t.shape), t.dtype))
            return real_reduce(t, op=op, **kw)

        def all_gather(out, t, **kw):
            self.calls.append(("all_gather", None, tuple(t.shape), t.dtype))
            return real_gather(out, t, **kw)

        self.mp.setattr(dist, "all_reduce", all_reduce)
        self.mp.setattr(dist, "all_gather", all_gather)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def _check_communication(rank, world, errs):
    """The per-row traffic stated in the module docstring: linear_policy_ref_stats forward = one MAX of
    [N, 2] + one SUM of [N, 6] fp32 (+ the 2-int64 shard gather); backward = one SUM of dH [N, D]."""
    n, d, v = 6, 16, 9
    start, size = _split(v, rank, world)
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(size, d, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp_, _CountCollectives(mp_) as fwd:
        out = opd.linear_policy_ref_stats(h, w, torch.randn(n, 4), torch.randn(size, 4),
                                          torch.randint(0, v, (n,)))
    assert fwd.calls == [("all_gather", None, (2,), torch.int64),
                         ("all_reduce", "MAX", (n, 2), torch.float32),
                         ("all_reduce", "SUM", (n, 6), torch.float32)], fwd.calls
    with pytest.MonkeyPatch.context() as mp_, _CountCollectives(mp_) as bwd:
        sum(x.sum() for x in out.values()).backward()
    assert bwd.calls == [("all_reduce", "SUM", (n, d), torch.float32)], bwd.calls
    # A second-sweep kind, both models needing gradients: forward MAX [N, 2], SUM [N, 2] (the masses), SUM
    # [N, 3] (D, S_a, S_b over the rows not ignored); backward one dH all-reduce per model.
    dt = 4
    th, tw = torch.randn(n, dt, requires_grad=True), torch.randn(size, dt, requires_grad=True)
    y = torch.randint(0, v, (n,))
    y[0] = -100
    with pytest.MonkeyPatch.context() as mp_, _CountCollectives(mp_) as fwd:
        div = opd.linear_divergence(h, w, th, tw, kind="hellinger", targets=y)
    assert fwd.calls == [("all_gather", None, (2,), torch.int64),
                         ("all_reduce", "MAX", (n, 2), torch.float32),
                         ("all_reduce", "SUM", (n, 2), torch.float32),
                         ("all_reduce", "SUM", (n - 1, 3), torch.float32)], fwd.calls
    with pytest.MonkeyPatch.context() as mp_, _CountCollectives(mp_) as bwd:
        div.sum().backward()
    assert sorted(bwd.calls) == [("all_reduce", "SUM", (n, dt), torch.float32),
                                 ("all_reduce", "SUM", (n, d), torch.float32)], bwd.calls
    # opd_loss, a second-sweep kind (teacher without gradient): SUM [N, 4] (masses, target logits), then
    # SUM [N', 2] (D, S_a) over the N' = 5 rows the mask keeps; backward the student's dH only.
    mask = torch.ones(2, 3)
    mask[1, 2] = 0
    with pytest.MonkeyPatch.context() as mp_, _CountCollectives(mp_) as fwd:
        loss, _ = opd.opd_loss(h.view(2, 3, d), w, th.view(2, 3, dt), tw, y.clamp_min(0).view(2, 3), mask=mask,
                               divergence="alpha", alpha=2.0)
    assert fwd.calls == [("all_gather", None, (2,), torch.int64),
                         ("all_reduce", "MAX", (n, 2), torch.float32),
                         ("all_reduce", "SUM", (n, 4), torch.float32),
                         ("all_reduce", "SUM", (n - 1, 2), torch.float32)], fwd.calls
    with pytest.MonkeyPatch.context() as mp_, _CountCollectives(mp_) as bwd:
        loss.backward()
    assert bwd.calls == [("all_reduce", "SUM", (n, d), torch.float32)], bwd.calls


def check_ops(rank, world, out_dir):
    errs = _Errors()
    for check in (_check_token_logprobs, _check_bf16, _check_policy_ref, _check_divergence, _check_divergence_float64,
                  _check_divergence_chunks, _check_grpo, _check_opd, _check_bad_input, _check_communication,
                  _check_fsdp2):
        check(rank, world, errs)
    if rank == 0:
        (out_dir / "errors.json").write_text(json.dumps(errs.table, indent=1))


def fail_mid_step(rank, world, out_dir):
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8)
    if rank == 1:
        raise RuntimeError("rank 1 failed mid-step")
    logp = opd.linear_token_logprobs(h, w, torch.zeros(4, dtype=torch.int64))  # blocks in a collective
    logp.sum().backward()


CHECKS = {"check_ops": check_ops, "fail_mid_step": fail_mid_step}


# ------------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------------
def test_vocab_parallel_ops_match_single_process(tmp_path):
    _spawn("check_ops", tmp_path)
    table = json.loads((tmp_path / "errors.json").read_text())
    assert len(table) >= 40, f"only {len(table)} cases recorded"
    worst = max(table.items(), key=lambda kv: kv[1][0])
    print(f"\n{len(table)} cases; worst abs error {worst[1][0]:.2e} ({worst[0]})")


def test_rank_failure_ends_the_job(tmp_path):
    """Rank 1 raises while rank 0 waits in the op's collective: the job ends with an exception (rank 0's
    collective fails on the lost peer or rank 0 is terminated), no hang, and the first error is rank 1's."""
    t0 = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException):
        _spawn("fail_mid_step", tmp_path)
    assert time.monotonic() - t0 < SPAWN_TIMEOUT_S
    errors = sorted((float(when), what) for when, what in (f.read_text().split("\n", 1)
                                                            for f in tmp_path.glob("rank*.error")))
    assert errors and "rank 1 failed mid-step" in errors[0][1], errors


def test_needs_initialized_process_group():
    h, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        opd.linear_token_logprobs(h, w, torch.zeros(2, dtype=torch.int64))
