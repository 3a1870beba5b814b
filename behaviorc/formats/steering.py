"""Steering vectors as an artifact: one float32 direction per decoder layer.

Layer numbers follow the Engine convention: 0-based decoder-layer indices, the vector
for layer L read from and added to the residual stream at the output of layer L.

Two file formats:

- safetensors (the build artifact): tensors `layer.{L}`, string metadata (method,
  layers, model, spec hash, norms, read side). `save_steering` / `load_steering`.
- GGUF control vectors (for llama.cpp and repeng): architecture `controlvector`,
  tensors `direction.{L}`, keys `controlvector.model_hint` and
  `controlvector.layer_count`. `export_gguf` / `read_gguf`.

GGUF layer numbering. llama.cpp's loader puts `direction.N` into its per-layer table at
index N and adds that entry at the end of graph layer N (0-based), i.e. at the output
of decoder layer N; repeng writes `direction.{layer}` for the 0-based layer whose
output it read (`hidden_states[layer + 1]`). So `direction.L` here is exactly our layer
L, with no shift. llama.cpp refuses `direction.0` (it keeps no vector for layer 0), so a
vector at layer 0 cannot be exported: `export_gguf` says so instead of dropping it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from behaviorc.core.atomic import atomic_file
from behaviorc.core.diagnostics import BehaviorError, Location

FORMAT = "behaviorc.steering"
FORMAT_VERSION = "1"
GGUF_ARCH = "controlvector"

_LAYER_TENSOR = re.compile(r"layer\.(0|[1-9][0-9]*)")
_GGUF_TENSOR = re.compile(r"direction\.(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class SteeringVectors:
    """Directions by layer plus where they came from.

    `directions` is normalized on construction: sorted by layer, float32, contiguous,
    on the CPU. Construction refuses empty sets, mismatched sizes and non-finite values.
    """

    directions: Mapping[int, torch.Tensor]
    method: str  # mean_diff | pca | combination | imported
    model: str  # the model folder or name the hidden states came from
    read: str = "mean"  # last | mean | mixed
    spec_hash: str = ""
    model_type: str = ""  # config.model_type; GGUF's model hint
    provenance: str = ""  # e.g. the compose expression that made a combination
    extra: Mapping[str, str] = field(default_factory=dict)  # free-form string metadata

    def __post_init__(self) -> None:
        object.__setattr__(self, "directions", _checked_directions(self.directions))
        object.__setattr__(self, "extra", dict(self.extra))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.directions)

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).numel()

    @property
    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in self.directions.items()}

    def metadata(self) -> dict[str, str]:
        """The string metadata written with the tensors."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "model": self.model,
            "model_type": self.model_type,
            "read": self.read,
            "spec_hash": self.spec_hash,
            "provenance": self.provenance,
            "layers": json.dumps(list(self.layers)),
            "hidden_size": str(self.hidden_size),
            "norms": json.dumps({str(k): v for k, v in self.norms.items()}),
            "extra": json.dumps(dict(self.extra), sort_keys=True),
        }

    def with_directions(self, directions: Mapping[int, torch.Tensor], **changes: Any) -> "SteeringVectors":
        """The same provenance with new directions (and any field changed by name)."""
        return replace(self, directions=directions, **changes)

    def select(self, layers: Sequence[int]) -> "SteeringVectors":
        """Only the given layers (each must be present)."""
        missing = [layer for layer in layers if layer not in self.directions]
        if missing:
            raise BehaviorError(f"steering vectors have no layer {missing[0]} "
                                f"(they have layers {list(self.layers)})")
        return self.with_directions({layer: self.directions[layer] for layer in layers})

    def __add__(self, other: "SteeringVectors") -> "SteeringVectors":
        return add(self, other)

    def __sub__(self, other: "SteeringVectors") -> "SteeringVectors":
        return combine([(self, 1.0), (other, -1.0)])

    def __neg__(self) -> "SteeringVectors":
        return negate(self)

    def __mul__(self, factor: float) -> "SteeringVectors":
        return scale(self, factor)

    __rmul__ = __mul__


