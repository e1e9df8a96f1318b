"""The offline tiny model and the built-in synthetic task (no model hub, no downloads).

Task "arith": prompts "a + b =" with integer operands in [0, max_operand]; the answer column holds a + b.
Tokenizer: word level (the `tokenizers` package) over the task's words: the numbers 0..2·max_operand,
"+", "=", and the special tokens <pad>, <eos>.  Model: a randomly initialized Llama with a few small
layers, tied embeddings.  Both are written with ``save_pretrained`` so that the directory is used like
any local Hugging Face model.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

PAD, EOS = "<pad>", "<eos>"


def arith_words(max_operand: int) -> list[str]:
    return [PAD, EOS, "+", "="] + [str(i) for i in range(2 * max_operand + 1)]


def arith_rows(n: int, max_operand: int, seed: int) -> list[dict]:
    """n rows {"prompt": "a + b =", "answer": "a+b"} with a, b uniform in [0, max_operand]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a} + {b} =", "answer": str(a + b)})
    return rows


def build_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` (whitespace split; left padding for generation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, padding_side="left")


def build_tiny_model(output_dir: str | Path, *, max_operand: int = 4, hidden_size: int = 64, layers: int = 2,
                     seed: int = 0, max_positions: int = 32) -> Path:
    """Write a random-init Llama causal LM and its tokenizer for the arith task to ``output_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(arith_words(max_operand))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    # Llama: AutoTokenizer keeps the saved word-level tokenizer as it is (Qwen2's class would swap in its
    # byte-level decoder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out = Path(output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def arith_sft_batch(tokenizer, max_operand: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every "a + b = a+b <eos>" sequence of the task as (input_ids [N, 6], labels [N, 6], prompt tokens −100)."""
    words = [f"{a} + {b} = {a + b} <eos>".split() for a in range(max_operand + 1) for b in range(max_operand + 1)]
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in words])
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def build_tiny_teacher(output_dir: str | Path, *, max_operand: int = 4, hidden_size: int = 96, sft_steps: int = 150,
                       lr: float = 3e-3, seed: int = 0) -> Path:
    """A tiny model (``build_tiny_model`` with ``hidden_size``) trained by ``sft_steps`` full-batch AdamW steps of
    next-token cross-entropy on the answers of every arith prompt: a teacher that knows the task better than
    a random student, for distillation examples and tests."""
    from transformers import AutoModelForCausalLM

    out = build_tiny_model(output_dir, max_operand=max_operand, hidden_size=hidden_size, seed=seed + 1)
    tokenizer = build_tokenizer(arith_words(max_operand))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids, labels = arith_sft_batch(tokenizer, max_operand)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(sft_steps):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
    model.save_pretrained(out)
    return out
