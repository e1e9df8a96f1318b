"""The split-vocabulary forward of the Triton fused-linear vocab stats (``linear_vocab_stats_fwd`` with
``num_splits`` S > 1: partial accumulators per (row block, vocab split), merged in split order) against
the float64 reference, under the Triton interpreter on CPU (fp32: bf16 is broken in the interpreter)
or on a GPU.

The interpreter's vocab tile is 128 columns, so V = 300 has 3 tiles: S = 2 splits them 2 + 1 (the last
ragged), S = 3 one each.  The bias puts -inf on every column of the second tile (a split with no finite
logit) and on a few more.  Tolerances: stats vs float64 as the other Triton tests (rtol 2e-5, atol
2e-5 · max(1, max |ref|)); S > 1 vs S = 1 (the same fp32 math summed in another order) rtol 1e-5,
atol 1e-5 · max(1, max |stat|).
"""
from __future__ import annotations

import os

import pytest
import torch

from _vocab_stats_ref import assert_close, ref_quantities

from onepass._contract import Kind, LogitMap, Stat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or the Triton interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, D, V = 21, 23, 300  # 2 row blocks of 16 in the interpreter (the last ragged)
N_GROUPS = 37  # 3 row blocks: groups of 2 row blocks, the last ragged
TOL, SPLIT_TOL = 2e-5, 1e-5
SPLITS = (1, 2, 3)
REF_COLS = [Stat.LSE_A, Stat.LSE_B, Stat.LOGP_A, Stat.LOGP_B, Stat.ENTROPY, Stat.DIV]  # ref_quantities' order
BETA, ALPHA = 0.3, 1.6
#: The policy soft-capped, except with the -inf bias: a capped -inf is the finite -cap·inv_temp for the
#: kernels but an impossible token for the reference.
LOGIT_MAPS = {False: LogitMap(0.8, 3.0, 1.2, 0.0), True: LogitMap(0.8, 0.0, 1.2, 0.0)}


def _vs():
    from onepass.triton_kernels import vocab_stats
    return vocab_stats


def _model(g, bias: bool, n: int):
    h = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 1.5 / D ** 0.5
    b = None
    if bias:
        b = torch.randn(V, generator=g, dtype=torch.float64)
        b[128:256] = float("-inf")
        b[[7, 299]] = float("-inf")
    return h, w, b


def _inputs(seed: int, pair: bool, bias: bool, n: int = N):
    g = torch.Generator().manual_seed(seed)
    ha, wa, ba = _model(g, bias, n)
    hb, wb, bb = _model(g, bias, n) if pair else (None, None, None)
    if bias and pair:
        bb[torch.isinf(ba)] = float("-inf")  # the same impossible tokens in both models
    targets = torch.randint(0, V, (n,), generator=g)
    finite = torch.nonzero(torch.isfinite(ba)).flatten() if bias else torch.arange(V)
    targets = finite[targets % len(finite)]
    targets[[1, 20]] = -1  # ignored rows
    targets[[2, 3, 4]] = torch.tensor([127, 256, 299 if not bias else 298])  # around the split boundaries
    return (ha, wa, ba, hb, wb, bb), targets


def _map(models) -> LogitMap:
    return LOGIT_MAPS[models[2] is not None]


def _run(models, targets, kind, need_entropy, num_splits):
    dev = lambda x: x.to(DEV, torch.float32) if x is not None and x.is_floating_point() else (  # noqa: E731
        x.to(DEV) if x is not None else None)
    return _vs().linear_vocab_stats_fwd(*map(dev, models), dev(targets), _map(models), kind, BETA, ALPHA,
                                        need_entropy, num_splits=num_splits).cpu().double()


def _reference(models, targets, kind):
    ha, wa, ba, hb, wb, bb = models
    za = ha @ wa.T + (ba if ba is not None else 0.0)
    zb = hb @ wb.T + (bb if bb is not None else 0.0) if hb is not None else None
    qs = ref_quantities(za, zb, targets, _map(models), kind, BETA, ALPHA)
    return torch.stack(qs, -1) * (targets >= 0).double()[:, None]


def _cases():
    out = []
    for pair, kind in [(False, Kind.NONE)] + [(True, k) for k in Kind]:
        for bias in (False, True):
            for need_entropy in (False, True):
                out.append(pytest.param(pair, kind, bias, need_entropy,
                                        id=f"{'pair' if pair else 'single'}-{kind.name.lower()}"
                                           f"{'-bias' if bias else ''}{'-entropy' if need_entropy else ''}"))
    return out


@pytest.mark.parametrize("pair,kind,bias,need_entropy", _cases())
def test_split_forward_matches_float64(pair, kind, bias, need_entropy):
    models, targets = _inputs(10 * int(kind) + 2 * bias + need_entropy, pair, bias)
    ref = _reference(models, targets, kind)
    if not need_entropy:
        ref[:, REF_COLS.index(Stat.ENTROPY)] = 0.0
    runs = {s: _run(models, targets, kind, need_entropy, s) for s in SPLITS}
    for s, stats in runs.items():
        assert_close(stats[:, REF_COLS], ref, TOL, f"S={s} stats vs float64")
        assert torch.all(stats[targets < 0] == 0), f"S={s}: ignored rows must be all 0"
        if kind == Kind.REVERSE_KL:
            assert torch.equal(stats[:, Stat.SUM_A], stats[:, Stat.DIV]) and torch.all(stats[:, Stat.SUM_B] == 0)
        if kind == Kind.FORWARD_KL:
            assert torch.equal(stats[:, Stat.SUM_B], stats[:, Stat.DIV]) and torch.all(stats[:, Stat.SUM_A] == 0)
        if kind == Kind.NONE:
            assert torch.all(stats[:, Stat.DIV:] == 0)
        # S_a, S_b of the second-sweep kinds have no float64 statement here: S = 1 is checked through
        # the gradients by tests/test_linear_backward_triton.py; every S must agree with it
        assert_close(stats, runs[1], SPLIT_TOL, f"S={s} vs S=1")


