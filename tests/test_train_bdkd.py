"""BD-KD online mutual distillation (onepass-train bdkd) on the offline tiny models and the arith task: the loss
and BOTH models' gradients equal a float64 logits-based computation; a short run trains both models and lowers
the divergence between them; resume (both models and the shared optimizer) equals the uninterrupted run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onepass.train import ConfigError, Trainer, modeling, run
from onepass.train.algorithms import completion_hidden, masked_targets
from onepass.train.tiny import build_tiny_model, build_tiny_teacher

from _train_helpers import assert_same_run, small_config


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("student") / "model", max_operand=3, seed=0)


@pytest.fixture(scope="module")
def random_teacher_dir(tmp_path_factory):
    """Wider than the student (hidden 96 vs 64), randomly initialized: as confident as the student on some
    tokens and less on others, so that both of BD-KD's weightings occur."""
    return build_tiny_model(tmp_path_factory.mktemp("random_teacher") / "model", max_operand=3, hidden_size=96,
                            seed=1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Wider than the student (hidden 96 vs 64) and briefly SFT'd on the task: far from the random student at
    the start, and still learning during BD-KD."""
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "model", max_operand=3, hidden_size=96,
                              sft_steps=30)


def bdkd_config(student_dir, teacher_dir, out, *overrides):
    return small_config(student_dir, out, "algorithm=bdkd", f"teacher.path={teacher_dir}",
                        "distill.completion_column=answer", "rollout.num_generations=1", "train.prompts_per_step=8",
                        *overrides)


def reference_bdkd_loss(student, teacher, batch, *, T, coef, task_coef, teacher_coef, major, minor):
    """BD-KD's summed loss (student + teacher, token-mean) from float64 logits, written out from the formulas
    in ``onepass.train.algorithms.BDKD``: (loss, mean KL(p‖q), fraction of tokens where H(p) < H(q))."""
    tk = masked_targets(batch)
    mask = tk != -100
    s_logits = (completion_hidden(student, batch) @ modeling.head(student).weight.T).double()[mask]
    t_logits = (completion_hidden(teacher, batch) @ modeling.head(teacher).weight.T).double()[mask]
    y = tk[mask]

    def log_probs(x, temp):
        return torch.log_softmax(x / temp, -1)

    def kl(la, lb):
        return (la.exp() * (la - lb)).sum(-1)

    lp, lq = log_probs(s_logits, T), log_probs(t_logits, T)
    lp_d, lq_d = lp.detach(), lq.detach()
    h_p, h_q = -(lp_d.exp() * lp_d).sum(-1), -(lq_d.exp() * lq_d).sum(-1)
    confident = h_p < h_q
    w_f = torch.where(confident, major, minor).double()
    w_r = torch.where(confident, minor, major).double()
    ce_s = -log_probs(s_logits, 1.0).gather(-1, y[:, None])[:, 0]
    ce_t = -log_probs(t_logits, 1.0).gather(-1, y[:, None])[:, 0]
    student_loss = task_coef * ce_s + coef * (w_f * kl(lq_d, lp) + w_r * kl(lp, lq_d))
    teacher_loss = task_coef * ce_t + teacher_coef * kl(lp_d, lq)
    return (student_loss + teacher_loss).mean(), kl(lp_d, lq_d).mean(), confident.double().mean().item()


def all_grads(*models):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(models) for n, p in m.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_bdkd_loss_and_both_models_gradients_equal_float64_reference(student_dir, random_teacher_dir, tmp_path,
                                                                    impl):
    knobs = dict(T=0.8, coef=0.7, task_coef=0.9, teacher_coef=0.6, major=1.0, minor=0.3)
    cfg = bdkd_config(student_dir, random_teacher_dir, tmp_path, f"loss.impl={impl}", f"distill.temperature={knobs['T']}",
                      f"distill.coef={knobs['coef']}", f"distill.task_coef={knobs['task_coef']}",
                      f"distill.teacher_coef={knobs['teacher_coef']}", f"distill.balance_major={knobs['major']}",
                      f"distill.balance_minor={knobs['minor']}")
    trainer = Trainer(cfg)
    student, teacher = trainer.model, trainer.algorithm.teacher
    assert all(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():   # move the student away from the teacher; both weightings still occur (asserted below)
        g = torch.Generator().manual_seed(5)
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = trainer._rollout()
    trainer.algorithm.prepare(student, batch)

    loss, metrics = trainer.algorithm.loss(student, batch)
    loss.backward()
    got = all_grads(student, teacher)
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    ref, ref_div, confident_frac = reference_bdkd_loss(student, teacher, batch, **knobs)
    ref.backward()
    want = all_grads(student, teacher)

    assert 0 < confident_frac < 1, confident_frac
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    assert float(metrics["divergence"]) == pytest.approx(ref_div.item(), rel=1e-4, abs=1e-6)
    assert float(metrics["forward_weight"]) == pytest.approx(confident_frac * 1.0 + (1 - confident_frac) * 0.3)
    assert got.keys() == want.keys()
    assert any(k.startswith("1.") for k in want) and any(k.startswith("0.") for k in want)   # both models
    for name in want:
        scale = want[name].abs().max().item()
        assert (got[name] - want[name]).abs().max().item() <= 1e-4 * max(scale, 1e-6), name


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_bdkd_trains_both_models_and_lowers_their_divergence(student_dir, teacher_dir, tmp_path):
    """Fixed seed, 10 steps of 16 answers (lr 5e-3, distill.teacher_coef 0.2): the divergence between the models
    falls (mean of steps 8-10 below 0.4x step 1; measured 3.46 -> 0.91), the student's cross-entropy on the
    answers falls (below 0.75x; measured 2.57 -> 1.42) and the teacher's weights move (it trains too)."""
    cfg = bdkd_config(student_dir, teacher_dir, tmp_path, "train.max_steps=10", "train.save_steps=100",
                      "train.prompts_per_step=16", "optim.lr=5e-3", "optim.warmup_steps=1",
                      "distill.teacher_coef=0.2")
    run(cfg)
    rows = _metrics(tmp_path)

    def tail_mean(key):
        return sum(r[key] for r in rows[-3:]) / 3

    assert tail_mean("divergence") < 0.4 * rows[0]["divergence"], [r["divergence"] for r in rows]
    assert tail_mean("task_loss") < 0.75 * rows[0]["task_loss"], [r["task_loss"] for r in rows]
    initial = modeling.load_model(teacher_dir, "float32").state_dict()
    final = load_file(tmp_path / "final_teacher" / "model.safetensors")
    assert max((final[k] - initial[k]).abs().max().item() for k in final) > 1e-3
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_bdkd_resume_gives_the_uninterrupted_run(student_dir, random_teacher_dir, tmp_path):
    """4 steps straight vs 2 + resume to 4: same metrics, same final student AND teacher (the teacher's weights
    and its AdamW state come back from the checkpoint)."""
    common = ["train.save_steps=2", "optim.warmup_steps=1"]
    run(bdkd_config(student_dir, random_teacher_dir, tmp_path / "full", "train.max_steps=4", *common))
    run(bdkd_config(student_dir, random_teacher_dir, tmp_path / "split", "train.max_steps=2", *common))
    assert (tmp_path / "split" / "checkpoint-2" / "teacher" / "model.safetensors").exists()
    run(bdkd_config(student_dir, random_teacher_dir, tmp_path / "split", "train.max_steps=4", *common),
        resume=str(tmp_path / "split" / "checkpoint-last"))
    assert_same_run(tmp_path / "full", tmp_path / "split", [1, 2, 3, 4])
    wa, wb = (load_file(tmp_path / d / "final_teacher" / "model.safetensors") for d in ("full", "split"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides,key", [(["teacher.offload=true"], "teacher.offload"),
                                           (["distill.divergence=jsd"], "distill.divergence"),
                                           (["distill.balance_minor=-1"], "distill.balance_minor"),
                                           (["rollout.num_generations=2"], "rollout.num_generations")])
def test_bdkd_config_errors_name_the_key(student_dir, random_teacher_dir, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        bdkd_config(student_dir, random_teacher_dir, tmp_path, *overrides)
