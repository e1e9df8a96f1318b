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
