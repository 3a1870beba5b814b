"""Where a composition term's delta comes from: a task-vector file (tau itself) or a
fine-tuned model folder (tau = W_ft - W_base, computed as each tensor is needed).

Both are checked against the base before anything is written: every tensor must name a
base parameter with the same shape, and carry floating-point values. Values are checked
as they stream, by the composition (a NaN or inf anywhere stops it, and it then leaves
nothing behind).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from behaviorc.core.diagnostics import BehaviorError, did_you_mean
from behaviorc.formats.safetensors_io import (
    SafetensorsFile, TensorInfo, WeightFolder, computable, to_float32)


class DeltaSource(Protocol):
    """Reading is apart from computing the delta, so that the stored values of a block
    can be read ahead (or once) and turned into tau a cache-sized piece at a time."""

    path: Path
    kind: str  # "task_vector" or "model"
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]  # a task-vector file's header metadata; empty for a folder

    def read(self, name: str, rows: tuple[int, int] | None = None,
             into: np.ndarray | None = None) -> np.ndarray:
        """The stored values of base parameter `name` (or of rows [start, stop) of it),
        as `SafetensorsFile.read`. Only called for parameters in `tensors`."""

    def delta(self, name: str, stored: np.ndarray, base: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
        """tau, float32 (in `out` if given), from some of this source's stored values of
        parameter `name` and `base`, the same entries of the base in float32. Not
        checked: NaN and inf pass through."""

    def close(self) -> None: ...


class TaskVectorSource:
    kind = "task_vector"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = SafetensorsFile(self.path)
        self.tensors = self.file.tensors
        self.metadata = dict(self.file.metadata)
        if "base_sha256" in self.metadata:  # the key of task vectors written by older builds
            self.metadata.setdefault("base_fingerprint", self.metadata.pop("base_sha256"))

    def check_against(self, base: WeightFolder) -> None:
        for name, info in self.tensors.items():
            base_info = _base_tensor(base, name, self.path)
            _check_shape(info, base_info, self.path)
            _check_float(info, self.path)
            _check_float(base_info, base.path)

    def read(self, name: str, rows: tuple[int, int] | None = None,
             into: np.ndarray | None = None) -> np.ndarray:
        return self.file.read(name, rows, into)

    def delta(self, name: str, stored: np.ndarray, base: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
        return to_float32(stored, self.tensors[name].dtype, out)

    def close(self) -> None:
        self.file.close()


class FinetunedSource:
    kind = "model"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.folder = WeightFolder(self.path)
        self.tensors = self.folder.tensors
        self.metadata: dict[str, str] = {}

    def check_against(self, base: WeightFolder) -> None:
        check_same_parameters(base, self.folder)

    def read(self, name: str, rows: tuple[int, int] | None = None,
             into: np.ndarray | None = None) -> np.ndarray:
        return self.folder.read(name, rows, into)

    def delta(self, name: str, stored: np.ndarray, base: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
        tau = to_float32(stored, self.tensors[name].dtype, out)
        return np.subtract(tau, base, out=tau)

    def close(self) -> None:
        self.folder.close()


def open_source(path: Path) -> TaskVectorSource | FinetunedSource:
    """A model folder or a task-vector file, by what is on disk."""
    path = Path(path)
    if path.is_dir():
        return FinetunedSource(path)
    if path.is_file():
        return TaskVectorSource(path)
    raise BehaviorError(f"no such task vector or model folder: {path}")


def check_same_parameters(base: WeightFolder, other: WeightFolder) -> None:
    """A fine-tuned folder must hold exactly the base's parameters, shaped alike, with
    floating-point values wherever the base has them."""
    for name, info in other.tensors.items():
        base_info = _base_tensor(base, name, other.path)
        _check_shape(info, base_info, other.path)
        if base_info.is_float:
            _check_float(info, other.path)
    missing = sorted(set(base.tensors) - set(other.tensors))
    if missing:
        raise BehaviorError(
            f"{other.path}: tensor `{missing[0]}` of the base model is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint=f"is {other.path} fine-tuned from {base.path}?")


def check_stored_finite(stored: np.ndarray, dtype: str, name: str, path: Path) -> None:
    """As `check_finite`, for stored values of safetensors dtype `dtype`."""
    check_finite(computable(stored, dtype), name, path)


def check_finite(values: np.ndarray, name: str, path: Path) -> None:
    # A sum is one pass with no allocation, and NaN or inf anywhere makes it non-finite;
    # only then (or on overflow of huge finite values) is each entry looked at.
    with np.errstate(over="ignore", invalid="ignore"):
        if (math.isfinite(float(np.add.reduce(values, axis=None)))
                or bool(np.isfinite(values).all())):
            return
    raise BehaviorError(f"{path}: tensor `{name}` holds NaN or infinite values",
                        hint="a diverged fine-tune cannot be composed; retrain or drop it")


def _base_tensor(base: WeightFolder, name: str, path: Path) -> TensorInfo:
    if name not in base.tensors:
        raise BehaviorError(f"{path}: tensor `{name}` is not a parameter of the base model "
                            f"{base.path}", hint=did_you_mean(name, base.tensors))
    return base.tensors[name]


def _check_shape(info: TensorInfo, base_info: TensorInfo, path: Path) -> None:
    if info.shape != base_info.shape:
        raise BehaviorError(
            f"{path}: tensor `{info.name}` has shape {list(info.shape)}, the base model's "
            f"has {list(base_info.shape)}",
            hint="a task vector only applies to the base it was made from")


def _check_float(info: TensorInfo, path: Path) -> None:
    if not info.is_float:
        raise BehaviorError(f"{path}: tensor `{info.name}` has dtype {info.dtype}; "
                            "task vectors need floating-point parameters")
