"""Does the direction do what it should? Margins with steering off and on.

The behavior margin (mean per-token log-prob of the positive completion minus the
negative one, over held-out pairs) is measured without steering and with the vectors
added at the spec's strength; a sweep repeats that for several strengths and adds the
general-text NLL at each, so a user sees what each strength buys and what it costs.

Everything goes through the Engine protocol, so the same code verifies in process and
against a live vLLM server. Steering is always cleared afterwards, also on errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.engine.protocol import Engine
from behaviorc.measure.margin import behavior_margin
from behaviorc.measure.nll import general_nll
from behaviorc.formats.steering import SteeringVectors


@dataclass(frozen=True)
class SweepPoint:
    strength: float
    margin: float
    general_nll: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Verification:
    before: SweepPoint  # steering off
    steered: SweepPoint  # at the spec's strength
    sweep: tuple[SweepPoint, ...]  # the requested strengths, ascending


def check_fits(engine: Engine, vectors: SteeringVectors, loc: Location | None = None) -> None:
    """The vectors must match the model's layers and hidden size."""
    info = engine.info
    if vectors.hidden_size != info.hidden_size:
        raise BehaviorError(f"steering vectors have hidden size {vectors.hidden_size}, "
                            f"the model `{info.name}` has {info.hidden_size}", loc)
    for layer in vectors.layers:
        if not 0 <= layer < info.num_layers:
            raise BehaviorError(f"steering vector at layer {layer}, but the model `{info.name}` "
                                f"has layers 0..{info.num_layers - 1}", loc)


def measure_at(engine: Engine, vectors: SteeringVectors, strength: float,
               pairs: Sequence[ir.Pair], general: Sequence[str]) -> SweepPoint:
    """Margin and general NLL with `vectors` added at `strength` (0: steering off)."""
    if strength == 0:
        engine.clear_steering()
    else:
        engine.set_steering(vectors.directions, strength)
    try:
        return SweepPoint(strength, behavior_margin(engine, pairs), general_nll(engine, general))
    finally:
        engine.clear_steering()


def verify(engine: Engine, vectors: SteeringVectors, strength: float, pairs: Sequence[ir.Pair],
           general: Sequence[str], sweep: Sequence[float] = (),
           on_point: Callable[[SweepPoint, int, int], None] | None = None,
           loc: Location | None = None) -> Verification:
    """Steering off, at `strength`, and at each sweep strength (each measured once)."""
    if not pairs:
        raise BehaviorError("no held-out pairs to verify the steering direction on", loc)
    if not general:
        raise BehaviorError("no general texts to measure the NLL cost of steering on", loc)
    check_fits(engine, vectors, loc)
    strengths = list(dict.fromkeys([0.0, float(strength), *sorted(float(s) for s in sweep)]))
    measured: dict[float, SweepPoint] = {}
    for done, value in enumerate(strengths, 1):
        measured[value] = measure_at(engine, vectors, value, pairs, general)
        if on_point is not None:
            on_point(measured[value], done, len(strengths))
    return Verification(
        before=measured[0.0],
        steered=measured[float(strength)],
        sweep=tuple(measured[float(s)] for s in sorted(set(float(s) for s in sweep))),
    )
