"""Merging task vectors, one tensor (or block of rows) at a time.

Every method is mergekit 0.1.5's, so that a composition exported as mergekit YAML
reproduces there. Its generalized task arithmetic, here with the same float32 roundings:
a method sparsifies each tau_i with that term's density (and epsilon, gamma; density 0
keeps nothing), optionally rescales what is left to the L1 norm it had (`rescale`, any
sparsifying method), weights it, and mixes: a plain sum, or (`*_ties` and `della`) TIES's
sign election; `normalize` divides by the weights; lambda scales the result. `linear`
is the weighted sum of the models' weights (base + tau_i), normalized by default. Model
Stock and the spherical methods (slerp, nuslerp, multislerp, karcher) are a weighted sum
with factors found from each parameter's Gram matrix: see behaviorc.compose.spherical.

- task_arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"):
  sum_i w_i * tau_i, times lambda.
- ties (Yadav et al. 2023, "TIES-Merging"): trim each tau_i to its k = max(1,
  int(density * n)) entries largest in magnitude; weight them; elect a sign per entry
  by the sign of the weighted sum (+ on a tie); keep the weighted entries that agree
  with it and (normalize, the default) divide by the sum of the agreeing terms' weights,
  a disjoint weighted mean; times lambda. As in mergekit the divisor sums signed
  weights, so an agreeing negative term lowers it, and a divisor of 0 is 1.
- dare_linear, also `dare` (Yu et al. 2024, "Language models are Super Mario"): drop
  each entry of tau_i with probability 1 - density, rescale the survivors (mergekit
  0.1.5: by the ratio of tau_i's L1 norm before and after the drop, which is 1/density
  in expectation), then task arithmetic. dare_ties: the same drop, then TIES's sign
  election and mix (normalize off by default, as in mergekit).
- della, della_linear (Deep et al. 2024, "DELLA-Merging", MagPrune): within each row
  (a 1-D tensor is one row) rank the entries by magnitude, r = 0 for the smallest to
  m - 1 for the largest, and keep each with probability
  p = density - epsilon + 2 * epsilon * r / (m - 1), so larger entries survive more
  often; rescale, then TIES's election and mix (della; normalize on) or a plain sum
  (della_linear).
- breadcrumbs, breadcrumbs_ties (Davari & Belilovsky 2024, "Model Breadcrumbs"): drop
  the int(gamma * n) entries of tau_i largest in magnitude (outliers) and then the
  smallest, keeping int(density * n) in between (fewer outliers are dropped when the
  two do not fit), then a plain sum or TIES's election and mix.
- model_stock (Jang et al. 2024, "Model Stock"): with N fine-tuned models and cos the
  mean pairwise cosine of their task vectors over the whole tensor (or each row,
  `filter_wise`), t = N cos / (1 + (N - 1) cos) and the merge is base + t *
  mean_i(tau_i). Weights do not enter (each term is a model, as in mergekit); a term
  without a parameter has tau 0.

Ties, the deterministic order. Where a method ranks entries by magnitude (the trims of
ties and breadcrumbs, della's ranks), entries of equal magnitude rank by position: the
one with the lower flat index ranks above. So a trim keeps exactly its share in bfloat16
as in float32, and the choice depends on neither thread count nor the blocks and pieces
a parameter is merged in. mergekit breaks such ties by an unstable sort, arbitrarily:
its result differs from behaviorc's only in which of the entries tied at a trim
threshold survive.

Randomness: drops are seeded per parameter, term and piece (a piece is named by its
first entry, and pieces are whole rows cut at fixed places in the parameter), so results
do not depend on processing order; mergekit's torch.bernoulli draws other entries, so the
random methods agree with it in distribution (kept share, norms), not entry by entry.

Functions here consume the deltas they are given: they work in place, so that peak
memory stays a few pieces per term. Weights, lambda and density act as float32, as they
do in torch's arithmetic on float32 tensors. A NaN or inf in a delta makes the merged
delta non-finite at that entry, whatever the method, so one check of the result finds it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from behaviorc.core.diagnostics import BehaviorError, did_you_mean
from behaviorc.core.merge_methods import (
    ALIASES, DEFAULT_EPS, DEFAULT_EPSILON, DEFAULT_GAMMA, DEFAULT_MAX_ITER, DEFAULT_TOL,
    METHOD_NAMES, METHODS, PER_TERM, REFUSED_METHODS, MethodTraits, merge_setting_problem)
from behaviorc.compose.spherical import Mix, gram_sums, mix_of

if TYPE_CHECKING:  # (importing the spec's model costs `behaviorc merge` a tenth of its start)
    from behaviorc.core import ir

@dataclass(frozen=True)
class TermSettings:
    """One term's own sparsifying settings (mergekit's per-model parameters); None: the
    merge's."""

    density: float | None = None
    epsilon: float | None = None
    gamma: float | None = None

    def given(self) -> dict[str, float]:
        return {name: value for name in PER_TERM
                if (value := getattr(self, name)) is not None}


