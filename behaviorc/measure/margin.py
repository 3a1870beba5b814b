"""Behavior margin: how much more likely the model finds the wanted completion.

For one pair it is the mean per-token log-prob of the positive completion minus that
of the negative one, both after the same prompt; per-token means keep completions of
different lengths comparable. A set's margin is the mean over its pairs. This is the
number behind `margin_before`, `margin_after` and `margin_steered`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.protocol import Engine


class PairLike(Protocol):
    prompt: str
    positive: str
    negative: str


def per_pair_logprobs(engine: Engine, pairs: Sequence[PairLike]) -> tuple[list[float], list[float]]:
    """Mean log-prob per token of each pair's positive, and of its negative, completion."""
    if not pairs:
        raise BehaviorError("no pairs to measure a margin on")
    prompts = [p.prompt for p in pairs] * 2
    completions = [p.positive for p in pairs] + [p.negative for p in pairs]
    logprobs = engine.completion_logprobs(prompts, completions)
    for completion, values in zip(completions, logprobs):
        if not values:
            raise BehaviorError(f"completion {completion!r} has no tokens to score",
                                hint="every positive and negative needs some text")
    means = [sum(values) / len(values) for values in logprobs]
    return means[:len(pairs)], means[len(pairs):]


def per_pair_margins(engine: Engine, pairs: Sequence[PairLike]) -> list[float]:
    """Mean log-prob per token of each pair's positive minus its negative completion."""
    positives, negatives = per_pair_logprobs(engine, pairs)
    return [p - n for p, n in zip(positives, negatives)]


def behavior_margin(engine: Engine, pairs: Sequence[PairLike]) -> float:
    """The mean of `per_pair_margins`: > 0 when the model prefers the positives."""
    margins = per_pair_margins(engine, pairs)
    return sum(margins) / len(margins)
