"""Merging task vectors, one tensor (or block of rows) at a time.

Each method turns the deltas of one parameter, or of a piece of it (one numpy float32
array per term, already read), and the terms' weights into the single delta added to
the base. The semantics follow
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
  term and piece, the piece named by its first entry, so results do not depend on
  processing order), rescale the survivors by 1/density, then task arithmetic. At
  density 1 it is task arithmetic.

Functions here consume the deltas they are given: they work in place, so that peak
memory stays a few pieces per term. Weights, lambda and density act as float32, as they
do in torch's arithmetic on float32 tensors. A NaN or inf in a delta makes the merged
delta non-finite at that entry, whatever the method, so one check of the result finds it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import numpy as np

from behaviorc.core.diagnostics import BehaviorError, did_you_mean

if TYPE_CHECKING:  # (importing the spec's model costs `behaviorc merge` a tenth of its start)
    from behaviorc.core import ir

Method = Literal["task_arithmetic", "ties", "dare"]

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


class Workspace:
    """Named arrays reused from one piece of a merge to the next. Fresh arrays for every
    piece would cost more than the arithmetic: the allocator hands memory back to the
    system and faults it in again, page by page."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: int | tuple[int, ...],
              dtype: np.dtype | type = np.float32) -> np.ndarray:
        """An array of this shape (its contents are left from earlier use)."""
        size = math.prod(shape) if isinstance(shape, tuple) else shape
        held = self._arrays.get(name)
        if held is None or held.size < size or held.dtype != dtype:
            held = self._arrays[name] = np.empty(size, dtype)
        return held[:size].reshape(shape)


