"""Merging task vectors, one tensor (or block of rows) at a time.

Each method turns the deltas of one parameter (one per term, float32, already read) and
the terms' weights into the single delta added to the base. The semantics follow
mergekit's `task_arithmetic` and `ties` (with the same float32 roundings), so that a
composition exported as mergekit YAML reproduces there:

- task_arithmetic: sum_i w_i * tau_i, times lambda. (`normalize` is a ties option
  here: dividing a task-arithmetic sum by its weights would turn `base - b` into
  `base + b`.)
- ties: trim each tau_i to its top `density` entries by magnitude, the
  max(1, int(density * n)) largest and any tied with the smallest of those; weight
  them; elect a sign per entry by the sign of the weighted sum (+ on a tie); keep the
  weighted entries that agree with it and (normalize) divide by the sum of the agreeing
  terms' weights, a disjoint weighted mean; times lambda. As in mergekit the divisor
  sums signed weights, so an agreeing negative term lowers it, and a divisor of 0 is 1.
  mergekit keeps exactly k entries, choosing arbitrarily among magnitudes tied at the
  threshold (an unstable sort); keeping all of them makes the result independent of
  the order of entries. Everywhere else the two agree exactly.
- dare: drop each entry of tau_i with probability 1 - density (seeded per parameter,
  term and block, so results do not depend on processing order), rescale the
  survivors by 1/density, then task arithmetic. At density 1 it is task arithmetic.

Functions here consume the deltas they are given: they work in place, so that peak
memory stays a few blocks per term.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch

from behaviorc import ir
from behaviorc.diagnostics import BehaviorError, did_you_mean

Method = Literal["task_arithmetic", "ties", "dare"]

# kth_largest's random sample; tensors under 4 samples' worth are selected directly.
_SAMPLE_SIZE = 1 << 14


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
                 term_indices: list[int], options: MergeOptions,
                 thresholds: list[torch.Tensor] | None = None, offset: int = 0) -> torch.Tensor:
    """The delta to add to base parameter `name`, or to a block of its rows.

    `deltas` (float32, consumed) and `weights` cover the terms that have this parameter;
    `term_indices` are those terms' positions in the composition. A block of a larger
    parameter passes each term's ties `thresholds`, found over the whole parameter (see
    `kth_largest_of_parts`), and its first row as `offset` (it seeds dare's drop)."""
    if options.method == "ties":
        mixed = _ties(deltas, weights, options.density, options.normalize, thresholds)
    elif options.method == "dare":
        for delta, index in zip(deltas, term_indices):
            drop_randomly_(delta, options.density, _seed_for(options.seed, name, index, offset))
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
          normalize: bool, thresholds: list[torch.Tensor] | None) -> torch.Tensor:
    # Weights are applied before summing, and sums add in term order, as mergekit does:
    # the same roundings, so the elected signs agree even where the mass is nearly 0.
    scratch = torch.empty_like(deltas[0])
    mass = torch.zeros_like(deltas[0])
    for index, (delta, weight) in enumerate(zip(deltas, weights)):
        if thresholds is None:
            trim_to_top_(delta, density, scratch)
        else:
            delta.mul_(torch.abs(delta, out=scratch) >= thresholds[index])
        mass.add_(delta.mul_(weight))
    # The elected sign per entry, +1 where the weighted mass is >= 0. A weighted entry
    # agrees where it times the elected sign is > 0 (a zero has no sign and never agrees,
    # so trimmed entries drop out); clamping that product at 0 keeps exactly the agreeing
    # entries, and multiplying the sum by the elected sign once restores their signs.
    elected = torch.where(mass >= 0, 1.0, -1.0)
    mixed = mass.zero_()
    divisor = scratch.zero_() if normalize else None
    for delta, weight in zip(deltas, weights):
        aligned = delta.mul_(elected).clamp_(min=0)
        mixed.add_(aligned)
        if divisor is not None:
            divisor.add_(aligned != 0, alpha=weight)
    mixed.mul_(elected)
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1.0)
        mixed.div_(divisor)
    return mixed


def trim_to_top_(delta: torch.Tensor, density: float,
                 scratch: torch.Tensor | None = None) -> None:
    """Zero all but the `keep_count(density, n)` entries largest in magnitude, in place.
    Entries tied with the smallest kept magnitude are all kept, so the result does not
    depend on the order of entries (mergekit keeps an arbitrary subset of them)."""
    if density >= 1:
        return
    if delta.numel() == 0:
        return
    magnitude = torch.abs(delta, out=scratch) if scratch is not None else delta.abs()
    threshold = kth_largest(magnitude.view(-1), keep_count(density, delta.numel()))
    delta.mul_(magnitude >= threshold)


