"""Task vectors: tau = W_finetuned - W_base, as a safetensors file.

Only parameters that differ are stored, in float32 (the difference of two bfloat16 or
float16 values is exact in float32). The header metadata says where the vector came
from: the base folder with its fingerprint (`base_fingerprint`: the spec's model
fingerprint in a build, else the content sha256), the fine-tuned folder with its content
sha256, the method and the source (the behavior or file it stands for). Applying vectors is a composition with
`task_arithmetic` (`behaviorc.compose.composition`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from behaviorc import __version__
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.atomic import atomic_file
from behaviorc.formats.safetensors_io import (
    STORAGE, PlannedTensor, StreamWriter, TensorInfo, WeightFolder, computable,
    content_sha256, row_blocks)
from behaviorc.compose.sources import (
    TaskVectorSource, check_finite, check_same_parameters, check_stored_finite)

FORMAT = "behaviorc.task_vector/1"


def extract_task_vector(base_dir: Path, finetuned_dir: Path, out_file: Path, *,
                        source: str = "", base_fingerprint: str = "", overwrite: bool = False,
                        metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write tau for a fine-tuned folder against its base; returns the file's metadata
    with its own `sha256` added."""
    with WeightFolder(base_dir) as base, WeightFolder(finetuned_dir) as finetuned:
        check_same_parameters(base, finetuned)
        ordered = sorted(base.tensors.values(), key=lambda info: (info.file, info.offset))
        changed = [info for info in ordered if _differs(info, base, finetuned)]
        header = {
            "format": FORMAT,
            "method": "difference",
            "source": source,
            "base": str(Path(base_dir).resolve()),
            "base_fingerprint": base_fingerprint or content_sha256(Path(base_dir)),
            "finetuned": str(Path(finetuned_dir).resolve()),
            "finetuned_sha256": content_sha256(Path(finetuned_dir)),
            "tensors": str(len(changed)),
            "behaviorc_version": __version__,
            **(metadata or {}),
        }
        plan = [PlannedTensor(info.name, _vector_dtype(info, finetuned.tensors[info.name]),
                              info.shape) for info in changed]
        with atomic_file(out_file, overwrite=overwrite) as staging:
            writer = StreamWriter(staging.parent, [(staging.name, plan)], header)
            try:
                for planned in plan:
                    writer.write(planned.name, _differences(planned, base, finetuned))
                writer.finish()
            finally:
                writer.close()
            digest = writer.sha256[staging.name]
    return {**header, "sha256": digest}


def _differs(info: TensorInfo, base: WeightFolder, finetuned: WeightFolder) -> bool:
    """Whether a parameter changed; a changed integer parameter cannot be a vector."""
    tuned_info = finetuned.tensors[info.name]
    dtype = _vector_dtype(info, tuned_info)
    for rows in row_blocks(info):
        tuned, original = finetuned.read(info.name, rows), base.read(info.name, rows)
        if not info.is_float:
            if tuned_info.dtype != info.dtype or not np.array_equal(tuned, original):
                raise BehaviorError(
                    f"{finetuned.path}: non-floating-point tensor `{info.name}` differs from "
                    "the base; it cannot be expressed as a task vector")
            continue
        tuned = _as_vector_dtype(tuned, tuned_info.dtype, dtype)
        check_finite(tuned, info.name, finetuned.path)
        if not np.array_equal(tuned, _as_vector_dtype(original, info.dtype, dtype)):
            return True
    return False


def _differences(planned: PlannedTensor, base: WeightFolder,
                 finetuned: WeightFolder) -> Iterator[np.ndarray]:
    info, tuned_info = base.tensors[planned.name], finetuned.tensors[planned.name]
    for rows in row_blocks(info):
        tau = _as_vector_dtype(finetuned.read(planned.name, rows), tuned_info.dtype, planned.dtype)
        check_finite(tau, planned.name, finetuned.path)  # also the rows after a change
        yield np.subtract(tau, _as_vector_dtype(base.read(planned.name, rows), info.dtype,
                                                planned.dtype), out=tau)


def _as_vector_dtype(stored: np.ndarray, dtype: str, vector_dtype: str) -> np.ndarray:
    """Stored float values in the vector's dtype (F32 or F64; exact from narrower kinds)."""
    return computable(stored, dtype).astype(STORAGE[vector_dtype], copy=False)


def _vector_dtype(base_info: TensorInfo, tuned_info: TensorInfo) -> str:
    return "F64" if "F64" in (base_info.dtype, tuned_info.dtype) else "F32"


def check_task_vector(path: Path, base_dir: Path) -> dict[str, str]:
    """Check a task-vector file against a base (names, shapes, dtypes, finite values);
    returns its metadata."""
    source = TaskVectorSource(Path(path))
    try:
        with WeightFolder(base_dir) as base:
            source.check_against(base)
            for name in source.tensors:
                check_stored_finite(source.file.read(name), source.tensors[name].dtype, name,
                                    source.path)
        return dict(source.metadata)
    finally:
        source.close()


def describe_task_vector(path: Path) -> dict[str, Any]:
    """What a task-vector file holds: its metadata, and its tensors by parameter group."""
    from behaviorc.model.adapter import group_of

    source = TaskVectorSource(Path(path))
    try:
        groups: dict[str, int] = {}
        for name, info in source.tensors.items():
            group = group_of(name) or "other"
            groups[group] = groups.get(group, 0) + info.numel
        return {"path": str(path), "metadata": dict(source.metadata),
                "tensors": len(source.tensors),
                "entries_by_group": dict(sorted(groups.items()))}
    finally:
        source.close()
