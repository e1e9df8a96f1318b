"""Subprocess body of test_integration_trl.test_grpo_peak_memory: one GRPO training step (V = 32,768), prints
the peak RSS growth during ``trainer.train()`` in MiB.  argv[1]: "onepass" or "trl"; argv[2]: a temp dir."""
import ctypes
import gc
import sys

import torch
from datasets import Dataset

import trl
from _tiny_lm import prompts, tiny_lm, word_tokenizer

import onepass.integrations.trl as onepass_trl

VOCAB = 32768


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main(provider, tmp):
    torch.set_num_threads(1)
    path = f"{tmp}/model"
    tiny_lm(VOCAB, arch="llama").save_pretrained(path)
    args = trl.GRPOConfig(output_dir=f"{tmp}/out", per_device_train_batch_size=8, num_generations=8,
                          max_completion_length=16, max_steps=1, learning_rate=0.1, report_to="none", use_cpu=True,
                          seed=0, save_strategy="no", disable_tqdm=True, bf16=False, optim="sgd", beta=0.0)
    trainer = trl.GRPOTrainer(model=path, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=args, train_dataset=Dataset.from_dict({"prompt": prompts(8, VOCAB, 8)}),
                              processing_class=word_tokenizer(VOCAB))
    if provider == "onepass":
        onepass_trl.patch(trainer)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status_kib("VmRSS")
    trainer.train()
    print(f"PEAK_MIB {(status_kib('VmHWM') - base) / 1024:.1f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
