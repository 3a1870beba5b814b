"""Steering vectors: one float32 direction per decoder layer, and their arithmetic.

Layer numbers follow the Engine convention: 0-based decoder-layer indices, the vector
for layer L read from and added to the residual stream at the output of layer L.

`SteeringVectors` is the whole API of the concept (as repeng's `ControlVector` is): the
directions, where they came from, and `+`, `-`, unary `-`, `*` by a number and
`combine` (a weighted sum of many). Reading and writing them as files is
`behaviorc.formats.steering`.

Why a module of its own, low in the layers (below formats, above the language): the
formats build this type when they read a file, and steer (extraction, verification) and
compose (the weighted sum of a composition's steering) use it, and capabilities may not
import each other; formats may import neither a capability nor the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from behaviorc.core.diagnostics import BehaviorError, did_you_mean
from behaviorc.core.vocabulary import STEER_POSITIONS, SteerPositions


@dataclass(frozen=True)
class SteeringVectors:
    """Directions by layer plus where they came from.

    `directions` is normalized on construction: sorted by layer, float32, contiguous,
    on the CPU. Construction refuses empty sets, mismatched sizes and non-finite values.
    """

    directions: Mapping[int, torch.Tensor]
    method: str  # a steering method (core.vocabulary.SteerMethod), `combination` or `imported`
    model: str  # the model folder or name the hidden states came from
    read: str = "mean"  # last | mean | mixed
    spec_hash: str = ""
    model_type: str = ""  # config.model_type; GGUF's model hint
    provenance: str = ""  # e.g. the compose expression that made a combination
    extra: Mapping[str, str] = field(default_factory=dict)  # free-form string metadata
    # the positions they steer (behaviorc.engine.protocol defines `generated`); the
    # behavior's `steer { positions }`, carried so every engine they reach steers alike
    positions: SteerPositions = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "directions", _checked_directions(self.directions))
        if self.positions not in STEER_POSITIONS:
            raise BehaviorError(f"steering vectors: unknown positions `{self.positions}`",
                                hint=did_you_mean(str(self.positions), STEER_POSITIONS)
                                or f"one of {', '.join(STEER_POSITIONS)}")
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

    @classmethod
    def combine(cls, terms: Sequence[tuple["SteeringVectors", float]],
                provenance: str = "") -> "SteeringVectors":
        """sum_i weight_i * vectors_i over the union of their layers (a layer a term lacks
        counts as zero for it). All terms must come from the same model and steer the
        same positions."""
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
            if vectors.positions != first.positions:
                raise BehaviorError(
                    f"cannot combine steering vectors that steer different positions: "
                    f"`{first.positions}` and `{vectors.positions}`",
                    hint="give their behaviors the same `steer { positions ... }`")
        summed: dict[int, torch.Tensor] = {}
        for vectors, weight in terms:
            for layer, vector in vectors.directions.items():
                summed[layer] = summed.get(layer, torch.zeros_like(vector)) + float(weight) * vector
        methods = {vectors.method for vectors, _ in terms}
        reads = {vectors.read for vectors, _ in terms}
        spec_hashes = {vectors.spec_hash for vectors, _ in terms}
        return cls(
            directions=summed,
            method=methods.pop() if len(methods) == 1 else "combination",
            model=first.model,
            read=reads.pop() if len(reads) == 1 else "mixed",
            spec_hash=spec_hashes.pop() if len(spec_hashes) == 1 else "",
            model_type=first.model_type,
            positions=first.positions,
            provenance=provenance or " + ".join(
                f"{weight:g} * ({vectors.provenance or vectors.method})" for vectors, weight in terms),
        )

    def __add__(self, other: "SteeringVectors") -> "SteeringVectors":
        return self.combine([(self, 1.0), (other, 1.0)])

    def __sub__(self, other: "SteeringVectors") -> "SteeringVectors":
        return self.combine([(self, 1.0), (other, -1.0)])

    def __neg__(self) -> "SteeringVectors":
        return self * -1.0

    def __mul__(self, factor: float) -> "SteeringVectors":
        if not math.isfinite(factor):
            raise BehaviorError(f"cannot scale steering vectors by {factor}")
        return self.with_directions({layer: factor * v for layer, v in self.directions.items()})

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