@dataclass(frozen=True)
class MergeOptions:
    method: str = "task_arithmetic"  # a METHODS name or an alias
    density: float = 1.0  # sparsifying methods: the share of each vector's entries kept
    lambda_: float = 1.0  # scales the merged delta
    normalize: bool | None = None  # divide by the (agreeing) weights; None: the method's default
    rescale: bool | None = None  # sparsifying methods: restore L1 norms; None: the method's default
    epsilon: float = DEFAULT_EPSILON  # della: half the spread of the keep probabilities
    gamma: float = DEFAULT_GAMMA  # breadcrumbs: the share of largest entries dropped
    seed: int = 0  # dare, della: the random drop
    t: float | None = None  # slerp: 0 the first model (the base with one term), 1 the second
    flatten: bool = True  # nuslerp: one angle per tensor (else per row or column)
    row_wise: bool = False  # nuslerp without flatten: per column (mergekit's name)
    filter_wise: bool = False  # model_stock: one angle per row
    max_iter: int = DEFAULT_MAX_ITER  # karcher
    tol: float = DEFAULT_TOL  # karcher
    eps: float = DEFAULT_EPS  # multislerp
    groups: tuple[str, ...] = ()  # only these parameter groups merge; empty: all
    terms: tuple[TermSettings, ...] = ()  # by term position (missing: the merge's settings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", ALIASES.get(self.method, self.method))
        if self.method not in METHODS:
            refused = REFUSED_METHODS.get(self.method)
            if refused:
                raise BehaviorError(f"merge method `{self.method}` {refused[0]}", hint=refused[1])
            raise BehaviorError(f"unknown merge method `{self.method}`",
                                hint=did_you_mean(self.method, METHOD_NAMES)
                                or f"methods: {', '.join(METHOD_NAMES)}")
        for index, term in enumerate(self.terms or (TermSettings(),)):
            problem = merge_setting_problem(self.method, self.density_of(index),
                                            self.epsilon_of(index), self.gamma_of(index))
            if problem:
                where = f" (term {index + 1})" if term.given() else ""
                raise BehaviorError(f"merge {problem}{where}")
        if self.rescale is not None and "rescale" not in self.traits.settings:
            raise BehaviorError(f"`{self.method}` does not rescale",
                                hint="rescale belongs to the sparsifying methods: ties, dare, "
                                     "della, breadcrumbs and their variants")
        if self.traits.mix == "slerp" and self.t is None:
            raise BehaviorError("slerp needs `t`, where between the two models to go",
                                hint="t 0.5 is halfway; 0 is the first model, 1 the second")
        if self.max_iter < 0 or not self.tol > 0 or not self.eps >= 0:
            raise BehaviorError("merge max_iter must be at least 0, tol above 0, eps at "
                                "least 0")

    @property
    def traits(self) -> MethodTraits:
        return METHODS[self.method]

    @property
    def normalizes(self) -> bool:
        return self.traits.normalize if self.normalize is None else self.normalize

    @property
    def rescales(self) -> bool:
        return "rescale" in self.traits.settings and (
            self.traits.rescale if self.rescale is None else self.rescale)

    def _term(self, index: int, name: str) -> float:
        own = getattr(self.terms[index], name) if index < len(self.terms) else None
        return getattr(self, name) if own is None else own

    def density_of(self, index: int) -> float:
        """The density of the term at this position in the composition."""
        return self._term(index, "density")

    def epsilon_of(self, index: int) -> float:
        return self._term(index, "epsilon")

    def gamma_of(self, index: int) -> float:
        return self._term(index, "gamma")

    def sparsifies(self, index: int) -> bool:
        """Whether the term at this position is sparsified (its density is below 1)."""
        return self.traits.sparsify is not None and self.density_of(index) < 1

    @classmethod
    def from_ir(cls, merge: ir.Merge, terms: tuple[ir.Term, ...] = ()) -> "MergeOptions":
        return cls(method=merge.method, density=merge.density, lambda_=merge.lambda_,
                   normalize=merge.normalize, rescale=merge.rescale, epsilon=merge.epsilon,
                   gamma=merge.gamma, seed=merge.seed, t=merge.t, flatten=merge.flatten,
                   row_wise=merge.row_wise, filter_wise=merge.filter_wise,
                   max_iter=merge.max_iter, tol=merge.tol, eps=merge.eps, groups=merge.groups,
                   terms=tuple(TermSettings(term.density, term.epsilon, term.gamma)
                               for term in terms))

    def describe(self) -> dict[str, object]:
        """The options that affect this method's result (for provenance; each term's own
        settings are in its record)."""
        settings = self.traits.settings
        values = {"lambda": self.lambda_, "normalize": self.normalizes, "density": self.density,
                  "rescale": self.rescales, "seed": self.seed, "epsilon": self.epsilon,
                  "gamma": self.gamma, "t": self.t, "flatten": self.flatten,
                  "row_wise": self.row_wise, "filter_wise": self.filter_wise,
                  "max_iter": self.max_iter, "tol": self.tol, "eps": self.eps}
        shown: dict[str, object] = {"method": self.method}
        shown.update((name, values[name]) for name in settings)
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


