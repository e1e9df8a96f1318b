"""The trainer under torchrun (``parallel: ddp | fsdp2``, 2 gloo ranks on CPU) and exact gradient accumulation.

- 2-rank DDP and FSDP2 GRPO runs (2 steps) equal the 1-process run on the same global batch: the sampling
  is seeded per generate call from (seed, step, first prompt index) and every run generates one prompt per
  call (``rollout.prompts_per_generate=1``), so the rollouts are the same; the metrics and the final
  weights agree within RTOL / ATOL below (fp32; the only differences are summation orders).
- A rank that raises mid-step (a reward on rank 1 in step 2) ends the whole job with the error, no hang;
  the 2-rank run resumed from checkpoint-1 (DDP: the atomic safetensors checkpoint; FSDP2:
  ``torch.distributed.checkpoint``) is the run compared with the uninterrupted 1-process run, so one
  comparison covers equality and exact resume (launches are the expensive part: 4 in all).
- The FSDP2 runs are launched through the real CLI: ``python -m torch.distributed.run --standalone
  --nproc-per-node 2 -m onepass.train grpo --config ...``.
- Gradient accumulation: 1 micro-batch and 4 micro-batches of ragged completions give the same gradients
  for token-mean and seq-mean-token-mean (the loss normalizer is the mini-batch's, not the micro-batch's).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from onepass.train import Trainer, load_config, run
from onepass.train.parallel import check_divisible
from onepass.train.rollout import concat
from onepass.train.tiny import build_tiny_model

from _train_helpers import SMALL
from _spawn import first_error, free_port, record_error, spawn_ranks

WORLD = 2
RTOL, ATOL = 1e-5, 1e-6           # 2 ranks vs 1 process (fp32, different summation orders)
SPAWN_TIMEOUT_S = 240.0
REWARD_MODULE = '''
import os
from onepass.train.rewards import exact_match
CALLS = 0
def reward(prompts, completions, **columns):
    """exact_match; raises in the call given by ONEPASS_TEST_CRASH_CALL on rank 1."""
    global CALLS
    CALLS += 1
    if os.environ.get("RANK") == "1" and str(CALLS) == os.environ.get("ONEPASS_TEST_CRASH_CALL"):
        raise RuntimeError("rank 1 crashed mid-step")
    return exact_match(prompts, completions, **columns)
'''
# Ragged completions (max_new_tokens 3), one prompt per generate call, a penalty and an entropy bonus.
# optim.eps=1e-4: with Adam's default 1e-8 an entry whose gradient is ~1e-8 (cancellation) moves by
# lr·g/(|g| + eps), which turns the fp32 rounding of g (summation order) into a 1e-5 weight difference.
COMMON = [*SMALL, "rollout.max_new_tokens=3", "rollout.prompts_per_generate=1", "loss.beta=0.1",
          "loss.entropy_coef=0.01", "optim.eps=1e-4", "rewards=[{function: 'dist_reward:reward'}]"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model directory, a directory holding the reward module, the 1-process run's directory)."""
    root = tmp_path_factory.mktemp("dist")
    model_dir = build_tiny_model(root / "model", max_operand=3, seed=0)
    (root / "dist_reward.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(root))
    run(_config(model_dir, root / "single", "parallel=none"))
    return model_dir, root, root / "single"


def _config(model_dir, out, *overrides):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *COMMON, *overrides])


def _train_rank(rank, world, port, model_dir, out, overrides, resume, crash_call, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), ONEPASS_TEST_CRASH_CALL=str(crash_call))
    sys.path.insert(0, path)
    torch.set_num_threads(1)
    try:
        run(_config(model_dir, out, *overrides), resume=resume)
    except BaseException as exc:  # which rank failed first: its error is the job's root cause
        record_error(out, rank, exc)
        raise


def _spawn_run(model_dir, root, out, overrides, resume=None, crash_call=0) -> None:
    """``run`` on WORLD gloo ranks; a rank's exception is re-raised here; no hang past the timeout."""
    spawn_ranks(_train_rank, (WORLD, free_port(), str(model_dir), str(out), list(overrides), resume, crash_call,
                              str(root)), WORLD, SPAWN_TIMEOUT_S, "training run")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _assert_equals_single_process(single, multi) -> dict:
    """Metrics (timings aside) and final weights within RTOL / ATOL; returns the max abs differences."""
    from safetensors.torch import load_file

    a, b = _metrics(single), _metrics(multi)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    worst = {"metric": 0.0, "weight": 0.0}
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma.keys() - {"tokens_per_s", "step_time_s"}:
            if ma[k] is None:
                assert mb[k] is None, k
                continue
            assert mb[k] == pytest.approx(ma[k], rel=RTOL, abs=ATOL), (ma["step"], k)
            worst["metric"] = max(worst["metric"], abs(ma[k] - mb[k]))
    wa, wb = (load_file(Path(d) / "final" / "model.safetensors") for d in (single, multi))
    assert wa.keys() == wb.keys()
    init = load_file(Path(single).parent / "model" / "model.safetensors")
    for k in wa:
        assert (wa[k] - init[k]).abs().max() > 1e-3, f"{k}: the run must move the weights for the test to mean something"
        torch.testing.assert_close(wb[k], wa[k], rtol=RTOL, atol=ATOL)
        worst["weight"] = max(worst["weight"], (wa[k] - wb[k]).abs().max().item())
    return worst


