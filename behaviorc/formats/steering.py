"""Steering vectors as files (`behaviorc.steering_vectors` is the type they hold).

Two file formats:

- safetensors (the build artifact): tensors `layer.{L}`, string metadata (method,
  layers, model, spec hash, norms, read side, steered positions; a file without
  `positions` steers `all`). `save_steering` / `load_steering`.
- GGUF control vectors (for llama.cpp and repeng): architecture `controlvector`,
  tensors `direction.{L}`, keys `controlvector.model_hint` and
  `controlvector.layer_count`. `export_gguf` / `read_gguf`.

GGUF layer numbering. llama.cpp's loader puts `direction.N` into its per-layer table at
index N and adds that entry at the end of graph layer N (0-based), i.e. at the output
of decoder layer N; repeng writes `direction.{layer}` for the 0-based layer whose
output it read (`hidden_states[layer + 1]`). So `direction.L` here is exactly our layer
L, with no shift. llama.cpp refuses `direction.0` (it keeps no vector for layer 0), so a
vector at layer 0 cannot be exported: `export_gguf` says so instead of dropping it.

GGUF has no field for the steered positions: llama.cpp adds a control vector at every
position. Ours rides in the `behaviorc.positions` key, so behaviorc reads a GGUF back
as written; `steer convert` says when llama.cpp will steer more positions than the
vectors ask for (`GGUF_POSITIONS_NOTE`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from behaviorc.core.atomic import atomic_file
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.steering_vectors import SteeringVectors

FORMAT = "behaviorc.steering"
FORMAT_VERSION = "1"
GGUF_ARCH = "controlvector"
GGUF_POSITIONS_NOTE = ("note: llama.cpp steers every position with a control vector; these "
                       "vectors steer `generated` positions in behaviorc (kept in the file's "
                       "`behaviorc.positions` key)")

_LAYER_TENSOR = re.compile(r"layer\.(0|[1-9][0-9]*)")
_GGUF_TENSOR = re.compile(r"direction\.(0|[1-9][0-9]*)")


# ---------------------------------------------------------------- safetensors

def steering_metadata(vectors: SteeringVectors) -> dict[str, str]:
    """The string metadata written with the tensors."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": vectors.method,
        "model": vectors.model,
        "model_type": vectors.model_type,
        "read": vectors.read,
        "positions": vectors.positions,
        "spec_hash": vectors.spec_hash,
        "provenance": vectors.provenance,
        "layers": json.dumps(list(vectors.layers)),
        "hidden_size": str(vectors.hidden_size),
        "norms": json.dumps({str(k): v for k, v in vectors.norms.items()}),
        "extra": json.dumps(dict(vectors.extra), sort_keys=True),
    }


def save_steering(vectors: SteeringVectors, path: str | Path) -> Path:
    """Write `vectors` as safetensors, atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"layer.{layer}": v for layer, v in vectors.directions.items()}
    with atomic_file(path, overwrite=True) as staging:
        save_file(tensors, str(staging), metadata=steering_metadata(vectors))
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
            positions=metadata.get("positions", "all"),  # files from before positions existed
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
        for key, value in steering_metadata(vectors).items():
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
            positions=ours.get("positions", "all"),  # as llama.cpp steers
            spec_hash=ours.get("spec_hash", ""),
            model_type=strings.get(f"{GGUF_ARCH}.model_hint", ""),
            provenance=ours.get("provenance", ""),
            extra=_json_object(ours.get("extra", "{}"), where, loc),
        )
    except BehaviorError as err:
        raise BehaviorError(f"{where}: {err}", loc) from None