@dataclass
class RankCut:
    """The entries of one vector ranked above a cut, in the order of magnitude (larger
    first) and, among equal magnitudes, of position (lower flat index first): those above
    `threshold` and the first `ties` of those equal to it. The vector's pieces must be
    selected in order of position: `taken` counts the tied entries met so far."""

    threshold: np.float32
    ties: int
    taken: int = 0

    def select(self, magnitude: np.ndarray, out: np.ndarray, tied: np.ndarray) -> np.ndarray:
        """Into the boolean `out`, which entries of this piece rank above the cut."""
        np.greater_equal(magnitude, self.threshold, out=out)
        np.equal(magnitude, self.threshold, out=tied)
        count = int(np.count_nonzero(tied))
        wanted = self.ties - self.taken
        if count > wanted:  # more ties here than the cut has left: the later ones fall
            out.reshape(-1)[np.flatnonzero(tied)[max(wanted, 0):]] = False
        self.taken += min(count, max(wanted, 0))
        return out


# Ranks cut nowhere: nothing is above it.
def _nothing() -> RankCut:
    return RankCut(np.float32(np.inf), 0)


# Ranks cut below the smallest: everything is above it (a term that keeps all).
def _everything() -> RankCut:
    return RankCut(np.float32(-np.inf), 0)


@dataclass
class ParameterPlan:
    """What merging a parameter piece by piece needs to know of the whole parameter
    first, per term: the trims' cuts, the rescale factors, the spherical methods' and
    Model Stock's factors."""

    keep: list[RankCut] | None = None  # ties, breadcrumbs: entries ranked above are kept
    drop: list[RankCut] | None = None  # breadcrumbs: of those, entries ranked above drop
    scales: list[np.float32] | None = None  # rescaling: the factor of each sparsified tau
    mix: Mix | None = None  # model_stock, slerp, ...: each term's factor and the base's
    # The random drops' keep masks found while rescaling, packed, by term and piece
    # offset: the merge applies them instead of drawing (and for della ranking) again.
    masks: list[dict[int, np.ndarray]] | None = None