def keep_count(density: float, count: int) -> int:
    """How many entries ties keeps: int(density * n), at least one (as mergekit)."""
    return max(1, int(density * count))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D tensor in O(n) (see `kth_largest_of_parts`)."""
    count = values.numel()
    if count <= 4 * _SAMPLE_SIZE:
        return torch.kthvalue(values, count - k + 1).values
    generator = torch.Generator().manual_seed(count)
    sample = values[torch.randint(count, (_SAMPLE_SIZE,), generator=generator)]
    return kth_largest_of_parts(lambda: iter([[values]]), count, k, [sample])[0]


def kth_largest_of_parts(parts: Callable[[], Iterator[list[torch.Tensor]]], count: int,
                         k: int, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """The k-th largest of each of several series of `count` non-negative float32
    values that come in parts: `parts()` yields, afresh on each call, a list holding the
    next part of every series. O(n), in the memory of one part per series.

    Quantiles of each series' sample (values drawn from all its parts) bracket its
    answer; one pass counts what lies above each bracket and keeps what lies inside,
    and an exact selection among those finishes. Where a sample misjudged its bracket,
    a radix selection on the float bit patterns (three histogram passes) finds it.
    """
    brackets = [_bracket(sample, count, k) for sample in samples]
    above = [0] * len(samples)
    inside: list[list[torch.Tensor] | None] = [[] for _ in samples]
    for part in parts():
        for series, (values, (lower, upper)) in enumerate(zip(part, brackets)):
            kept = inside[series]
            if kept is None:
                continue
            above[series] += int((values > upper).count_nonzero())
            kept.append(values[(values >= lower).logical_and_(values <= upper)])
            if sum(t.numel() for t in kept) > max(count // 16, 16 * samples[series].numel()):
                inside[series] = None  # the bracket is too wide to hold
    answers = []
    for series, kept in enumerate(inside):
        candidates = torch.cat(kept) if kept is not None else torch.empty(0)
        wanted = k - above[series]  # the answer's rank, from the top, among candidates
        if kept is not None and 1 <= wanted <= candidates.numel():
            answers.append(torch.kthvalue(candidates, candidates.numel() - wanted + 1).values)
        else:
            answers.append(_radix_select(
                lambda series=series: (part[series] for part in parts()), k))
    return answers


def _bracket(sample: torch.Tensor, count: int, k: int) -> tuple[float, float]:
    """Values that hold the k-th largest of `count` between them, judged by a sample,
    give or take 5 binomial deviations (and a few entries more)."""
    ordered = torch.sort(sample.reshape(-1), descending=True).values
    size = ordered.numel()
    share = k / count
    margin = 5 * (size * share * (1 - share)) ** 0.5 + 8
    upper_rank, lower_rank = int(share * size - margin), int(share * size + margin)
    upper = float(ordered[upper_rank]) if upper_rank >= 0 else float("inf")
    lower = float(ordered[lower_rank]) if lower_rank < size else float("-inf")
    return lower, upper


def _radix_select(parts: Callable[[], Iterator[torch.Tensor]], k: int) -> torch.Tensor:
    # Non-negative float32 values order like their bit patterns read as integers: fix
    # the 31 value bits 11, 10 and 10 at a time, each by a histogram of the entries
    # that match the bits fixed so far.
    prefix, fixed_from, remaining = 0, 31, k
    for width in (11, 10, 10):
        shift = fixed_from - width
        histogram = torch.zeros(1 << width, dtype=torch.int64)
        for part in parts():
            bits = part.reshape(-1).view(torch.int32)
            if fixed_from < 31:
                bits = bits[(bits >> fixed_from) == prefix]
            histogram += torch.bincount(((bits >> shift) & ((1 << width) - 1)).long(),
                                        minlength=1 << width)
        from_top = histogram.flip(0).cumsum(0)
        position = int((from_top >= remaining).nonzero()[0])
        bucket = (1 << width) - 1 - position
        remaining -= int(from_top[position] - histogram[bucket])
        prefix, fixed_from = (prefix << width) | bucket, shift
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0]


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


def _seed_for(seed: int, name: str, term_index: int, offset: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{term_index}\0{offset}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
