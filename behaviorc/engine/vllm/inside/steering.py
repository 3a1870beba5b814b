"""Steering chosen per request on a live vLLM server: the worker's registry of named
vectors, which tokens of a batch each one steers, and the fixed-address tensors the
decoder layers read it from. Nothing here reads vLLM: the worker state
(`worker_state`) hands these functions plain values read by `vllm_internals`.

Before each forward pass the worker knows which tokens of the batch belong to which
request and each request's `steer` argument (see `steer_spec`), and builds a per-token
coefficient matrix C [tokens, columns]; each decoder layer adds `C @ T_layer` to its
output, where column 0 of the tables T holds the steering set for every request
(`set_steering`) and columns 1.. the registered vectors. Rows of unsteered tokens are
exactly zero, so their hidden states are bit-for-bit what they would be with no
registry at all, whatever is batched beside them.

Each column steers `all` the tokens of the requests it applies to, or the `generated`
ones (behaviorc.engine.protocol defines them): a token at position p of a request whose
prompt has n tokens is steered iff p >= n - 1. A request's scheduled tokens are
consecutive positions from the number of its tokens already computed, so in a chunked
prefill the first chunks steer nothing and the chunk holding the prompt's last token
steers from it on; in decoding every token is steered.

The tables and C are allocated once, when vLLM loads the model and before it compiles
it (`SteeringSlots`); every change writes into them in place. A graph torch.compile
traced (and a CUDA graph captured from it) reads them at fixed addresses, so it keeps
steering by the current values without being traced again.

Registry changes run as worker RPCs, which vLLM executes between forward passes: a
forward pass sees the whole registry before a change or the whole registry after it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from behaviorc.core.vocabulary import STEER_POSITIONS, SteerPositions
from behaviorc.engine.hooks import add_to_output
from behaviorc.engine.vllm.inside.steer_spec import (
    NAME_PATTERN, STEER_ARG, STEER_FROM_ARG, SteerSpecError, parse_steer, vector_digest)

MAX_REGISTERED = 64  # named vectors one server keeps (each holds layers x hidden floats)
SERVER_WIDE = 0  # the column of `set_steering`'s vector, on for every request
COLUMNS = 1 + MAX_REGISTERED
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Registry:
    """An immutable snapshot: replaced whole on every change, never edited."""

    names: tuple[str, ...]
    index: Mapping[str, int]  # name -> its column of the steering tables (1..)
    digests: Mapping[str, str]
    layers: Mapping[str, tuple[int, ...]]
    norms: Mapping[str, Mapping[int, float]]
    sources: Mapping[str, Mapping[int, list[float]]]  # name -> the registered values
    positions: Mapping[str, SteerPositions]  # name -> the positions it steers

    @property
    def generated(self) -> frozenset[int]:
        """The columns that steer only `generated` positions."""
        return frozenset(self.index[name] for name in self.names
                         if self.positions[name] == "generated")


EMPTY = Registry((), {}, {}, {}, {}, {}, {})


def build_registry(sources: Mapping[str, Mapping[int, list[float]]],
                   positions: Mapping[str, SteerPositions]) -> Registry:
    """The snapshot of `sources` (name -> {layer: values}) steering `positions` (name ->
    its positions)."""
    names = tuple(sorted(sources))
    return Registry(
        names=names, index={name: SERVER_WIDE + 1 + i for i, name in enumerate(names)},
        digests={name: vector_digest(sources[name], positions[name]) for name in names},
        layers={name: tuple(sorted(sources[name])) for name in names},
        norms={name: {layer: float(torch.tensor(v, dtype=torch.float64).norm())
                      for layer, v in sorted(sources[name].items())} for name in names},
        sources=dict(sources), positions={name: positions[name] for name in names})


class SteeringSlots:
    """What every decoder layer of a served model adds: `C[:tokens] @ tables[layer]`.

    Made once per worker when the model loads, before vLLM compiles it, and hooked on
    every layer; afterwards only written in place. Traced by torch.compile, the addition
    is always in the graph (adding exact zeros when nothing steers); run eagerly, it is
    skipped while nothing steers and on layers no vector touches, so an eager server
    with no steering runs no extra operation.
    """

    def __init__(self, layers: int, hidden: int, max_tokens: int, device: torch.device):
        self.tables = torch.zeros(layers, COLUMNS, hidden, device=device)
        self.coefficients = torch.zeros(max_tokens, COLUMNS, device=device)
        self.layers_in_use = [False] * layers
        self._written_rows = 0  # rows of `coefficients` the last pass set

    def hook(self, layer: int) -> Any:
        """The forward hook of decoder layer `layer`."""
        table, coefficients = self.tables[layer], self.coefficients

        def addition(hidden: torch.Tensor) -> torch.Tensor | None:
            if not torch.compiler.is_compiling() and not (
                    self.steering and self.layers_in_use[layer]):
                return None
            return (coefficients[: hidden.shape[0]] @ table).to(hidden.dtype)

        return add_to_output(addition)

    @property
    def steering(self) -> bool:
        """Whether some row of `coefficients` is not zero."""
        return bool(self._written_rows)

    def write_columns(self, columns: Mapping[int, Mapping[int, torch.Tensor]]) -> None:
        """For each column given, every layer's table: `vectors[layer]`, zero elsewhere."""
        for column, vectors in columns.items():
            self.tables[:, column].zero_()
            for layer, vector in vectors.items():
                self.tables[layer, column].copy_(vector)
        self.layers_in_use = [bool(table.any()) for table in self.tables]

    def set_tokens(self, coefficients: torch.Tensor | None) -> None:
        """The coefficients of the forward pass about to run (None: it steers nothing)."""
        if self._written_rows:
            self.coefficients[: self._written_rows].zero_()
        rows = 0 if coefficients is None else coefficients.shape[0]
        if rows:
            self.coefficients[:rows].copy_(coefficients)
        self._written_rows = rows


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


