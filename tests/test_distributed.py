"""Vocabulary-parallel ops (onepass.distributed) on 2 gloo processes against the single-process ops.

Every check runs inside ONE spawn of 2 ranks (spawning costs seconds): each rank holds its shard of the
LM head(s), computes the vocab-parallel op and a loss with random coefficients, and compares values and
gradients (hidden, its weight shard, its bias shard) with the single-process op on the full head, in fp32:
|x − ref| ≤ ATOL + RTOL·|ref|.  Rank 0 writes the max abs errors (and / max |reference|) per case to a JSON file.
"""
from __future__ import annotations

import json
import os
import socket
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

WORLD = 2
ATOL, RTOL = 2e-5, 2e-5
SPAWN_TIMEOUT_S = 150.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, check, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        CHECKS[check](rank, world, Path(out_dir))
    except BaseException as exc:  # which rank failed first: its error is the job's root cause
        (Path(out_dir) / f"rank{rank}.error").write_text(f"{time.time()!r}\n{exc!r}")
        raise
    finally:
        dist.destroy_process_group()


def _spawn(check: str, out_dir: Path) -> None:
    """Run CHECKS[check] on WORLD gloo ranks; a rank's exception is re-raised here; no hang past the timeout."""
    ctx = mp.start_processes(_entry, args=(WORLD, _free_port(), check, str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{check}: the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")


# ------------------------------------------------------------------------------------------------
# Checks run on every rank.
# ------------------------------------------------------------------------------------------------
class _Errors:
    """Compares and records per case the max abs error and the max abs error / max |reference|."""

    def __init__(self):
        self.table = {}

    def __call__(self, case, got, ref, atol=ATOL):
        got, ref = got.detach().double(), ref.detach().double()
        assert got.shape == ref.shape, f"{case}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        err = (got - ref).abs()
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


def _compare_grads(errs, case, dist_grads, full_grads, shard_slices):
    """full_grads sliced to this rank's rows where shard_slices says so (None: compare whole)."""
    for i, (g, gf, sl) in enumerate(zip(dist_grads, full_grads, shard_slices)):
        errs(f"{case} grad[{i}]", g, gf if sl is None else gf[sl[0]:sl[0] + sl[1]])


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
    (≤ 2 × the single-process bf16 op's error + floor), values and gradients."""
    torch.manual_seed(7)
    v, d, lead = 37, 32, (4, 6)
    start, size = _split(v, rank, world)
    h64, w64 = torch.randn(*lead, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64) * 0.3
    y, coef = _targets(lead, v), torch.randn(lead)

    def run(op, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = op(h, w, y, temperature=0.9, return_entropy=True)
        gh, gw = _grads((coef * lp).sum() + (coef * ent).sum(), [h, w])
        return lp, ent, gh, gw

    truth = run(onepass.linear_token_logprobs, h64, w64)
    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731
    single = run(onepass.linear_token_logprobs, bf(h64), bf(w64))
    par = run(opd.linear_token_logprobs, bf(h64), bf(w64[start:start + size]))
    shard = lambda i, x: x[start:start + size] if i == 3 else x  # noqa: E731
    for i, name in enumerate(("logp", "entropy", "grad hidden", "grad weight")):
        assert_tolerance(par[i], shard(i, truth[i]), shard(i, single[i]), torch.bfloat16, f"bf16 {name}")
        # recorded only (the bound is the rule above): bf16 gradients may differ by an ulp
        errs(f"bf16 linear_token_logprobs {name} (vs single-process bf16)", par[i].float(),
             shard(i, single[i]).float(), atol=float("inf"))


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


def _check_divergence(rank, world, errs):
    torch.manual_seed(2)
    v, ds, dt, lead = 37, 16, 12, (2, 7)
    start, size = _split(v, rank, world)
    for kind in ("reverse_kl", "forward_kl"):
        sh, sw, sb = _leaf(*lead, ds), _leaf(v, ds, scale=0.5), _leaf(v)
        th, tw = _leaf(*lead, dt), _leaf(v, dt, scale=0.5)
        y = _targets(lead, v)
        sws, sbs, tws = _shard(sw, start, size), _shard(sb, start, size), _shard(tw, start, size)
        out = opd.linear_divergence(sh, sws, th, tws, student_bias=sbs, kind=kind, temperature=1.3, targets=y)
        ref = onepass.linear_divergence(sh, sw, th, tw, student_bias=sb, kind=kind, temperature=1.3, targets=y)
        errs(f"linear_divergence {kind}", out, ref)
        coef = torch.randn(lead)
        g = _grads((coef * out).sum(), [sh, sws, sbs, th, tws])
        gf = _grads((coef * ref).sum(), [sh, sw, sb, th, tw])
        sl = (start, size)
        _compare_grads(errs, f"linear_divergence {kind}", g, gf, [None, sl, sl, None, sl])
    with pytest.raises(ValueError, match="second vocabulary sweep"):
        opd.linear_divergence(sh, sws, th, tws, kind="jsd", beta=0.5)


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


def _compare_loss(errs, case, out, ref, dist_inputs, full_inputs, slices):
    (loss, metrics), (loss_ref, metrics_ref) = out, ref
    errs(f"{case} loss", loss, loss_ref)
    assert metrics.keys() == metrics_ref.keys(), f"{case}: metrics {sorted(metrics)} != {sorted(metrics_ref)}"
    for k in metrics:
        errs(f"{case} metrics", metrics[k], metrics_ref[k])
    _compare_grads(errs, case, _grads(loss, dist_inputs), _grads(loss_ref, full_inputs), slices)


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


def check_ops(rank, world, out_dir):
    errs = _Errors()
    for check in (_check_token_logprobs, _check_bf16, _check_policy_ref, _check_divergence, _check_grpo, _check_opd,
                  _check_bad_input, _check_communication, _check_fsdp2):
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