def _checked_directions(directions: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    where = "steering vectors"
    if not directions:
        raise BehaviorError(f"{where}: no layers")
    checked: dict[int, torch.Tensor] = {}
    size: int | None = None
    for layer in sorted(directions):
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise BehaviorError(f"{where}: layer {layer!r} is not a layer number (0 or more)")
        vector = torch.as_tensor(directions[layer])
        if vector.dim() != 1:
            raise BehaviorError(f"{where}: layer {layer} has shape {list(vector.shape)}, "
                                "expected one vector [hidden]")
        vector = vector.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if size is None:
            size = vector.numel()
        elif vector.numel() != size:
            raise BehaviorError(f"{where}: layer {layer} has {vector.numel()} values, "
                                f"other layers have {size}")
        if not bool(torch.isfinite(vector).all()):
            raise BehaviorError(f"{where}: layer {layer} has NaN or infinite values")
        checked[layer] = vector
    return checked


# ---------------------------------------------------------------- arithmetic

def combine(terms: Sequence[tuple[SteeringVectors, float]], provenance: str = "") -> SteeringVectors:
    """sum_i weight_i * vectors_i over the union of their layers (a layer a term lacks
    counts as zero for it). All terms must come from the same model."""
    if not terms:
        raise BehaviorError("nothing to combine: no steering vectors")
    first = terms[0][0]
    for vectors, _ in terms[1:]:
        if vectors.model != first.model:
            raise BehaviorError(f"cannot combine steering vectors of different models: "
                                f"`{first.model}` and `{vectors.model}`")
        if vectors.hidden_size != first.hidden_size:
            raise BehaviorError(f"cannot combine steering vectors of hidden size "
                                f"{first.hidden_size} and {vectors.hidden_size}")
    summed: dict[int, torch.Tensor] = {}
    for vectors, weight in terms:
        for layer, vector in vectors.directions.items():
            summed[layer] = summed.get(layer, torch.zeros_like(vector)) + float(weight) * vector
    methods = {vectors.method for vectors, _ in terms}
    reads = {vectors.read for vectors, _ in terms}
    spec_hashes = {vectors.spec_hash for vectors, _ in terms}
    return SteeringVectors(
        directions=summed,
        method=methods.pop() if len(methods) == 1 else "combination",
        model=first.model,
        read=reads.pop() if len(reads) == 1 else "mixed",
        spec_hash=spec_hashes.pop() if len(spec_hashes) == 1 else "",
        model_type=first.model_type,
        provenance=provenance or " + ".join(
            f"{weight:g} * ({vectors.provenance or vectors.method})" for vectors, weight in terms),
    )


def add(a: SteeringVectors, b: SteeringVectors) -> SteeringVectors:
    return combine([(a, 1.0), (b, 1.0)])


def negate(vectors: SteeringVectors) -> SteeringVectors:
    return scale(vectors, -1.0)


def scale(vectors: SteeringVectors, factor: float) -> SteeringVectors:
    if not math.isfinite(factor):
        raise BehaviorError(f"cannot scale steering vectors by {factor}")
    return vectors.with_directions({layer: factor * v for layer, v in vectors.directions.items()})


# ---------------------------------------------------------------- safetensors

def save_steering(vectors: SteeringVectors, path: str | Path) -> Path:
    """Write `vectors` as safetensors, atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"layer.{layer}": v for layer, v in vectors.directions.items()}
    with atomic_file(path, overwrite=True) as staging:
        save_file(tensors, str(staging), metadata=vectors.metadata())
    return path


def load_steering(path: str | Path, loc: Location | None = None) -> SteeringVectors:
    """Read and check a steering file; every problem is a BehaviorError at `loc`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise BehaviorError(f"steering vectors file `{path}` does not exist", loc)
    if not path.is_file():
        raise BehaviorError(f"steering vectors file `{path}` is not a regular file "
                            f"(a folder, pipe or device)", loc)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            raw = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise BehaviorError(f"`{path}` is not a readable safetensors file: {err}", loc) from None
    directions: dict[int, torch.Tensor] = {}
    for name, tensor in raw.items():
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None:
            raise BehaviorError(f"`{path}`: tensor `{name}` is not named `layer.N`", loc,
                                hint="a steering file holds one tensor `layer.N` per decoder layer N")
        if not tensor.is_floating_point():
            raise BehaviorError(f"`{path}`: tensor `{name}` has dtype "
                                f"{str(tensor.dtype).removeprefix('torch.')}; steering vectors "
                                f"are floating point", loc)
        directions[int(match.group(1))] = tensor
    where = f"`{path}`"
    _check_declared_layers(metadata.get("layers"), directions, where, loc)
    try:
        return SteeringVectors(
            directions=directions,
            method=metadata.get("method", "imported"),
            model=metadata.get("model", ""),
            read=metadata.get("read", "mean"),
            spec_hash=metadata.get("spec_hash", ""),
            model_type=metadata.get("model_type", ""),
            provenance=metadata.get("provenance", ""),
            extra=_json_object(metadata.get("extra", "{}"), where, loc),
        )
    except BehaviorError as err:
        raise BehaviorError(f"{where}: {err}", loc) from None


def _check_declared_layers(declared: str | None, directions: Mapping[int, torch.Tensor],
                           where: str, loc: Location | None) -> None:
    if declared is None:
        return
    try:
        listed = sorted(int(x) for x in json.loads(declared))
    except (ValueError, TypeError):
        raise BehaviorError(f"{where}: metadata `layers` is not a list of numbers", loc) from None
    if listed != sorted(directions):
        raise BehaviorError(f"{where}: metadata lists layers {listed} but the file holds "
                            f"{sorted(directions)}", loc)


def _json_object(text: str, where: str, loc: Location | None) -> dict[str, str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BehaviorError(f"{where}: metadata `extra` is not a JSON object", loc)
    return {str(k): str(v) for k, v in value.items()}


# ---------------------------------------------------------------- GGUF

def export_gguf(vectors: SteeringVectors, path: str | Path) -> Path:
    """Write a llama.cpp / repeng control vector (see the module notes on numbering)."""
    import gguf

    if 0 in vectors.directions:
        raise BehaviorError(
            "a steering vector at layer 0 cannot be written as a GGUF control vector: "
            "llama.cpp refuses `direction.0`",
            hint="steer at layers 1 and up, or export `vectors.select(...)` without layer 0")
    path = Path(path)
    with atomic_file(path, overwrite=True) as staging:
        writer = gguf.GGUFWriter(str(staging), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", vectors.model_type or vectors.model)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vectors.directions))
        # Our provenance rides along under our own prefix; llama.cpp ignores unknown keys.
        for key, value in vectors.metadata().items():
            if key not in ("layers", "norms", "hidden_size"):
                writer.add_string(f"behaviorc.{key}", value)
        for layer, vector in vectors.directions.items():
            writer.add_tensor(f"direction.{layer}", vector.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_gguf(path: str | Path, loc: Location | None = None) -> SteeringVectors:
    """Read a GGUF control vector (ours, repeng's or llama.cpp's) back."""
    import gguf

    path = Path(path)
    where = f"`{path}`"
    if not path.is_file():
        raise BehaviorError(f"control vector file {where} does not exist", loc)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct errors on bad files
        raise BehaviorError(f"{where} is not a readable GGUF file: {err}", loc) from None
    strings = {name: f.contents() for name, f in reader.fields.items()
               if f.types == [gguf.GGUFValueType.STRING]}
    arch = strings.get("general.architecture")
    if arch != GGUF_ARCH:
        raise BehaviorError(f"{where} has architecture `{arch}`, not `{GGUF_ARCH}`", loc)
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _GGUF_TENSOR.fullmatch(tensor.name)
        if match is None or match.group(1) == "0":
            raise BehaviorError(f"{where}: tensor `{tensor.name}` is not `direction.N` with N >= 1", loc)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise BehaviorError(f"{where}: tensor `{tensor.name}` is not float32", loc)
        directions[int(match.group(1))] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
    ours = {key.removeprefix("behaviorc."): value for key, value in strings.items()
            if key.startswith("behaviorc.")}
    try:
        return SteeringVectors(
            directions=directions,
            method=ours.get("method", "imported"),
            model=ours.get("model", strings.get(f"{GGUF_ARCH}.model_hint", "")),
            read=ours.get("read", "last"),  # repeng and llama.cpp read the last token
            spec_hash=ours.get("spec_hash", ""),
            model_type=strings.get(f"{GGUF_ARCH}.model_hint", ""),
            provenance=ours.get("provenance", ""),
            extra=_json_object(ours.get("extra", "{}"), where, loc),
        )
    except BehaviorError as err:
        raise BehaviorError(f"{where}: {err}", loc) from None


# ---------------------------------------------------------------- files