def test_ddp_rank_failure_then_resume_equals_single_process(setup):
    """Rank 1 raises in step 2: the job ends with its error (no hang); resumed from checkpoint-1 on 2 ranks,
    the run (step 1 before the failure, step 2 after the resume) equals the uninterrupted 1-process run."""
    model_dir, root, single = setup
    out = root / "ddp"
    t0 = time.monotonic()
    ddp = ["parallel=ddp", "train.micro_batch_size=2"]   # 2 micro-batches per rank vs 1 in the 1-process run
    with pytest.raises(mp.ProcessRaisedException):
        _spawn_run(model_dir, root, out, ddp, crash_call=2)
    assert time.monotonic() - t0 < SPAWN_TIMEOUT_S
    assert "dist_reward:reward" in first_error(out) and "rank 1 crashed mid-step" in first_error(out)
    assert (out / "checkpoint-last").resolve() == (out / "checkpoint-1").resolve()
    assert (out / "checkpoint-1" / "model" / "model.safetensors").is_file()
    _spawn_run(model_dir, root, out, ddp, resume=str(out / "checkpoint-last"))
    print("\nDDP 2 ranks (resumed) vs 1 process, max abs diff:", _assert_equals_single_process(single, out))


def _torchrun(root, config, args, crash_call=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONEPASS_TEST_CRASH_CALL": str(crash_call)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                           "-m", "onepass.train", "grpo", "--config", str(config), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)


def test_fsdp2_torchrun_cli_rank_failure_then_dcp_resume_equals_single_process(setup):
    """The CLI under torchrun with parallel: fsdp2: rank 1 raises in step 2, the job exits with its error;
    ``--resume`` from the distributed checkpoint finishes the run, equal to the 1-process run."""
    model_dir, root, single = setup
    out = root / "fsdp2"
    config = root / "fsdp2.yaml"
    config.write_text("parallel: fsdp2\nrewards:\n  - function: dist_reward:reward\n")
    args = [f"model.path={model_dir}", f"output_dir={out}", *[a for a in COMMON if not a.startswith("rewards=")],
            "train.micro_batch_size=3"]   # micro-batches of 3 and 1 sequences per rank
    crashed = _torchrun(root, config, args, crash_call=2)
    assert crashed.returncode != 0
    assert "dist_reward:reward" in crashed.stderr and "rank 1 crashed mid-step" in crashed.stderr, crashed.stderr[-3000:]
    assert (out / "checkpoint-last").resolve() == (out / "checkpoint-1").resolve()
    assert (out / "checkpoint-1" / "dcp").is_dir() and not (out / "checkpoint-1" / "model").exists()
    resumed = _torchrun(root, config, [*args, "--resume", str(out / "checkpoint-last")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("final model:") == 1, resumed.stdout   # rank 0 alone reports
    print("\nFSDP2 2 ranks (resumed) vs 1 process, max abs diff:", _assert_equals_single_process(single, out))


def test_parallel_config_errors(setup, monkeypatch):
    model_dir, root, _ = setup
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="parallel: ddp needs a torchrun launch"):
        Trainer(_config(model_dir, root / "bad", "parallel=ddp"))
    with pytest.raises(ValueError, match="parallel"):
        _config(model_dir, root / "bad", "parallel=tp")
    with pytest.raises(ValueError, match="rollout.prompts_per_generate"):
        _config(model_dir, root / "bad", "rollout.prompts_per_generate=-1")
    with pytest.raises(ValueError, match=r"train.prompts_per_step \(3\) must be divisible by the world size \(2\)"):
        check_divisible(3, 0, 2)
    with pytest.raises(ValueError, match=r"train.mini_batch_size \(6\) must be divisible by the world size \(4\)"):
        check_divisible(8, 6, 4)
    check_divisible(8, 4, 4)


def _gradients(trainer, batch, micro: int) -> dict:
    trainer.micro = micro
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._accumulate(batch, torch.arange(batch.input_ids.shape[0]))
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_is_exact(setup, loss_agg):
    """8 sequences with completion lengths 1..8 (ragged): 1 micro-batch vs 4 micro-batches of 2 give the same
    gradients to 1e-5 of each tensor's max (fp32).  For token-mean, the previous rule (each micro-batch's own
    mean weighted by its share of the sequences) is measurably off; for the seq-mean modes that rule was exact
    whenever every sequence has a token, and the global count keeps it exact when some have none."""
    model_dir, root, _ = setup
    trainer = Trainer(_config(model_dir, root / f"accum-{loss_agg}", "rollout.max_new_tokens=8",
                              f"loss.loss_agg={loss_agg}", "loss.beta=0.0"))
    batch = concat([trainer._rollout()], trainer.tokenizer.pad_token_id, 8)   # room for 8 completion tokens
    lengths = torch.randperm(8, generator=torch.Generator().manual_seed(1)) + 1
    batch.completion_mask = (torch.arange(8)[None] < lengths[:, None]).float()
    trainer.algorithm.prepare(trainer.model, batch)
    batch.extras["advantages"] = torch.randn(8, generator=torch.Generator().manual_seed(2))
    whole, split = _gradients(trainer, batch, 8), _gradients(trainer, batch, 2)
    worst = 0.0
    for name, g in whole.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(split[name], g, rtol=1e-5, atol=1e-5 * scale)
        worst = max(worst, (split[name] - g).abs().max().item() / scale)
    print(f"\n{loss_agg}: 4 vs 1 micro-batches, max |diff| / max |grad| = {worst:.2e}")
    if loss_agg != "token-mean":
        return
    trainer.optimizer.zero_grad(set_to_none=True)
    for idx in torch.arange(8).split(2):
        loss, _ = trainer.policy(batch.select(idx))
        (loss * 0.25).backward()
    off = max(((p.grad - whole[n]).abs().max() / whole[n].abs().max()).item()
              for n, p in trainer.model.named_parameters())
    print(f"token-mean, per-micro-batch means weighted by sequence share: {off:.2e}")
    assert off > 100 * max(worst, 1e-7), (off, worst)
