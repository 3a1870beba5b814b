"""W_base + merge(w_i * tau_i) as a new Hugging Face model folder, streamed.

One parameter name at a time: read it from the base and from every term, merge, write
it to the output shard, forget it. A large parameter goes in blocks of rows (what a
method needs of the whole parameter, a trim's cuts, rescale factors, Model Stock's
cosines, is found first in a pass over its blocks), so peak memory is a few blocks per term plus a constant, whatever the size of
the model or of its largest parameter. Blocks are read one ahead by a thread; within a
block the arithmetic goes a cache-sized piece at a time, so that its handful of passes
run over data the CPU already holds. The folder is built beside the target and renamed
into place when complete, with the base's config, generation config and tokenizer
files, the provenance (`behaviorc.json`) and the same composition as mergekit YAML.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.atomic import atomic_folder
from behaviorc.compose.merge import (
    MergeOptions, ParameterPlan, RankCut, Workspace, kth_largest_of_parts, merged_delta,
    needs_plan, parameter_plan)
from behaviorc.compose.mergekit_yaml import mergekit_yaml
from behaviorc.core.merge_methods import terms_problem
from behaviorc.formats.safetensors_io import (
    FLOAT_DTYPES, INDEX_FILE, PlannedTensor, StreamWriter, TensorInfo, WeightFolder,
    content_sha256, from_float32, plan_shards, row_blocks, to_float32, write_index)
from behaviorc.compose.sources import DeltaSource, check_finite, open_source
from behaviorc.core.files import PROVENANCE_FILE

MERGEKIT_FILE = "mergekit.yaml"
# Entries sampled to bracket a ties threshold (a smaller parameter is selected directly).
_SAMPLE_ENTRIES = 1 << 15
# Entries merged at a time: the merge's few float32 arrays of this many entries stay in
# the CPU's cache between its passes. Pieces are whole rows (della ranks within rows) and
# start at fixed places in the parameter, whatever the blocks, so the random drops
# (seeded per piece) do not depend on them.
_PIECE_ENTRIES = 1 << 17
# Files of a model folder that are its weights or describe them; everything else
# (config, generation config, tokenizer, chat template) is copied from the base.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_COPIED_NAMES = frozenset({INDEX_FILE, "pytorch_model.bin.index.json", PROVENANCE_FILE,
                               MERGEKIT_FILE})


@dataclass(frozen=True)
class Term:
    """One term of a composition: where its vector is and how much of it to add."""

    label: str  # the behavior's name
    path: Path  # a task-vector file or a fine-tuned model folder
    weight: float
    sha256: str = ""  # computed when empty


@dataclass(frozen=True)
class Composition:
    """What a composed folder is made of; written to its `behaviorc.json`."""

    base: Path
    terms: tuple[Term, ...]
    options: MergeOptions
    name: str = ""
    expression: str = ""
    spec_path: str = ""
    spec_sha256: str = ""
    base_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def compose(composition: Composition, out: Path, *, max_shard_bytes: int | None = None,
            overwrite: bool = False,
            progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Write the composed model folder `out`; returns its provenance record."""
    if not composition.terms:
        raise BehaviorError("a composition needs at least one term")
    options = composition.options
    problem = terms_problem(options.method, [t.weight for t in composition.terms],
                            options.normalizes)
    if problem:
        raise BehaviorError(problem[0], hint=problem[1])
    if options.terms and len(options.terms) != len(composition.terms):
        raise AssertionError("per-term merge settings must align with the terms")
    hasher = ThreadPoolExecutor(max_workers=1)
    with WeightFolder(composition.base) as base:
        sources: list[DeltaSource] = []
        try:
            # Hashing the inputs for provenance reads them once more; hashlib releases the
            # GIL, so it overlaps the merge instead of adding to it.
            hashes = _start_fingerprints(composition, hasher)
            for term in composition.terms:
                source = open_source(term.path)
                sources.append(source)
                source.check_against(base)
            alone = _base_factor(composition)
            merged = _parameters_to_merge(base, sources, composition.options.groups,
                                          every=alone is not None)
            plan = [PlannedTensor(info.name, info.dtype, info.shape)
                    for info in sorted(base.tensors.values(), key=lambda i: (i.file, i.offset))]
            shards = plan_shards(plan, max_shard_bytes)
            with atomic_folder(out, overwrite=overwrite) as staging:
                writer = StreamWriter(staging, shards, {"behaviorc": "composed"}, hashed=False)
                reader = _BlockReader(base, sources, [
                    (planned.name, rows, _terms_having(planned.name, sources, merged))
                    for planned in plan for rows in row_blocks(base.tensors[planned.name])])
                workspace = Workspace()
                try:
                    for done, planned in enumerate(plan):
                        if progress is not None:
                            progress(done, len(plan), planned.name)
                        writer.write(planned.name, _output_parts(
                            planned.name, base, sources, composition, reader, workspace,
                            alone if planned.name in merged else None))
                    writer.finish()
                finally:
                    reader.close()
                    writer.close()
                write_index(staging, shards)
                _copy_model_files(composition.base, staging)
                record = provenance(composition, sources,
                                    {path: job.result() for path, job in hashes.items()},
                                    len(merged), len(shards), _float_dtype(base))
                (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
                (staging / MERGEKIT_FILE).write_text(mergekit_yaml(record))
        finally:
            hasher.shutdown(wait=False, cancel_futures=True)
            for source in sources:
                source.close()
    return record


def _start_fingerprints(composition: Composition, hasher: ThreadPoolExecutor
                        ) -> dict[str, Future[str]]:
    known = {str(term.path): term.sha256 for term in composition.terms if term.sha256}
    if composition.base_fingerprint:
        known[str(composition.base)] = composition.base_fingerprint
    jobs: dict[str, Future[str]] = {}
    for path in [composition.base, *(term.path for term in composition.terms)]:
        job: Future[str] = Future()
        if str(path) in known:
            job.set_result(known[str(path)])
        else:
            job = hasher.submit(content_sha256, Path(path))
        jobs[str(path)] = job
    return jobs


def _base_factor(composition: Composition) -> float | None:
    """What a parameter no term changes is multiplied by, where that is not 1: `linear`
    without normalize mixes sum_i w_i (base + tau_i), so the base alone is scaled too."""
    options = composition.options
    total = sum(term.weight for term in composition.terms)
    if options.traits.on_weights and options.traits.mix == "sum" and not options.normalizes:
        return total if total != 1 else None
    return None


def _parameters_to_merge(base: WeightFolder, sources: Sequence[DeltaSource],
                         groups: tuple[str, ...], every: bool = False) -> set[str]:
    """Float parameters that some term changes (`every`: all of them), narrowed to
    `groups` when given."""
    touched = {name for source in sources for name in source.tensors
               if base.tensors[name].is_float}
    if every:
        touched = {name for name, info in base.tensors.items() if info.is_float}
    if not groups:
        return touched
    from behaviorc.model.adapter import check_groups, group_of

    wanted = set(check_groups(groups))
    selected = {name for name in touched if group_of(name) in wanted}
    if not selected:
        raise BehaviorError(
            f"no parameter the terms change is in the groups {', '.join(groups)}",
            hint="check the groups against the model's architecture (gdn.* needs a GDN model)")
    return selected


def _terms_having(name: str, sources: Sequence[DeltaSource], merged: set[str]) -> list[int]:
    """The terms that take part in parameter `name`'s merge (none: it is the base's)."""
    if name not in merged:
        return []
    return [i for i, source in enumerate(sources) if name in source.tensors]


class _BlockReader:
    """The stored values of every block of the output, in order, from the base and the
    terms that take part: read one block ahead by a thread (a positioned read lets
    other threads run), so reading overlaps merging, into two sets of buffers that take
    turns and are reused, so no block needs fresh memory."""

    def __init__(self, base: WeightFolder, sources: Sequence[DeltaSource],
                 schedule: list[tuple[str, tuple[int, int] | None, list[int]]]):
        self._inputs: list[WeightFolder | DeltaSource] = [base, *sources]
        self._schedule = schedule
        self._buffers = [[np.empty(0, np.uint8) for _ in self._inputs] for _ in range(2)]
        self._thread = ThreadPoolExecutor(max_workers=1)
        self._position = 0
        self._pending = self._start(0)

    def next_terms(self) -> list[int]:
        """The terms taking part in the merge of the next block."""
        return self._schedule[self._position][2]

    def next(self, name: str, rows: tuple[int, int] | None
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The next block, which is `rows` of `name`: the base's values and those of the
        terms taking part. They are valid until the next call but one."""
        if self._pending is None or self._schedule[self._position][:2] != (name, rows):
            raise AssertionError(f"block {name} {rows} read out of order")
        values = self._pending.result()
        self._position += 1
        self._pending = self._start(self._position)
        return values

    def _start(self, position: int) -> Future[tuple[np.ndarray, list[np.ndarray]]] | None:
        if position == len(self._schedule):
            return None
        return self._thread.submit(self._read, position)

    def _read(self, position: int) -> tuple[np.ndarray, list[np.ndarray]]:
        name, rows, terms = self._schedule[position]
        buffers = self._buffers[position % 2]
        values = []
        for slot in [0, *(1 + term for term in terms)]:
            info = self._inputs[slot].tensors[name]
            size = info.nbytes_of(rows)
            if buffers[slot].size < size:
                buffers[slot] = np.empty(size, np.uint8)
            values.append(self._inputs[slot].read(name, rows, buffers[slot]))
        return values[0], values[1:]

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def _output_parts(name: str, base: WeightFolder, sources: Sequence[DeltaSource],
                  composition: Composition, reader: _BlockReader, workspace: Workspace,
                  alone: float | None = None) -> Iterator[np.ndarray]:
    """The output parameter, as consecutive blocks of rows (one block when small); one
    that no term changes is the base's, times `alone` when given. A block is valid until
    the next one is asked for."""
    info = base.tensors[name]
    blocks = row_blocks(info)
    present = reader.next_terms()
    if not present:
        for rows in blocks:
            stored = reader.next(name, rows)[0]
            if alone is None:
                yield stored
                continue
            values = to_float32(stored.reshape(-1), info.dtype,
                                workspace.array("base", stored.size))
            values *= np.float32(alone)
            yield from_float32(values, info.dtype, workspace.array(
                "output", stored.size, stored.dtype)).reshape(stored.shape)
        return
    options = composition.options
    terms = [sources[i] for i in present]
    all_weights = [term.weight for term in composition.terms]
    weights = [all_weights[i] for i in present]
    plan = None
    for rows in blocks:
        base_stored, stored = reader.next(name, rows)
        if plan is None:
            plan = _parameter_plan(name, base, terms, present, all_weights, options,
                                   blocks, (base_stored, stored), workspace)
        yield _merged_block(name, info, base_stored, terms, stored, weights, present,
                            all_weights, options, plan,
                            rows[0] * info.row_entries if rows else 0, workspace)


def _merged_block(name: str, info: TensorInfo, base_stored: np.ndarray,
                  terms: Sequence[DeltaSource], stored: list[np.ndarray], weights: list[float],
                  term_indices: list[int], all_weights: list[float], options: MergeOptions,
                  plan: ParameterPlan, first_entry: int, workspace: Workspace) -> np.ndarray:
    """base + merged delta for one block (`first_entry` is its place in the parameter),
    in the base's dtype."""
    dtype = info.dtype
    flat_base, flat_stored = base_stored.reshape(-1), [values.reshape(-1) for values in stored]
    out = workspace.array("output", flat_base.size, flat_base.dtype)
    for piece, base_values, deltas in _piece_deltas(name, info, flat_base, terms, flat_stored,
                                                    first_entry, workspace, "delta"):
        size = piece.stop - piece.start
        mixed = merged_delta(name, deltas, weights, term_indices, options, plan,
                             offset=first_entry + piece.start, row_entries=_ranked_row(info),
                             term_count=len(all_weights), workspace=workspace,
                             base=base_values, all_weights=all_weights)
        merged = np.add(base_values, mixed, out=mixed)
        with np.errstate(over="ignore", invalid="ignore"):
            if not math.isfinite(np.add.reduce(merged)):
                _check_terms_finite(name, terms, [values[piece] for values in flat_stored],
                                    base_values)
        from_float32(merged, dtype, out[piece], workspace.array("rounding", size, np.uint32))
    return out.reshape(base_stored.shape)


def _check_terms_finite(name: str, terms: Sequence[DeltaSource], stored: list[np.ndarray],
                        base_values: np.ndarray) -> None:
    """Blame the term whose delta holds a NaN or inf. (A merge of finite deltas can still
    overflow, or the base hold a NaN: then the result is written as computed.)"""
    for term, values in zip(terms, stored):
        check_finite(term.delta(name, values, base_values), name, term.path)


def _piece_deltas(name: str, info: TensorInfo, flat_base: np.ndarray,
                  terms: Sequence[DeltaSource], flat_stored: list[np.ndarray], first_entry: int,
                  workspace: Workspace, label: str
                  ) -> Iterator[tuple[slice, np.ndarray, list[np.ndarray]]]:
    """Per piece of a flat block: its slice, the base as float32 and each term's tau (in
    `workspace` arrays named by `label`, valid until the next piece)."""
    for piece in _pieces(first_entry, flat_base.size, _ranked_row(info)):
        size = piece.stop - piece.start
        base_values = to_float32(flat_base[piece], info.dtype, workspace.array("base", size))
        yield piece, base_values, [term.delta(name, values[piece], base_values,
                                              workspace.array(f"{label} {index}", size))
                                   for index, (term, values) in enumerate(zip(terms, flat_stored))]


def _ranked_row(info: TensorInfo) -> int:
    """The entries of a row as della ranks them (as mergekit): a 1-D tensor is one row."""
    return info.numel if len(info.shape) < 2 else info.row_entries


def _pieces(first_entry: int, count: int, row_entries: int) -> Iterator[slice]:
    """Slices of a block of `count` entries (whole rows), cut where the parameter's
    entry index is a multiple of the piece size: as many whole rows as fit in
    _PIECE_ENTRIES, at least one."""
    step = max(1, _PIECE_ENTRIES // row_entries) * row_entries
    start = 0
    while start < count:
        stop = min(count, ((first_entry + start) // step + 1) * step - first_entry)
        yield slice(start, stop)
        start = stop


def _parameter_plan(name: str, base: WeightFolder, terms: Sequence[DeltaSource],
                    term_indices: list[int], weights: list[float], options: MergeOptions,
                    blocks: list[tuple[int, int] | None],
                    first_block: tuple[np.ndarray, list[np.ndarray]], workspace: Workspace
                    ) -> ParameterPlan:
    """What the merge of parameter `name` needs from all of it (see merge.parameter_plan):
    found in passes over its blocks (over the block already read, when it is one) before
    any of it is merged."""
    if not needs_plan(options, term_indices):
        return ParameterPlan()
    info = base.tensors[name]

    def read(rows: tuple[int, int] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        if len(blocks) == 1:
            return first_block
        return base.read(name, rows), [term.read(name, rows) for term in terms]

    def parts() -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
        for rows in blocks:
            base_stored, stored = read(rows)
            first_entry = rows[0] * info.row_entries if rows else 0
            for piece, base_values, deltas in _piece_deltas(
                    name, info, base_stored.reshape(-1), terms,
                    [values.reshape(-1) for values in stored], first_entry, workspace, "plan"):
                yield first_entry + piece.start, base_values, deltas

    samples: list[np.ndarray] = []

    def select(ks: list[int | None]) -> list[RankCut | None]:
        wanted = [series for series, k in enumerate(ks) if k is not None]
        if not wanted:
            return [None] * len(ks)
        if not samples:
            samples.extend(_samples(name, info, base, terms, blocks, read))

        def magnitudes() -> Iterator[list[np.ndarray]]:
            for _, _, deltas in parts():
                yield [np.abs(deltas[series], out=deltas[series]) for series in wanted]

        found = kth_largest_of_parts(magnitudes, info.numel, [ks[s] for s in wanted],
                                     [samples[s] for s in wanted])
        cuts: list[RankCut | None] = [None] * len(ks)
        for series, cut in zip(wanted, found):
            cuts[series] = cut
        return cuts

    return parameter_plan(name, options, info.shape, _ranked_row(info), term_indices,
                          weights, parts, select)


def _samples(name: str, info: TensorInfo, base: WeightFolder, terms: Sequence[DeltaSource],
             blocks: list[tuple[int, int] | None],
             read: Callable[[tuple[int, int] | None], tuple[np.ndarray, list[np.ndarray]]]
             ) -> list[np.ndarray]:
    """Each term's |tau| at about _SAMPLE_ENTRIES entries spread over the parameter (all
    of a smaller one): in one block, every stride-th entry; over blocks, whole rows
    spread evenly (cheap to read)."""
    if len(blocks) == 1:
        base_stored, stored = read(None)
        stride = max(1, base_stored.size // _SAMPLE_ENTRIES)
        return _sample(name, info, base_stored.reshape(-1)[::stride],
                       terms, [values.reshape(-1)[::stride] for values in stored])
    rows = info.shape[0]
    wanted_rows = max(1, min(rows, _SAMPLE_ENTRIES // info.row_entries))
    picked = sorted({round(i * (rows - 1) / max(1, wanted_rows - 1)) for i in range(wanted_rows)})
    sampled = [_sample(name, info, base.read(name, (row, row + 1)), terms,
                       [term.read(name, (row, row + 1)) for term in terms]) for row in picked]
    return [np.concatenate(series) for series in zip(*sampled)]


def _sample(name: str, info: TensorInfo, base_stored: np.ndarray,
            terms: Sequence[DeltaSource], stored: list[np.ndarray]) -> list[np.ndarray]:
    """Each term's |tau| over the given entries, flat, in arrays of their own."""
    base_values = to_float32(np.ascontiguousarray(base_stored).reshape(-1), info.dtype,
                             np.empty(base_stored.size, np.float32))
    return [np.abs(term.delta(name, np.ascontiguousarray(values).reshape(-1), base_values,
                              np.empty(base_values.size, np.float32)))
            for term, values in zip(terms, stored)]


def _copy_model_files(base: Path, staging: Path) -> None:
    for item in sorted(base.iterdir()):
        if (item.is_file() and item.name not in _NOT_COPIED_NAMES
                and not item.name.endswith(_NOT_COPIED_SUFFIXES)):
            shutil.copy2(item, staging / item.name)


def provenance(composition: Composition, sources: Sequence[DeltaSource],
               hashes: dict[str, str], merged_count: int, shard_count: int,
               dtype: str) -> dict[str, Any]:
    """The record a composed folder carries: enough to tell what it is and redo it."""
    return {
        "kind": "composed",
        "name": composition.name,
        "expression": composition.expression,
        "spec": {"path": composition.spec_path, "sha256": composition.spec_sha256},
        "base": {"path": str(composition.base),
                 "fingerprint": hashes[str(composition.base)]},
        "terms": [_term_record(term, source, hashes[str(term.path)], own)
                  for term, source, own in zip(composition.terms, sources,
                                               _own_settings(composition.options))],
        "merge": composition.options.describe(),
        "parameters_merged": merged_count,
        "shards": shard_count,
        "dtype": dtype,
        **composition.extra,
    }


def _own_settings(options: MergeOptions) -> Iterator[dict[str, float]]:
    """Each term's own merge settings (none past the given ones)."""
    yield from (settings.given() for settings in options.terms)
    while True:
        yield {}


def _term_record(term: Term, source: DeltaSource, sha256: str, own: dict[str, float]
                 ) -> dict[str, Any]:
    record: dict[str, Any] = {"behavior": term.label, "weight": term.weight,
                              "path": str(term.path), "kind": source.kind, "sha256": sha256,
                              **own}
    # The fine-tuned folder a vector came from, when known: mergekit needs folders.
    model = str(term.path) if source.kind == "model" else source.metadata.get("finetuned")
    if model:
        record["model"] = model
    return record


def _float_dtype(base: WeightFolder) -> str:
    """The torch name of the dtype most of the base's float parameters are stored in."""
    sizes: dict[str, int] = {}
    for info in base.tensors.values():
        if info.is_float:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    stored = max(sizes, key=sizes.__getitem__) if sizes else "F32"
    return FLOAT_DTYPES[stored]