def positions_problems(positions: Any) -> list[str]:
    """What is wrong with `positions` as the positions a vector steers."""
    if positions in STEER_POSITIONS:
        return []
    return [f"unknown steered positions {json.dumps(positions)} (one of "
            f"{', '.join(STEER_POSITIONS)})"]


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
    batch, `args` its free-form request arguments (vLLM's `extra_args`). Row `start`
    holds the token at position `first_position` of the request, whose prompt has
    `prompt_tokens` tokens (`generated` steering starts at its last one, or at the
    request's `steer_from`)."""

    start: int
    end: int
    args: Mapping[str, Any]
    first_position: int = 0
    prompt_tokens: int = 0

    @property
    def steer(self) -> str | None:
        return self.args.get(STEER_ARG) or None

    @property
    def first_generated(self) -> int:
        """The first row `generated` steering steers: the prompt's last token's (or
        `steer_from`'s), `start` when the rows begin after it, `end` when they all come
        before it."""
        first = self.args.get(STEER_FROM_ARG)
        if type(first) is not int:  # the middleware refuses any other value
            first = self.prompt_tokens - 1
        return min(self.end, self.start + max(0, first - self.first_position))


def token_coefficients(requests: Sequence[ScheduledRequest], index: Mapping[str, int],
                       tokens: int, columns: int = COLUMNS,
                       generated: frozenset[int] = frozenset()) -> torch.Tensor | None:
    """C [tokens, columns]: the strength of each registered vector (column `index[name]`)
    on each token of the batch, on the request's `generated` rows only for the columns in
    `generated`; None when no request in it is steered by a registered one."""
    coefficients = None
    for request in requests:
        for name, strength in _parsed(request.steer) if request.steer else ():
            column = index.get(name)
            if column is None:  # removed after the server admitted the request
                continue
            if coefficients is None:
                coefficients = torch.zeros(tokens, columns)
            first = request.first_generated if column in generated else request.start
            coefficients[first:request.end, column] = strength
    return coefficients


def with_server_wide(coefficients: torch.Tensor | None, requests: Sequence[ScheduledRequest],
                     tokens: int, positions: SteerPositions) -> torch.Tensor:
    """`coefficients` (None: all zero) with the server-wide column on: for every token
    (`all`; padding rows too, which nothing reads), or for each request's `generated`
    rows."""
    if coefficients is None:
        coefficients = torch.zeros(tokens, COLUMNS)
    if positions == "all":
        coefficients[:, SERVER_WIDE] = 1.0
    else:
        for request in requests:
            coefficients[request.first_generated:request.end, SERVER_WIDE] = 1.0
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
