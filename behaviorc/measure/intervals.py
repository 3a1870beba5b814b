"""Bootstrap confidence intervals, with a fixed seed so a rebuild prints the same figures.

Replies cluster: the greedy and the sampled replies to one prompt are alike, so a
resample draws prompts (groups), each with all of its replies, when groups are given.
A difference between two models answering the same prompts is the interval of the
per-reply differences, drawn by prompt the same way (a paired bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap_mean(values: Sequence[float], groups: Sequence[object] | None = None,
                   seed: int = 0) -> Interval:
    """CI of the mean of `values`: resampling the values, or with `groups` (one label
    per value, e.g. its prompt) resampling whole groups."""
    data = np.asarray(values, float)
    if data.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = data[rng.integers(0, data.size, size=(RESAMPLES, data.size))].mean(axis=1)
    else:
        if len(groups) != data.size:
            raise ValueError(f"{data.size} values but {len(groups)} group labels")
        labels = list(dict.fromkeys(groups))
        index = {label: i for i, label in enumerate(labels)}
        member = np.asarray([index[g] for g in groups])
        sums = np.bincount(member, weights=data, minlength=len(labels))
        counts = np.bincount(member, minlength=len(labels)).astype(float)
        picks = rng.integers(0, len(labels), size=(RESAMPLES, len(labels)))
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - LEVEL) / 2
    return Interval(float(data.mean()), float(np.quantile(means, tail)),
                    float(np.quantile(means, 1 - tail)))