def test_group_order_covers_every_program(monkeypatch):
    """Row-block groups of 2 over 3 row blocks (the last group ragged): every (row block, split) once."""
    monkeypatch.setattr(_vs(), "SPLIT_GROUP_ROWS", 2)
    for kind in (Kind.FORWARD_KL, Kind.JSD):
        models, targets = _inputs(77 + kind, True, True, N_GROUPS)
        ref = _reference(models, targets, kind)
        for s in (2, 3):
            assert_close(_run(models, targets, kind, True, s)[:, REF_COLS], ref, TOL, f"{kind.name} S={s}")


def test_nan_and_out_of_range_target_like_one_split():
    """A NaN hidden row and a target >= V (unchecked under torch.compile) give what S = 1 gives: NaN
    stats for the NaN row, a NaN log-prob for the bad target, never a wrong finite number."""
    for kind in (Kind.REVERSE_KL, Kind.TV):
        models, targets = _inputs(5, True, True)
        models[0][6] = float("nan")
        targets[9] = V
        runs = [_run(models, targets, kind, True, s) for s in SPLITS]
        assert torch.isnan(runs[0][9, Stat.LOGP_A]) and torch.isnan(runs[0][9, Stat.LOGP_B])
        assert torch.isnan(runs[0][6, [Stat.LSE_A, Stat.LOGP_A, Stat.ENTROPY, Stat.DIV]]).all()
        for s, stats in zip(SPLITS[1:], runs[1:]):
            assert torch.equal(torch.isnan(stats), torch.isnan(runs[0])), f"{kind.name} S={s}: NaN pattern"
            assert_close(stats, runs[0], SPLIT_TOL, f"{kind.name} S={s} vs S=1")


def test_split_count_is_clamped_to_vocab_tiles():
    """More splits than vocab tiles (3 here) is the same as one split per tile."""
    models, targets = _inputs(3, False, False)
    assert torch.equal(_run(models, targets, Kind.NONE, True, 3), _run(models, targets, Kind.NONE, True, 50))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_num_splits(bad):
    models, targets = _inputs(0, False, False)
    with pytest.raises(ValueError, match="num_splits"):
        _run(models, targets, Kind.NONE, True, bad)


def test_choose_num_splits(monkeypatch):
    vs = _vs()
    monkeypatch.setattr(vs, "_blocks_linear", lambda d, kind: (64, 128, 64))  # the GPU tiles
    h200, head_v, head_d = 132, 151936, 4096
    assert vs.choose_num_splits(2048, head_v, head_d, 0, None) == 1  # no SM count: interpreter, meta tensors
    assert vs.choose_num_splits(2048, head_v, head_d, 0, h200) == 9  # 32 row blocks x 9 = 288 programs
    assert vs.choose_num_splits(64 * 132, head_v, head_d, 0, h200) == 1  # the rows give every SM a program
    assert vs.choose_num_splits(16384, head_v, head_d, 0, h200) == 1  # the headline shape: unchanged
    assert vs.choose_num_splits(64, 128 * 20, head_d, 0, h200) == 2  # each split >= MIN_TILES_PER_SPLIT tiles
    assert vs.choose_num_splits(64, 128 * 15, head_d, 0, h200) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pair,kind", [(False, Kind.NONE), (True, Kind.REVERSE_KL), (True, Kind.JSD)])
def test_split_chosen_on_gpu_bf16(pair, kind):
    """bf16 on the GPU with the split the launcher chooses (S > 1: few rows, 4000 columns) vs float64
    (tolerance 1e-3 as the other bf16 stats tests) and vs S = 1 (1e-5)."""
    vs = _vs()
    n, d, v = 300, 64, 4000
    assert vs.choose_num_splits(n, v, d, kind, torch.cuda.get_device_properties(0).multi_processor_count) > 1
    g = torch.Generator().manual_seed(31)
    ha, wa, hb, wb = (torch.randn(*shape, generator=g, dtype=torch.float64).bfloat16().double()
                      for shape in ((n, d), (v, d), (n, d), (v, d)))
    wa, wb = wa / d ** 0.5, wb / d ** 0.5
    if not pair:
        hb = wb = None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[0, 7]] = -1
    on = lambda x: x.to("cuda", torch.bfloat16) if x is not None else None  # noqa: E731
    lm = LogitMap(1.0, 0.0, 1.0, 0.0)
    args = (on(ha), on(wa), None, on(hb), on(wb), None, targets.cuda(), lm, kind, BETA, ALPHA, True)
    auto = vs.linear_vocab_stats_fwd(*args).cpu().double()
    one = vs.linear_vocab_stats_fwd(*args, num_splits=1).cpu().double()
    za = ha @ wa.T
    zb = hb @ wb.T if pair else None
    ref = torch.stack(ref_quantities(za, zb, targets, lm, kind, BETA, ALPHA), -1) * (targets >= 0).double()[:, None]
    assert_close(auto[:, REF_COLS], ref, 1e-3, "auto split vs float64")
    assert_close(auto, one, SPLIT_TOL, "auto split vs S=1")