# Parameters up to this many entries keep their random drops' masks between the rescale
# pass and the merge (an eighth of a byte an entry and term); larger ones draw again.
_MASKED_ENTRIES = 1 << 26

# (offset of a piece's first entry in the parameter, the base's float32 values over it,
# each term's float32 tau over it); the tau arrays may be consumed.
Parts = Callable[[], Iterator[tuple[int, np.ndarray, list[np.ndarray]]]]
# Each present term's cut at the given rank from the top (None: no cut wanted, and None
# comes back).
Select = Callable[[list["int | None"]], list["RankCut | None"]]


def needs_plan(options: MergeOptions, term_indices: list[int]) -> bool:
    """Whether the method needs a pass over the whole parameter before merging it."""
    if options.traits.mix not in ("sum", "consensus"):
        return True
    return any(options.sparsifies(index) and (
        options.traits.sparsify in ("magnitude", "outliers") or options.rescales)
        for index in term_indices)


def parameter_plan(name: str, options: MergeOptions, shape: tuple[int, ...], row_entries: int,
                   term_indices: list[int], weights: list[float], parts: Parts,
                   select: Select) -> ParameterPlan:
    """The plan of a parameter of `shape`: `parts()` yields its pieces afresh on each
    call, and `select(ks)` finds each present term's cut at rank k. `weights` are every
    term's, by position. (A NaN or inf goes through silently here too: the merge's one
    check finds it.)"""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _plan(name, options, shape, row_entries, term_indices, weights, parts, select)


def _plan(name: str, options: MergeOptions, shape: tuple[int, ...], row_entries: int,
          term_indices: list[int], weights: list[float], parts: Parts,
          select: Select) -> ParameterPlan:
    plan = ParameterPlan()
    kind = options.traits.sparsify
    count = math.prod(shape)
    if options.traits.mix not in ("sum", "consensus"):
        sums = gram_sums(options, shape, term_indices, len(weights), parts())
        plan.mix = mix_of(options, sums, weights, term_indices, name)
        return plan
    trimmed = [options.sparsifies(i) and options.density_of(i) > 0 for i in term_indices]
    if kind == "magnitude":
        plan.keep = _cuts(select([keep_count(options.density_of(i), count) if trim else None
                                  for i, trim in zip(term_indices, trimmed)]), term_indices,
                          options)
    elif kind == "outliers":
        ranks = [_outlier_ranks(count, options.density_of(i), options.gamma_of(i))
                 if trim else (0, 0) for i, trim in zip(term_indices, trimmed)]
        plan.keep = _cuts(select([kept + dropped if kept else None for kept, dropped in ranks]),
                          term_indices, options)
        if any(dropped for _, dropped in ranks):
            plan.drop = [cut or _nothing() for cut in
                         select([dropped if kept and dropped else None
                                 for kept, dropped in ranks])]
    if options.rescales and any(trimmed):
        plan.scales = _l1_scales(name, options, count, row_entries, term_indices, parts, plan)
    return plan


def _cuts(found: list[RankCut | None], term_indices: list[int], options: MergeOptions
          ) -> list[RankCut]:
    """The cuts of every present term: where none was wanted, the term keeps all of its
    entries (density 1) or none (density 0)."""
    return [cut if cut is not None
            else (_nothing() if options.density_of(index) == 0 else _everything())
            for cut, index in zip(found, term_indices)]


def keep_count(density: float, count: int) -> int:
    """How many entries ties keeps: int(density * n), at least one (as mergekit)."""
    return max(1, int(density * count))


