"""General NLL: the mean negative log-likelihood per token over plain text.

Measured before and after training (`general_nll_before`, `general_nll_after`) to show
whether a behavior was learned without forgetting. Token-weighted: every token of every
text counts once, so long texts weigh more, as they do in training.
"""

from __future__ import annotations

from typing import Sequence

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.protocol import Engine


def general_nll(engine: Engine, texts: Sequence[str]) -> float:
    """Mean per-token NLL of `texts`, each scored from its first token (after the
    engine's start token)."""
    if not texts:
        raise BehaviorError("no texts to measure general NLL on")
    logprobs = engine.completion_logprobs([""] * len(texts), list(texts))
    total = sum(sum(values) for values in logprobs)
    count = sum(len(values) for values in logprobs)
    if count == 0:
        raise BehaviorError("the general texts have no tokens")
    return -total / count
