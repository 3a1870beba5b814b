"""Steering chosen per request on a live vLLM server: the worker's registry of named
vectors and which tokens of a batch each one steers. Nothing here reads vLLM: the
worker state (`worker_state`) hands these functions plain values read by
`vllm_internals`.

Before each forward pass the worker knows which tokens of the batch belong to which
request and each request's `steer` argument (see `steer_spec`), and builds a per-token
coefficient matrix C [tokens, vectors]; each steered layer adds `C @ V_layer` to its
output. Rows of unsteered tokens are exactly zero, so their hidden states are
bit-for-bit what they would be with no registry at all, whatever is batched beside them.

Registry changes run as worker RPCs, which vLLM executes between forward passes: a
forward pass sees the whole registry before a change or the whole registry after it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from behaviorc.engine.vllm.inside.steer_spec import (
    NAME_PATTERN, STEER_ARG, SteerSpecError, parse_steer, vector_digest)

MAX_REGISTERED = 64  # named vectors one server keeps (each holds layers x hidden floats)
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Registry:
    """An immutable snapshot: replaced whole on every change, never edited."""

    names: tuple[str, ...]
    index: Mapping[str, int]
    digests: Mapping[str, str]
    layers: Mapping[str, tuple[int, ...]]
    norms: Mapping[str, Mapping[int, float]]
    matrices: Mapping[int, torch.Tensor]  # layer -> [len(names), hidden] float32, zero rows where absent
    sources: Mapping[str, Mapping[int, list[float]]]  # name -> the registered values


EMPTY = Registry((), {}, {}, {}, {}, {}, {})


def build_registry(sources: Mapping[str, Mapping[int, list[float]]], hidden: int,
                   device: torch.device) -> Registry:
    """The snapshot of `sources` (name -> {layer: values}), its matrices on `device`."""
    names = tuple(sorted(sources))
    matrices: dict[int, torch.Tensor] = {}
    for row, name in enumerate(names):
        for layer, values in sources[name].items():
            matrix = matrices.setdefault(layer, torch.zeros(len(names), hidden))
            matrix[row] = torch.tensor(values, dtype=torch.float32)
    return Registry(
        names=names, index={name: i for i, name in enumerate(names)},
        digests={name: vector_digest(sources[name]) for name in names},
        layers={name: tuple(sorted(sources[name])) for name in names},
        norms={name: {layer: float(torch.tensor(v, dtype=torch.float64).norm())
                      for layer, v in sorted(sources[name].items())} for name in names},
        matrices={layer: m.to(device) for layer, m in matrices.items()},
        sources=dict(sources))


@dataclass(frozen=True)
class Shape:
    """What a steering vector must fit: the served model's layers, hidden size, and the
    largest value its dtype holds."""

    layers: int
    hidden: int
    dtype_max: float


def vector_problems(label: str, vectors: Any, strength: float, shape: Shape) -> list[str]:
    """What is wrong with steering `vectors` ({"layer": [floats]}) added at `strength`:
    layers in range, the hidden size, float values whose product with the strength
    the served dtype holds (an overflow would turn every steered answer into NaN)."""
    if not isinstance(vectors, dict) or not vectors:
        return [f"{label}: no layers given"]
    count, hidden = shape.layers, shape.hidden
    largest = min(FLOAT32_MAX, shape.dtype_max)
    problems = []
    for key, values in vectors.items():
        try:
            layer = int(key)
        except ValueError:
            problems.append(f"{label}: `{key}` is not a layer number")
            continue
        if not 0 <= layer < count:
            problems.append(f"{label}: layer {layer} out of range: the model has "
                            f"{count} decoder layers (0..{count - 1})")
        elif not isinstance(values, list) or len(values) != hidden:
            size = len(values) if isinstance(values, list) else "no list of"
            problems.append(f"{label}: the vector for layer {layer} has {size} values, "
                            f"the hidden size is {hidden}")
        elif not all(type(x) is float for x in values):
            problems.append(f"{label}: the vector for layer {layer} holds values that are "
                            f"not floating-point numbers (write 1.0, not 1)")
        elif not all(math.isfinite(x) and abs(x * strength) <= largest for x in values):
            problems.append(f"{label}: the vector for layer {layer} has NaN or infinite "
                            f"values, or values that times the strength overflow the "
                            f"served dtype (largest {largest:.3g})")
    return problems


def registration_problems(name: Any, vectors: Any, registry: Registry, shape: Shape) -> list[str]:
    """What is wrong with registering `vectors` as `name` next to `registry`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return [f"the name {json.dumps(name)} is not a vector name (letters, digits, "
                f"`_`, `.` or `-`, starting with a letter; at most 64)"]
    if name not in registry.sources and len(registry.sources) >= MAX_REGISTERED:
        return [f"`{name}`: the server already keeps {MAX_REGISTERED} named vectors; "
                f"remove one first (`behaviorc steer remove URL NAME`)"]
    return vector_problems(f"`{name}`", vectors, 1.0, shape)


@dataclass(frozen=True)
class ScheduledRequest:
    """A request of a forward pass's batch: its tokens are rows [start, end) of the
    batch, `args` its free-form request arguments (vLLM's `extra_args`)."""

    start: int
    end: int
    args: Mapping[str, Any]

    @property
    def steer(self) -> str | None:
        return self.args.get(STEER_ARG) or None


def token_coefficients(requests: Sequence[ScheduledRequest], index: Mapping[str, int],
                       tokens: int) -> torch.Tensor | None:
    """C [tokens, len(index)]: the strength of each registered vector (column `index[name]`)
    on each token of the batch; None when no request in it is steered by a registered one."""
    coefficients = None
    for request in requests:
        for name, strength in _parsed(request.steer) if request.steer else ():
            column = index.get(name)
            if column is None:  # removed after the server admitted the request
                continue
            if coefficients is None:
                coefficients = torch.zeros(tokens, len(index))
            coefficients[request.start:request.end, column] = strength
    return coefficients


_PARSED: dict[str, tuple[tuple[str, float], ...]] = {}


def _parsed(spec: str) -> tuple[tuple[str, float], ...]:
    """parse_steer, remembered (a request's spec is read at every step it runs)."""
    found = _PARSED.get(spec)
    if found is None:
        try:
            found = parse_steer(spec)
        except SteerSpecError:  # the server refuses these at admission
            found = ()
        if len(_PARSED) > 4096:
            _PARSED.clear()
        _PARSED[spec] = found
    return found
