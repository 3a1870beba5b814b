"""Sample replies: what a person reads to see a behavior, beside the margins.

Greedy and short, so the same model always gives the same text and a comparison of two
models (base and steered, steered and trained) shows only what the weights or the
steering changed. Prompts are the held-out pairs' prompts: none was steered or trained on.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping, Sequence

from behaviorc.engine.protocol import Engine, steered
from behaviorc.measure.margin import PairLike

REPLY_TOKENS = 40  # long enough for a sentence or two of tone, short enough to read
REPLY_PROMPTS = 3


def reply_prompts(pairs: Sequence[PairLike], count: int = REPLY_PROMPTS) -> list[str]:
    """The first `count` distinct prompts of held-out pairs."""
    return list(dict.fromkeys(p.prompt for p in pairs if p.prompt.strip()))[:count]


def sample_replies(engine: Engine, prompts: Sequence[str], max_new_tokens: int = REPLY_TOKENS,
                   steering: Mapping[int, object] | None = None, strength: float = 0.0) -> list[str]:
    """Greedy replies to `prompts` as generated, steered by `steering` at `strength` when
    given (the steering is cleared afterwards)."""
    with steered(engine, steering, strength) if steering else nullcontext():
        return engine.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=0.0)
