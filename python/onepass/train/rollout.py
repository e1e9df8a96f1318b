"""Rollouts with Hugging Face ``generate``: ``num_generations`` samples per prompt, left padding.

A rollout batch holds, for B·G sequences, the token ids [N, P + C] (left-padded prompt, then the
completion padded after its EOS), the attention mask, the completion mask [N, C] (tokens up to and
including the first EOS) and the decoded prompts / completions for the rewards.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import RolloutConfig


@dataclass
class Rollout:
    input_ids: torch.Tensor          # [N, P + C] int64
    attention_mask: torch.Tensor     # [N, P + C] int64
    completion_mask: torch.Tensor    # [N, C] float32
    prompt_len: int                  # P
    prompts: list[str]
    completions: list[str]
    columns: dict[str, list]         # the data columns, repeated per generation
    extras: dict = field(default_factory=dict)   # filled by the algorithm (advantages, old_logp, ...)

    @property
    def targets(self) -> torch.Tensor:
        """The completion tokens [N, C] (the targets of the loss)."""
        return self.input_ids[:, self.prompt_len:]

    def select(self, idx: torch.Tensor) -> "Rollout":
        i = idx.tolist()
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.completion_mask[idx], self.prompt_len,
                       [self.prompts[k] for k in i], [self.completions[k] for k in i],
                       {c: [v[k] for k in i] for c, v in self.columns.items()},
                       {k: v[idx] for k, v in self.extras.items()})


def concat(parts: list[Rollout], pad_id: int, completion_len: int = 0) -> Rollout:
    """Rollouts (before ``prepare``) stacked into one batch: prompts left-padded to the longest, completions
    right-padded with ``pad_id`` (mask 0) to the longest or to ``completion_len`` if longer; their extras
    must be per-token [n, C] tensors (the vLLM engine's ``sampling_logp``), right-padded with 0."""
    keys = set(parts[0].extras)
    for r in parts:
        if set(r.extras) != keys or any(x.dim() != 2 or x.shape != r.completion_mask.shape for x in r.extras.values()):
            raise ValueError("concat: the rollouts' extras must be the same per-token [n, C] tensors (not prepared yet)")
    p = max(r.prompt_len for r in parts)
    c = max([r.completion_mask.shape[1] for r in parts] + [completion_len])
    ids, am, cm = [], [], []
    for r in parts:
        left, right = p - r.prompt_len, c - r.completion_mask.shape[1]
        ids.append(F.pad(r.input_ids, (left, right), value=pad_id))
        am.append(F.pad(r.attention_mask, (left, right), value=0))
        cm.append(F.pad(r.completion_mask, (0, right), value=0.0))
    columns = {k: [x for r in parts for x in r.columns[k]] for k in parts[0].columns}
    extras = {k: torch.cat([F.pad(r.extras[k], (0, c - r.extras[k].shape[1])) for r in parts]) for k in keys}
    return Rollout(torch.cat(ids), torch.cat(am), torch.cat(cm), p, [x for r in parts for x in r.prompts],
                   [x for r in parts for x in r.completions], columns, extras)


def completion_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it. tokens [N, C] -> [N, C] float32."""
    is_eos = (tokens == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos
    return (before == 0).to(torch.float32)


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], columns: dict[str, list], cfg: RolloutConfig) -> Rollout:
    from transformers import GenerationConfig

    g = cfg.num_generations
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=True)
    device = next(model.parameters()).device
    ids = enc["input_ids"].repeat_interleave(g, 0).to(device)
    am = enc["attention_mask"].repeat_interleave(g, 0).to(device)
    gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=am, generation_config=gen_cfg)
    model.train(was_training)
    p = ids.shape[1]
    comp = out[:, p:]
    cmask = completion_mask(comp, tokenizer.eos_token_id)
    full_mask = torch.cat([am, cmask.to(am.dtype)], 1)
    completions = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(comp, cmask)]
    rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
    return Rollout(out, full_mask, cmask, p, rep(texts), completions, {c: rep(v) for c, v in columns.items()})


def fixed_batch(tokenizer, texts: list[str], completions: list[str], columns: dict[str, list], device) -> Rollout:
    """A batch of given completions (offline distillation, no sampling): left-padded prompts, then each
    completion's tokens and EOS, right-padded."""
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=True)
    comp_ids = [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for c in completions]
    c = max(len(x) for x in comp_ids)
    comp = torch.full((len(texts), c), tokenizer.pad_token_id, dtype=torch.long)
    for i, x in enumerate(comp_ids):
        comp[i, :len(x)] = torch.tensor(x)
    cmask = completion_mask(comp, tokenizer.eos_token_id)
    ids = torch.cat([enc["input_ids"], comp], 1).to(device)
    am = torch.cat([enc["attention_mask"], cmask.to(enc["attention_mask"].dtype)], 1).to(device)
    return Rollout(ids, am, cmask.to(device), enc["input_ids"].shape[1], list(texts), list(completions), columns)
