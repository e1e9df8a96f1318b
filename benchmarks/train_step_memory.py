"""Peak memory of one GRPO or OPD training step of the trainer (onepass.train), fused vs ``loss.impl: naive``.

Each measurement runs in a fresh subprocess: a tiny Llama backbone with a realistic vocabulary
(default V=151,936), a batch of random prompts + completions, then the trainer's loss (the GRPO
algorithm's ``loss``, or with ``--algorithm opd`` the OPD algorithm's reverse KL to a frozen teacher of
twice the hidden size) forward + backward + AdamW step.  Reported: the process's peak RSS during the step
minus its RSS just before it (``resource.getrusage`` maxrss; the step includes the first allocation of
the gradients and the AdamW state, the same for both), and the step time.

    python benchmarks/train_step_memory.py [--algorithm grpo|opd --vocab 151936 --hidden 128 --seqs 8 --prompt 16
                                            --completion 128]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys, tempfile, time
import psutil, torch
from onepass.train.algorithms import GRPO, OPD
from onepass.train.config import load_config
from onepass.train.rollout import Rollout
from transformers import LlamaConfig, LlamaForCausalLM
a = json.loads(sys.argv[1])
torch.manual_seed(0)
def tiny_llama(hidden):
    return LlamaForCausalLM(LlamaConfig(vocab_size=a["vocab"], hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=1024, tie_word_embeddings=True))
model = tiny_llama(a["hidden"])
cfg = load_config(None, ["model.path=unused", "data.task=arith", f"loss.impl={a['impl']}", "loss.beta=0.0",
                         f"algorithm={a['algorithm']}", "teacher.path=unused"])
if a["algorithm"] == "opd":
    algo = OPD()
    algo.cfg, algo.teacher = cfg, tiny_llama(2 * a["hidden"]).eval().requires_grad_(False)
else:
    algo = GRPO()
    algo.cfg, algo.loss_cfg, algo.reference = cfg, cfg.loss, None
n, p, c = a["seqs"], a["prompt"], a["completion"]
ids = torch.randint(0, a["vocab"], (n, p + c))
am = torch.ones_like(ids)
batch = Rollout(ids, am, torch.ones(n, c), p, [""] * n, [""] * n, {},
                {"advantages": torch.randn(n), "old_logp": torch.full((n, c), -11.0)})
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def step():
    loss, _ = algo.loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
before = psutil.Process().memory_info().rss
t0 = time.perf_counter()
step()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"impl": a["impl"], "step_peak_over_before_MiB": round((peak - before) / 2**20),
                  "process_peak_MiB": round(peak / 2**20), "step_s": round(dt, 2)}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithm", choices=("grpo", "opd"), default="grpo")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--completion", type=int, default=128)
    args = vars(ap.parse_args())
    for impl in ("fused", "naive"):
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**args, "impl": impl})], check=True,
                             capture_output=True, text=True).stdout
        print({**args, **json.loads(out.strip().splitlines()[-1])})


if __name__ == "__main__":
    main()