def merged_delta(name: str, deltas: list[np.ndarray], weights: list[float],
                 term_indices: list[int], options: MergeOptions,
                 thresholds: list[np.float32] | None = None, offset: int = 0,
                 workspace: Workspace | None = None) -> np.ndarray:
    """The delta to add to base parameter `name`, or to a piece of it.

    `deltas` (float32 arrays of one shape, consumed) and `weights` cover the terms that have
    this parameter; `term_indices` are those terms' positions in the composition. A
    piece of a parameter passes each term's ties `thresholds`, found over the whole
    parameter, and the index of its first entry in the parameter as `offset` (it seeds
    dare's drop). The result may live in `workspace` or in one of the deltas.

    A NaN or inf in a delta goes through as arithmetic makes it, silently: the caller
    checks the merged values once and says which input held it."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _merged(name, deltas, weights, term_indices, options, thresholds, offset,
                       workspace)


def _merged(name: str, deltas: list[np.ndarray], weights: list[float], term_indices: list[int],
            options: MergeOptions, thresholds: list[np.float32] | None, offset: int,
            workspace: Workspace | None) -> np.ndarray:
    if options.method == "ties":
        mixed = _ties(deltas, weights, options.density, options.normalize, thresholds,
                      workspace or Workspace())
    elif options.method == "dare":
        for delta, index in zip(deltas, term_indices):
            drop_randomly_(delta, options.density, _seed_for(options.seed, name, index, offset))
        mixed = _weighted_sum(deltas, weights)
    else:
        mixed = _weighted_sum(deltas, weights)
    if options.lambda_ != 1:
        mixed *= np.float32(options.lambda_)
    return mixed


def _weighted_sum(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    total = deltas[0]
    total *= np.float32(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        delta *= np.float32(weight)
        total += delta
    return total


def _ties(deltas: list[np.ndarray], weights: list[float], density: float, normalize: bool,
          thresholds: list[np.float32] | None, workspace: Workspace) -> np.ndarray:
    # Weights are applied before summing, and sums add in term order, as mergekit does:
    # the same roundings, so the elected signs agree even where the mass is nearly 0.
    # (Masks are multiplied in rather than used as `where=`: a mask that follows the data
    # makes numpy's masked loops branch unpredictably, many times slower.)
    shape = deltas[0].shape
    scratch, mass = workspace.array("scratch", shape), workspace.array("mass", shape)
    kept = workspace.array("kept", shape, np.bool_)
    mass.fill(0)
    for index, (delta, weight) in enumerate(zip(deltas, weights)):
        if thresholds is None:
            trim_to_top_(delta, density, scratch)
        else:
            np.greater_equal(np.abs(delta, out=scratch), thresholds[index], out=kept)
            delta *= kept
        delta *= np.float32(weight)
        mass += delta
    # The elected sign per entry, +1 where the weighted mass is >= 0 (the mass started
    # at +0, and a sum is never -0 then, so its sign bit says so). A weighted entry agrees
    # where it times the elected sign is > 0 (a zero has no sign and never agrees, so
    # trimmed entries drop out); clamping that product at 0 keeps exactly the agreeing
    # entries, and multiplying their sum by the elected sign once restores their signs.
    elected = np.copysign(np.float32(1), mass, out=workspace.array("elected", shape))
    zeros = workspace.array("zeros", shape)
    zeros.fill(0)  # (max against an array is several times faster than against 0)
    mixed = mass
    mixed.fill(0)
    divisor = workspace.array("divisor", shape)
    divisor.fill(0)
    for delta, weight in zip(deltas, weights):
        aligned = np.maximum(np.multiply(delta, elected, out=delta), zeros, out=delta)
        mixed += aligned
        if normalize:  # the divisor sums the weights of the agreeing terms, in term order
            np.not_equal(aligned, 0, out=kept)
            divisor += np.multiply(kept, np.float32(weight), out=scratch)
    mixed *= elected
    if normalize:  # where no term agrees the divisor is 0, and counts as 1
        np.equal(divisor, 0, out=kept)
        divisor += kept
        mixed /= divisor
    return mixed


def trim_to_top_(delta: np.ndarray, density: float, scratch: np.ndarray | None = None) -> None:
    """Zero all but the `keep_count(density, n)` entries largest in magnitude, in place.
    Entries tied with the smallest kept magnitude are all kept, so the result does not
    depend on the order of entries (mergekit keeps an arbitrary subset of them)."""
    if density >= 1 or delta.size == 0:
        return
    magnitude = np.abs(delta, out=scratch)
    threshold = kth_largest(magnitude.reshape(-1), keep_count(density, delta.size))
    np.multiply(delta, magnitude >= threshold, out=delta)


def keep_count(density: float, count: int) -> int:
    """How many entries ties keeps: int(density * n), at least one (as mergekit)."""
    return max(1, int(density * count))


def kth_largest(values: np.ndarray, k: int, *, reorder: bool = False) -> np.float32:
    """The k-th largest of a 1-D array, by introselect (O(n)); with `reorder` the
    selection reorders `values` instead of a copy of them."""
    position = values.size - k
    if reorder:
        values.partition(position)
        return values[position]
    return np.partition(values, position)[position]


def kth_largest_of_parts(parts: Callable[[], Iterator[list[np.ndarray]]], count: int,
                         k: int, samples: list[np.ndarray]) -> list[np.float32]:
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
    inside: list[list[np.ndarray] | None] = [[] for _ in samples]
    workspace = Workspace()
    for part in parts():
        for series, (values, (lower, upper)) in enumerate(zip(part, brackets)):
            kept = inside[series]
            if kept is None:
                continue
            is_above = np.greater(values, upper,
                                  out=workspace.array("above", values.shape, np.bool_))
            above[series] += int(np.count_nonzero(is_above))
            # At least `lower` and not above `upper`: inside the bracket.
            is_inside = np.greater_equal(values, lower,
                                         out=workspace.array("inside", values.shape, np.bool_))
            kept.append(values[np.logical_xor(is_inside, is_above, out=is_inside)])
            if sum(t.size for t in kept) > max(count // 16, 16 * samples[series].size):
                inside[series] = None  # the bracket is too wide to hold
    answers = []
    for series, kept in enumerate(inside):
        candidates = np.concatenate(kept) if kept else np.empty(0, np.float32)
        wanted = k - above[series]  # the answer's rank, from the top, among candidates
        if kept is not None and 1 <= wanted <= candidates.size:
            answers.append(kth_largest(candidates, wanted, reorder=True))
        else:
            answers.append(_radix_select(
                lambda series=series: (part[series] for part in parts()), k))
    return answers


def _bracket(sample: np.ndarray, count: int, k: int) -> tuple[float, float]:
    """Values that hold the k-th largest of `count` between them, judged by a sample,
    give or take 5 binomial deviations (and a few entries more)."""
    ordered = np.sort(sample.reshape(-1))[::-1]
    size = ordered.size
    share = k / count
    margin = 5 * (size * share * (1 - share)) ** 0.5 + 8
    upper_rank, lower_rank = int(share * size - margin), int(share * size + margin)
    upper = float(ordered[upper_rank]) if upper_rank >= 0 else float("inf")
    lower = float(ordered[lower_rank]) if lower_rank < size else float("-inf")
    return lower, upper


def _radix_select(parts: Callable[[], Iterator[np.ndarray]], k: int) -> np.float32:
    # Non-negative float32 values order like their bit patterns read as integers: fix
    # the 31 value bits 11, 10 and 10 at a time, each by a histogram of the entries
    # that match the bits fixed so far.
    prefix, fixed_from, remaining = 0, 31, k
    for width in (11, 10, 10):
        shift = fixed_from - width
        histogram = np.zeros(1 << width, np.int64)
        for part in parts():
            bits = np.ascontiguousarray(part).reshape(-1).view(np.uint32)
            if fixed_from < 31:
                bits = bits[(bits >> fixed_from) == prefix]
            histogram += np.bincount((bits >> shift) & ((1 << width) - 1),
                                     minlength=1 << width)
        from_top = np.cumsum(histogram[::-1])
        position = int(np.argmax(from_top >= remaining))
        bucket = (1 << width) - 1 - position
        remaining -= int(from_top[position] - histogram[bucket])
        prefix, fixed_from = (prefix << width) | bucket, shift
    return np.array([prefix], np.uint32).view(np.float32)[0]


def drop_randomly_(delta: np.ndarray, density: float, seed: int) -> None:
    """Keep each entry with probability `density`, scaled by 1/density, in place."""
    if density >= 1:
        return
    if density <= 0:
        delta.fill(0)
        return
    keep = np.random.default_rng(seed).random(delta.shape, dtype=np.float32) < density
    np.multiply(delta, keep, out=delta)
    delta /= np.float32(density)


def _seed_for(seed: int, name: str, term_index: int, offset: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{term_index}\0{offset}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
