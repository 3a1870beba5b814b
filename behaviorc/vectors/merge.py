"""Merging task vectors, one tensor at a time.

Each method turns the deltas of one parameter (one per term, float32, already read) and
the terms' weights into the single delta added to the base. The semantics follow
mergekit's `task_arithmetic` and `ties` so that a composition exported as mergekit YAML
reproduces there:

- task_arithmetic: sum_i w_i * tau_i, times lambda.
- ties: trim each tau_i to its top `density` entries by magnitude (exactly
  max(1, int(density * n)) of them), weight them, elect a sign per entry by the sign of
  the weighted sum, keep the weighted entries that agree with it, and (normalize)
  divide by the sum of the weights of the agreeing terms, a disjoint weighted mean;
  times lambda. As in mergekit the divisor sums signed weights, so a negative term
  that agrees with the elected sign lowers the divisor.
- dare: drop each entry of tau_i with probability 1 - density (seeded per parameter and
  term, so results do not depend on processing order), rescale the survivors by
  1/density, then task arithmetic. At density 1 it is task arithmetic exactly.

Functions here consume the deltas they are given (they work in place to keep peak
memory at a few tensors, whatever the model size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from behaviorc import ir
from behaviorc.diagnostics import BehaviorError, did_you_mean

Method = Literal["task_arithmetic", "ties", "dare"]

# Below this many entries an exact selection on the whole tensor is as cheap as any.
_SAMPLE_SIZE = 1 << 16


@dataclass(frozen=True)
class MergeOptions:
    method: Method = "task_arithmetic"
    density: float = 1.0  # ties and dare: the share of each vector's entries kept
    lambda_: float = 1.0  # scales the merged delta
    normalize: bool = True  # ties: divide by the summed weights of the agreeing terms
    seed: int = 0  # dare: the random drop
    groups: tuple[str, ...] = ()  # only these parameter groups merge; empty: all

    def __post_init__(self) -> None:
        if self.method not in ("task_arithmetic", "ties", "dare"):
            raise BehaviorError(f"unknown merge method `{self.method}`",
                                hint=did_you_mean(self.method, ("task_arithmetic", "ties", "dare")))
        if not 0 < self.density <= 1:
            raise BehaviorError(f"merge density {self.density} is outside (0, 1]")

    @classmethod
    def from_ir(cls, merge: ir.Merge) -> "MergeOptions":
        return cls(method=merge.method, density=merge.density, lambda_=merge.lambda_,
                   normalize=merge.normalize, seed=merge.seed, groups=merge.groups)

    def describe(self) -> dict[str, object]:
        """The options that affect this method's result (for provenance)."""
        shown: dict[str, object] = {"method": self.method, "lambda": self.lambda_}
        if self.method in ("ties", "dare"):
            shown["density"] = self.density
        if self.method == "ties":
            shown["normalize"] = self.normalize
        if self.method == "dare":
            shown["seed"] = self.seed
        if self.groups:
            shown["groups"] = list(self.groups)
        return shown


def merged_delta(name: str, deltas: list[torch.Tensor], weights: list[float],
                 term_indices: list[int], options: MergeOptions) -> torch.Tensor:
    """The delta to add to base parameter `name`. `deltas` (float32, consumed) and
    `weights` cover the terms that have this parameter; `term_indices` are those terms'
    positions in the composition (they seed dare's drop)."""
    if options.method == "ties":
        mixed = _ties(deltas, weights, options.density, options.normalize)
    elif options.method == "dare":
        for delta, index in zip(deltas, term_indices):
            drop_randomly_(delta, options.density, _seed_for(options.seed, name, index))
        mixed = _weighted_sum(deltas, weights)
    else:
        mixed = _weighted_sum(deltas, weights)
    if options.lambda_ != 1:
        mixed.mul_(options.lambda_)
    return mixed


def _weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = deltas[0].mul_(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        total.add_(delta.mul_(weight))
    return total


def _ties(deltas: list[torch.Tensor], weights: list[float], density: float,
          normalize: bool) -> torch.Tensor:
    for delta, weight in zip(deltas, weights):
        trim_to_top_(delta, density)
        delta.mul_(weight)
    mass = deltas[0].clone()
    for delta in deltas[1:]:
        mass.add_(delta)
    positive = mass >= 0  # the elected sign; a tie elects +
    mixed = mass.zero_()
    divisor = torch.zeros_like(mixed) if normalize else None
    for delta, weight in zip(deltas, weights):
        # A zero entry has no sign and so never agrees: trimmed entries drop out here.
        agrees = torch.where(positive, delta > 0, delta < 0)
        mixed.add_(delta.mul_(agrees))
        if divisor is not None:
            divisor.add_(agrees.to(divisor.dtype).mul_(weight))
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1.0)
        mixed.div_(divisor)
    return mixed


def trim_to_top_(delta: torch.Tensor, density: float) -> None:
    """Zero all but the max(1, int(density * n)) entries largest in magnitude, in place.
    Entries tied with the smallest kept magnitude are kept in index order."""
    if density >= 1:
        return
    count = delta.numel()
    if density <= 0 or count == 0:
        delta.zero_()
        return
    keep_count = max(1, int(density * count))
    flat = delta.view(-1)
    magnitude = flat.abs()
    threshold = kth_largest(magnitude, keep_count)
    keep = magnitude > threshold
    missing = keep_count - int(keep.count_nonzero())
    if missing > 0:
        tied = (magnitude == threshold).nonzero().view(-1)[:missing]
        keep[tied] = True
    flat.mul_(keep)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D tensor in O(n): bracket it with quantiles of a random
    sample, count what lies above the bracket, and select exactly inside it; fall back to
    a selection over everything when the sample misjudged the bracket."""
    count = values.numel()
    if count <= 4 * _SAMPLE_SIZE:
        return torch.kthvalue(values, count - k + 1).values
    generator = torch.Generator().manual_seed(count)
    sample = values[torch.randint(count, (_SAMPLE_SIZE,), generator=generator)]
    sample = torch.sort(sample, descending=True).values
    # Where the k-th largest falls in the sample, give or take 4 binomial deviations.
    share = k / count
    rank = share * _SAMPLE_SIZE
    margin = 4 * (_SAMPLE_SIZE * share * (1 - share)) ** 0.5 + 8
    upper_rank, lower_rank = int(rank - margin), int(rank + margin)
    upper = sample[upper_rank] if upper_rank >= 0 else None
    lower = sample[lower_rank] if lower_rank < _SAMPLE_SIZE else None
    above = int((values > upper).count_nonzero()) if upper is not None else 0
    if upper is not None and lower is not None:
        inside = values[(values >= lower) & (values <= upper)]
    elif upper is not None:
        inside = values[values <= upper]
    elif lower is not None:
        inside = values[values >= lower]
    else:
        inside = values
    wanted = k - above  # the rank, from the top, of the answer among `inside`
    if 1 <= wanted <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - wanted + 1).values
    return torch.kthvalue(values, count - k + 1).values


def drop_randomly_(delta: torch.Tensor, density: float, seed: int) -> None:
    """Keep each entry with probability `density`, scaled by 1/density, in place."""
    if density >= 1:
        return
    if density <= 0:
        delta.zero_()
        return
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator) < density
    delta.mul_(keep).div_(density)


def _seed_for(seed: int, name: str, term_index: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{term_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
