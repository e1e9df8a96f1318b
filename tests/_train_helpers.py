"""Shared pieces of the trainer tests: the tiny model directory and a small config."""
from __future__ import annotations

from onepass.train import load_config

SMALL = ["data.task=arith", "data.task_size=32", "rollout.num_generations=4", "rollout.max_new_tokens=2",
         "train.prompts_per_step=2", "train.max_steps=2", "train.save_steps=1", "optim.lr=1e-2",
         "logging.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def small_config(model_dir, output_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={output_dir}", *SMALL, *overrides])


def loss_and_grads(trainer, batch, metric):
    """(loss, the metric ``metric``, parameter gradients) of the trainer's algorithm loss on ``batch``."""
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = trainer.algorithm.loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), float(metrics[metric]), grads


def assert_same_loss(fused, naive):
    """Two ``loss_and_grads`` results agree: loss and metric to 1e-5 relative, gradients to 1e-4 of their max."""
    (lf, mf, gf), (ln, mn, gn) = fused, naive
    assert abs(mn) > 1e-4, "the metric must be nonzero for the comparison to mean something"
    assert abs(lf - ln) <= 1e-5 * max(1.0, abs(ln)), (lf, ln)
    assert abs(mf - mn) <= 1e-5 * max(1.0, abs(mn)), (mf, mn)
    assert gf.keys() == gn.keys() and len(gf) > 0
    for name in gn:
        scale = gn[name].abs().max().item()
        assert (gf[name] - gn[name]).abs().max().item() <= 1e-4 * max(scale, 1e-6), name


def assert_fused_equals_naive(trainer, batch, metric):
    """The algorithm's loss with ``loss.impl: fused`` and ``naive`` agree (``assert_same_loss``)."""
    results = {}
    for impl in ("fused", "naive"):
        trainer.cfg.loss.impl = impl
        results[impl] = loss_and_grads(trainer, batch, metric)
    assert_same_loss(results["fused"], results["naive"])


def perturbed_rollout(trainer):
    """Move the policy away from its initial weights (reference) by N(0, 0.05²) noise, then roll out and
    prepare one batch."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = trainer._rollout()
    trainer.algorithm.prepare(trainer.model, batch)
    return batch


def assert_same_run(full_dir, split_dir, steps):
    """Two run directories hold the same metrics rows (timings aside) for ``steps`` and final weights, within
    1e-6 (an uninterrupted run vs an interrupted and resumed one)."""
    import json
    from pathlib import Path

    import pytest
    import torch
    from safetensors.torch import load_file

    rows = [[json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
            for d in (full_dir, split_dir)]
    assert [m["step"] for m in rows[1]] == list(steps)
    for a, b in zip(*rows):
        for k in a.keys() - {"tokens_per_s", "step_time_s"}:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), k
    wa, wb = (load_file(Path(d) / "final" / "model.safetensors") for d in (full_dir, split_dir))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-6)
