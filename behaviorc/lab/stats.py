"""Uncertainty: bootstrap confidence intervals over seeds and sampled replies.

A point's measured rate has two sources of noise: the seed (which examples, which
batches, which random projection) and the finite number of sampled replies. The
bootstrap below resamples both: seeds with replacement, then each chosen seed's rate
redrawn from a binomial with its own count of replies. For margins (no replies) only the
seeds are resampled.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from behaviorc.measure.intervals import LEVEL, RESAMPLES, Interval


def bootstrap_change(after: Sequence[float], before: Sequence[float], totals: Sequence[int] | None = None,
                     seed: int = 0) -> Interval:
    """CI of mean(after - before) over paired seeds. With `totals` (replies per seed),
    `after` and `before` are rates and each is also redrawn binomially."""
    after_a, before_a = np.asarray(after, float), np.asarray(before, float)
    if after_a.shape != before_a.shape or after_a.size == 0:
        raise ValueError("after and before need the same, non-zero number of seeds")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, after_a.size, size=(RESAMPLES, after_a.size))
    a, b = after_a[picks], before_a[picks]
    if totals is not None:
        n = np.asarray(totals, int)[picks]
        a = rng.binomial(n, np.clip(a, 0, 1)) / n
        b = rng.binomial(n, np.clip(b, 0, 1)) / n
    means = (a - b).mean(axis=1)
    tail = (1 - LEVEL) / 2
    return Interval(float((after_a - before_a).mean()), float(np.quantile(means, tail)),
                    float(np.quantile(means, 1 - tail)))
