"""What a vLLM worker serves, in checkpoint format, and how a push is checked against it.

Runs inside the worker (see `worker_state`); nothing here touches vLLM. A
served value is read again from its source: a safetensors file (the model folder or a
pushed folder) or a tensor kept in memory (a pushed state dict, whose file the client
deletes after the push).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from behaviorc.core.diagnostics import BehaviorError, did_you_mean
from behaviorc.model.loading import weight_files

if TYPE_CHECKING:
    import torch

    Source = Union[str, torch.Tensor]  # a safetensors file holding the value, or the value

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+)\.")


@dataclass(frozen=True)
class TensorEntry:
    shape: list[int]
    dtype: str
    file: str


def layer_group(name: str) -> str:
    """The unit a push loads whole: a decoder layer, or the tensor itself outside them."""
    found = _LAYER_PREFIX.match(name)
    return found.group(1) if found else name


def read_headers(folder: Path) -> dict[str, TensorEntry]:
    """Name -> shape, dtype and file for every tensor of a checkpoint folder (no data read)."""
    from safetensors import safe_open

    entries: dict[str, TensorEntry] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                entries[name] = TensorEntry(list(part.get_shape()), part.get_dtype(), str(file))
    return entries


def all_finite(tensor: "torch.Tensor") -> bool:
    import torch

    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.float()
    # One pass over the values: a NaN or an infinity makes the sum non-finite. A
    # non-finite sum of finite values (an overflow) is settled by the exact check.
    # 16-bit sums accumulate in float32, where they cannot overflow as early.
    wide = tensor.dtype in (torch.float32, torch.float64)
    total = tensor.sum() if wide else tensor.sum(dtype=torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


@dataclass
class StagedPush:
    """A validated push, read into memory, waiting to be loaded."""

    token: str  # names the push across its calls, so two pushers never commit each other's
    tensors: dict[str, "torch.Tensor"]  # to load: the changed layers, whole
    sources: dict[str, "Source"]  # where the pushed values live once they are served
    pushed: int
    read_seconds: float


@dataclass
class ServedWeights:
    """The checkpoint a worker serves: names, shapes and dtypes, and each value's source."""

    manifest: dict[str, TensorEntry]
    sources: dict[str, "Source"]
    previous: dict[str, "Source"] = field(default_factory=dict)  # what the last push replaced
    previous_token: str = ""  # the push that `previous` would undo
    staged: StagedPush | None = None

    @classmethod
    def of_folder(cls, folder: Path) -> "ServedWeights":
        manifest = read_headers(folder)
        return cls(manifest, {name: entry.file for name, entry in manifest.items()})

    def read(self, sources: dict[str, "Source"]) -> dict[str, "torch.Tensor"]:
        """The values these sources hold, each file opened once."""
        from safetensors import safe_open

        values: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name, source in sources.items():
            if isinstance(source, str):
                by_file.setdefault(source, []).append(name)
            else:
                values[name] = source
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    values[name] = handle.get_tensor(name)
        return {name: values[name] for name in sources}

    def stage(self, token: str, folder: Path, complete: bool, transient: bool) -> list[str]:
        """Check the weights in `folder` and read them for loading; the problems, if any.

        `complete` asks for every served tensor (a whole-model push); otherwise any
        subset. `transient` says the folder goes away after the push, so the served
        values are kept in memory instead of read again from its files.
        """
        started = time.perf_counter()
        self.staged = None
        if not folder.is_dir():
            return [f"{folder} is not a folder"]
        try:
            incoming = read_headers(folder)
        except BehaviorError as err:  # no weights, or an index naming missing shards
            return [str(err)]
        except Exception as err:  # a truncated or foreign file: safetensors says why
            return [f"cannot read the weights in {folder}: {err}"]
        problems = self._header_problems(incoming, complete)
        if problems:
            return problems
        try:
            pushed = self.read({name: entry.file for name, entry in incoming.items()})
        except Exception as err:
            return [f"cannot read the weights in {folder}: {err}"]
        problems = [f"tensor `{name}` holds NaN or infinite values"
                    for name, tensor in pushed.items() if not all_finite(tensor)]
        if problems:
            return problems
        try:
            same = self._unchanged_layers(pushed)
            changed = {name: t for name, t in pushed.items() if layer_group(name) not in same}
            groups = {layer_group(name) for name in changed}
            rest = self.read({name: source for name, source in self.sources.items()
                              if name not in changed and layer_group(name) in groups})
        except Exception as err:  # a pushed folder still served was deleted or changed
            return [f"cannot read the served values of the layers this push changes: {err}; "
                    f"push every tensor of those layers (a whole model folder) instead"]
        self.staged = StagedPush(
            token=token, tensors={**changed, **rest},
            sources=dict(pushed) if transient else {n: e.file for n, e in incoming.items()},
            pushed=len(pushed), read_seconds=time.perf_counter() - started)
        return []

    def _unchanged_layers(self, pushed: dict[str, "torch.Tensor"]) -> set[str]:
        """Layers whose every pushed value equals the served one, as in a whole model
        pushed after training some of its layers: they need no rebuild. A layer's first
        difference settles it, so a push that changes everything reads little here."""
        import torch
        from safetensors import safe_open

        handles: dict[str, Any] = {}

        def served(name: str) -> torch.Tensor:
            source = self.sources[name]
            if not isinstance(source, str):
                return source
            if source not in handles:
                handles[source] = safe_open(source, framework="pt")
            return handles[source].get_tensor(name)

        def same(name: str) -> bool:
            try:
                return torch.equal(pushed[name], served(name))
            except Exception:  # its source is gone (a pushed folder deleted): reload it
                return False

        by_layer: dict[str, list[str]] = {}
        for name in pushed:
            by_layer.setdefault(layer_group(name), []).append(name)
        return {layer for layer, names in by_layer.items() if all(same(name) for name in names)}

    def _header_problems(self, incoming: dict[str, TensorEntry], complete: bool) -> list[str]:
        problems: list[str] = []
        for name, entry in incoming.items():
            want = self.manifest.get(name)
            if want is None:
                hint = did_you_mean(name, self.manifest)
                problems.append(f"tensor `{name}` is not a weight of the served model"
                                + (f" ({hint})" if hint else ""))
            elif entry.shape != want.shape:
                problems.append(f"tensor `{name}` has shape {entry.shape}, the served model "
                                f"has {want.shape}")
            elif entry.dtype not in FLOAT_DTYPES:
                problems.append(f"tensor `{name}` has dtype {entry.dtype}, weights must be "
                                f"floating point (served: {want.dtype})")
        if complete:
            missing = sorted(set(self.manifest) - set(incoming))
            if missing:
                shown = ", ".join(f"`{n}`" for n in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                problems.append(f"{len(missing)} served tensor(s) missing: {shown}{more}")
        return problems
