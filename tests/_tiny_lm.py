"""Tiny random-init causal LMs and an offline word-level tokenizer for the trainer-integration tests."""
from __future__ import annotations

import torch


def word_tokenizer(vocab_size: int):
    """A ``PreTrainedTokenizerFast`` over words ``w0 … w{vocab_size-4}`` plus <pad>, <eos>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def tiny_lm(vocab_size: int = 96, *, arch: str = "qwen2", hidden: int = 32, seed: int = 0, **config_overrides):
    """A 1-layer random-init causal LM (fp32).  ``arch="qwen2"`` ties the LM head to the embeddings;
    ``arch="llama"`` has a separate head; ``arch="gemma2"`` (tied) soft-caps its final logits
    (``final_logit_softcapping``, 5.0 here so that the cap bends the tiny model's logits)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None)
    common.update(config_overrides)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    elif arch == "gemma2":
        gemma = dict(head_dim=hidden // 2, final_logit_softcapping=5.0, query_pre_attn_scalar=hidden // 2)
        model = Gemma2ForCausalLM(Gemma2Config(tie_word_embeddings=True, **{**gemma, **common}))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    # Larger head weights than the default init: sharper distributions, so log-probs, entropies and clipping
    # are far from their trivial values.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def prompts(n: int, vocab_size: int, length: int = 4, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 3, (n, length), generator=g)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def params_max_abs_diff(a, b) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