def _outlier_ranks(count: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' (entries kept, largest entries dropped above them), as mergekit:
    int(density * n) kept, int(gamma * n) dropped unless that leaves too few below."""
    kept, dropped = int(density * count), int(gamma * count)
    return kept, min(dropped, count - kept)


def _l1_scales(name: str, options: MergeOptions, count: int, row_entries: int,
               term_indices: list[int], parts: Parts, plan: ParameterPlan) -> list[np.float32]:
    """Each term's ||tau||_1 / ||sparsified tau||_1 (1 where either is below 1e-7, as
    mergekit), the sparsification done exactly as the merge will do it; the random
    drops' masks are kept for the merge unless the parameter is too large for that."""
    before = [0.0] * len(term_indices)
    after = [0.0] * len(term_indices)
    masks: list[dict[int, np.ndarray]] = [{} for _ in term_indices]
    random = options.traits.sparsify in ("random", "della")
    keeps_masks = random and count <= _MASKED_ENTRIES
    # The trims' cuts count the tied entries they take: the pass takes its own copies.
    pass_plan = ParameterPlan(
        keep=[replace(cut) for cut in plan.keep] if plan.keep else None,
        drop=[replace(cut) for cut in plan.drop] if plan.drop else None)
    workspace = Workspace()
    for offset, _, deltas in parts():
        for term, (delta, index) in enumerate(zip(deltas, term_indices)):
            if not options.sparsifies(index) or options.density_of(index) == 0:
                continue
            keep = _kept(delta, term, name, index, offset, row_entries, options, pass_plan,
                         workspace)
            magnitude = np.abs(delta, out=delta)
            before[term] += float(np.add.reduce(magnitude, dtype=np.float64))
            magnitude *= keep
            after[term] += float(np.add.reduce(magnitude, dtype=np.float64))
            if keeps_masks:
                masks[term][offset] = np.packbits(keep)
    if keeps_masks:
        plan.masks = masks
    return [np.float32(1) if b < 1e-7 or a < 1e-7 else np.float32(b / a)
            for b, a in zip(before, after)]


