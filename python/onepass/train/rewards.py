"""Reward functions: ``(prompts, completions, **columns) -> list[float]``, one float per completion.

Named in the config as ``module:function`` (the run's working directory is on ``sys.path``), several
with weights.  Built in: ``exact_match`` (the final answer — the last ``\\boxed{}`` or else the last number
— equals the ``answer`` column), ``format_reward`` (a final answer can be extracted at all) and
``math_verify`` (symbolic equivalence with the ``math_verify`` package, when installed).  A reward that
raises, returns the wrong number of values or a NaN stops the step with ``RewardError`` naming it.
"""
from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardError(RuntimeError):
    """A reward function failed; the message names it."""


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{} content, else the last number, else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _same(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-9)
    except ValueError:
        return a.strip() == b.strip()


def exact_match(prompts, completions, answer, **_):
    """1.0 where the completion's final answer equals the ``answer`` column, else 0.0."""
    out = []
    for text, want in zip(completions, answer):
        got = extract_answer(text)
        out.append(1.0 if got is not None and _same(got, str(want)) else 0.0)
    return out


def format_reward(prompts, completions, **_):
    """1.0 where the completion is exactly one final answer (a lone number or a \\boxed{}), else 0.0."""
    out = []
    for text in completions:
        s = text.strip()
        out.append(1.0 if _NUMBER.fullmatch(s) or (s.startswith("\\boxed{") and _last_boxed(s) is not None)
                   else 0.0)
    return out


def math_verify(prompts, completions, answer, **_):
    """1.0 where ``math_verify`` judges the completion equivalent to the ``answer`` column."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("the math_verify reward needs the math-verify package: pip install math-verify") from e
    return [1.0 if verify(parse(str(want)), parse(text)) else 0.0 for text, want in zip(completions, answer)]


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float


def load_reward(spec: str, weight: float) -> Reward:
    """Import ``module:function`` with the current working directory on ``sys.path``."""
    module_name, _, fn_name = spec.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return Reward(spec, fn, float(weight))


def score(rewards: Sequence[Reward], prompts: list[str], completions: list[str], columns: dict[str, list]):
    """Weighted sum of the rewards [n] and each reward's values {name: [n]}, checked."""
    n = len(completions)
    per_reward = {}
    for r in rewards:
        try:
            values = r.fn(prompts, completions, **columns)
        except Exception as e:
            raise RewardError(f"reward {r.name!r} raised {type(e).__name__}: {e}") from e
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {r.name!r} must return a list of floats: {e}") from e
        if len(values) != n:
            raise RewardError(f"reward {r.name!r} returned {len(values)} values for {n} completions")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RewardError(f"reward {r.name!r} returned a non-finite value ({values[bad[0]]}) for completion "
                              f"{bad[0]}: {completions[bad[0]]!r}")
        per_reward[r.name] = values
    total = [sum(r.weight * per_reward[r.name][i] for r in rewards) for i in range(n)]
    return total, per_reward