def merged_delta(name: str, deltas: list[np.ndarray], weights: list[float],
                 term_indices: list[int], options: MergeOptions,
                 plan: ParameterPlan | None = None, offset: int = 0,
                 row_entries: int | None = None, term_count: int | None = None,
                 workspace: Workspace | None = None, base: np.ndarray | None = None,
                 all_weights: list[float] | None = None) -> np.ndarray:
    """The delta to add to base parameter `name`, or to a piece of it.

    `deltas` (float32 arrays of one shape, consumed) and `weights` cover the terms that have
    this parameter; `term_indices` are those terms' positions in the composition, of
    `term_count` terms (default: these), whose weights are `all_weights` (default: these,
    1 for the others). A piece of a parameter passes the parameter's `plan` (see
    parameter_plan) and the index of its first entry in the parameter as `offset`;
    without a plan the deltas are the whole parameter. Rows (della's ranks) are
    `row_entries` long; default: the last axis. The methods that mix the models' weights
    (linear without normalize, slerp, karcher) need the `base`'s values over the same
    entries. The result may live in `workspace` or in one of the deltas.

    A NaN or inf in a delta goes through as arithmetic makes it, silently: the caller
    checks the merged values once and says which input held it."""
    workspace = workspace or Workspace()
    row_entries = row_entries or (deltas[0].shape[-1] if deltas[0].ndim else 1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if plan is None:
            if all_weights is None:
                all_weights = [1.0] * (term_count or len(deltas))
                for index, weight in zip(term_indices, weights):
                    all_weights[index] = weight
            plan = _plan_of_arrays(name, deltas, term_indices, all_weights, row_entries,
                                   options, base)
        for term, (delta, index) in enumerate(zip(deltas, term_indices)):
            _sparsify_(delta, term, name, index, offset, row_entries, options, plan, workspace)
            if plan.scales is not None:
                delta *= plan.scales[term]
        if plan.mix is not None:
            return plan.mix.apply(deltas, base, offset)
        if options.traits.consensus:
            mixed = _consensus_mix(deltas, weights, options.normalizes, workspace)
        else:
            mixed = _weighted_sum(deltas, weights)
            # linear mixes models, and a model without this parameter has the base's
            counted = all_weights if options.traits.on_weights and all_weights else weights
            total = np.float32(sum(np.float32(w) for w in counted))
            if options.normalizes:  # as mergekit: a sum of weights near 0 counts as 1
                if abs(total) >= 1e-8:
                    mixed /= total
            elif options.traits.on_weights and total != 1:
                # linear mixes the weights: sum_i w_i (base + tau_i) = base + the sum of
                # w_i tau_i + (sum_i w_i - 1) base
                if base is None:
                    raise AssertionError("linear without normalize needs the base's values")
                mixed += base * (total - np.float32(1))
        if options.lambda_ != 1:
            mixed *= np.float32(options.lambda_)
        return mixed


def _plan_of_arrays(name: str, deltas: list[np.ndarray], term_indices: list[int],
                    weights: list[float], row_entries: int, options: MergeOptions,
                    base: np.ndarray | None) -> ParameterPlan:
    if not needs_plan(options, term_indices):
        return ParameterPlan()
    flat = [delta.reshape(-1) for delta in deltas]
    flat_base = (np.zeros(flat[0].size, np.float32) if base is None else base.reshape(-1))
    return parameter_plan(
        name, options, deltas[0].shape, row_entries, term_indices, weights,
        lambda: iter([(0, flat_base, [values.copy() for values in flat])]),
        lambda ks: [None if k is None else rank_cut(np.abs(values), k)
                    for values, k in zip(flat, ks)])


def _sparsify_(delta: np.ndarray, term: int, name: str, term_index: int, offset: int,
               row_entries: int, options: MergeOptions, plan: ParameterPlan,
               workspace: Workspace) -> None:
    """Sparsify one term's tau over one piece, in place (no rescale)."""
    if not options.sparsifies(term_index):
        return
    if options.density_of(term_index) == 0:  # as mergekit: nothing is kept
        delta.fill(0)
        return
    delta *= _kept(delta, term, name, term_index, offset, row_entries, options, plan, workspace)


def _kept(delta: np.ndarray, term: int, name: str, term_index: int, offset: int,
          row_entries: int, options: MergeOptions, plan: ParameterPlan,
          workspace: Workspace) -> np.ndarray:
    """Which entries of one term's tau over one piece its sparsification keeps."""
    if plan.masks is not None:
        kept = np.unpackbits(plan.masks[term][offset], count=delta.size)
        return kept.view(np.bool_).reshape(delta.shape)
    if options.traits.sparsify in ("random", "della"):
        return _random_keep(delta, name, term_index, offset, row_entries, options)
    magnitude = np.abs(delta, out=workspace.array("magnitude", delta.shape))
    tied = workspace.array("tied", delta.shape, np.bool_)
    kept = plan.keep[term].select(magnitude, workspace.array("kept", delta.shape, np.bool_), tied)
    if plan.drop is not None:  # breadcrumbs: keep those below the outlier cut only
        outlier = plan.drop[term].select(
            magnitude, workspace.array("outlier", delta.shape, np.bool_), tied)
        np.greater(kept, outlier, out=kept)
    return kept


def _random_keep(delta: np.ndarray, name: str, term_index: int, offset: int,
                 row_entries: int, options: MergeOptions) -> np.ndarray:
    """Which entries of a piece of tau a random drop keeps (dare: each with probability
    `density`; della: by `della_keep_probabilities`), seeded by the piece."""
    generator = np.random.default_rng(_seed_for(options.seed, name, term_index, offset))
    density = options.density_of(term_index)
    if options.traits.sparsify == "della":
        rows = delta.reshape(-1, row_entries)
        probability = della_keep_probabilities(rows, density, options.epsilon_of(term_index))
        return (generator.random(rows.shape, dtype=np.float32) < probability).reshape(delta.shape)
    # Raw 32-bit draws below density * 2^32 (exact to 2^-32): twice as fast as floats.
    raw = generator.bit_generator.random_raw((delta.size + 1) // 2)
    return (raw.view(np.uint32)[:delta.size] < np.uint32(int(density * 2**32))
            ).reshape(delta.shape)


def della_keep_probabilities(rows: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Per entry of each row of m: density - epsilon + 2 epsilon r / (m - 1), r its rank
    by magnitude (0 the smallest; of equal magnitudes the earlier ranks higher)."""
    row_entries = rows.shape[1]
    # One sort of distinct keys per row: the magnitude's bits (which order as the
    # magnitudes do) above the column counted from the end, so that of equal magnitudes
    # the earlier sorts later, i.e. ranks higher. (Faster than a stable argsort.)
    columns_from_end = np.arange(row_entries - 1, -1, -1, dtype=np.uint64)
    keys = np.abs(rows).view(np.uint32).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= columns_from_end[None, :]
    keys.sort(axis=1)
    columns = (np.uint64(row_entries - 1) - (keys & np.uint64(0xFFFFFFFF))).astype(np.intp)
    share = np.empty(rows.shape, np.float32)
    steps = np.arange(row_entries, dtype=np.float32) / np.float32(max(row_entries - 1, 1))
    np.put_along_axis(share, columns, steps[None, :], axis=1)
    return np.float32(density - epsilon) + share * np.float32(2 * epsilon)


def _weighted_sum(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    total = deltas[0]
    total *= np.float32(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        delta *= np.float32(weight)
        total += delta
    return total


def _consensus_mix(deltas: list[np.ndarray], weights: list[float], normalize: bool,
                   workspace: Workspace) -> np.ndarray:
    # Weights are applied before summing, and sums add in term order, as mergekit does:
    # the same roundings, so the elected signs agree even where the mass is nearly 0.
    # (Masks are multiplied in rather than used as `where=`: a mask that follows the data
    # makes numpy's masked loops branch unpredictably, many times slower.)
    shape = deltas[0].shape
    scratch, mass = workspace.array("scratch", shape), workspace.array("mass", shape)
    kept = workspace.array("kept", shape, np.bool_)
    mass.fill(0)
    for delta, weight in zip(deltas, weights):
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


def trim_to_top_(delta: np.ndarray, density: float) -> None:
    """Zero all but the `keep_count(density, n)` entries ranked first (by magnitude,
    then position), in place."""
    if density >= 1 or delta.size == 0:
        return
    magnitude = np.abs(delta)
    kept = rank_cut(magnitude.reshape(-1), keep_count(density, delta.size)).select(
        magnitude, np.empty(delta.shape, np.bool_), np.empty(delta.shape, np.bool_))
    delta *= kept


def rank_cut(values: np.ndarray, k: int) -> RankCut:
    """The cut below the k largest of a 1-D array of magnitudes (k >= 1), by introselect."""
    position = values.size - k
    partitioned = np.partition(values, position)
    threshold = partitioned[position]
    above = int(np.count_nonzero(partitioned[position + 1:] > threshold))
    return RankCut(threshold, k - above)


def kth_largest_of_parts(parts: Callable[[], Iterator[list[np.ndarray]]], count: int,
                         ks: list[int], samples: list[np.ndarray]) -> list[RankCut]:
    """The cut at the k-th largest (its own k) of each of several series of `count` non-negative
    float32 values that come in parts: `parts()` yields, afresh on each call, a list
    holding the next part of every series. O(n), in the memory of one part per series.

    Quantiles of each series' sample (values drawn from all its parts) bracket its
    answer; one pass counts what lies above each bracket and keeps what lies inside,
    and an exact selection among those finishes. Where a sample misjudged its bracket,
    a radix selection on the float bit patterns (three histogram passes) finds it.
    """
    brackets = [_bracket(sample, count, k) for sample, k in zip(samples, ks)]
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
        wanted = ks[series] - above[series]  # the answer's rank from the top among candidates
        if kept is not None and 1 <= wanted <= candidates.size:
            answers.append(rank_cut(candidates, wanted))
        else:
            answers.append(_radix_select(
                lambda series=series: (part[series] for part in parts()), ks[series]))
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


def _radix_select(parts: Callable[[], Iterator[np.ndarray]], k: int) -> RankCut:
    # Non-negative float32 values order like their bit patterns read as integers: fix
    # the 31 value bits 11, 10 and 10 at a time, each by a histogram of the entries
    # that match the bits fixed so far. What is left to take among the entries equal to
    # the answer is the number of ties the cut takes.
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
    return RankCut(np.array([prefix], np.uint32).view(np.float32)[0], remaining)


def _seed_for(seed: int, name: str, term_index: int, offset: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{term_index}\0{offset}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
