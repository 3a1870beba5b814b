"""The live hand-off: steering out, weights in, while a server keeps serving.

At the start the servers serve the base weights (pushed there, unless the build started
the server on them) with the behavior's steering at full strength. Every `push_every` training steps the trained tensors are pushed into the
servers (validated, all or nothing, without pausing them: HOGWILD), and then the served
strength is lowered to

    strength_t = strength * clamp(1 - gain_t / gain_steered, 0, 1),

where gain_t is the margin the weights alone now carry over the base (measured on the
held-out pairs, on the training copy, unsteered) and gain_steered the margin the
steering added to the base. Margins of a small weight change and of a steering vector
add roughly linearly, so the served margin stays near the steered one: the steering
gives back exactly the share the weights have taken over. The strength never rises
again once lowered (a noisy measurement must not put steering back). Weights are
pushed before the strength is lowered, so between the two the behavior is, if anything,
stronger, never weaker. At the end the final model folder is pushed and the steering
cleared: strength 0, whatever share the weights carry by then. Every push after the
first sends the trained tensors only (the rest are the base's, already served), as a
state dict: push.py writes it into a folder it keeps while served, whereas a task's
output folder moves into the store when the task ends.

A stream of probe requests runs the whole time; `requests_failed` counts failures (the
claim is zero). After every change the served margin is measured on the first server
and recorded as an event, so the dashboard shows the behavior users see over time.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.events import HandoffServed, Push, TaskEvent, TrainEval
from behaviorc.engine.protocol import Engine
from behaviorc.engine.vllm.push import push_weights
from behaviorc.engine.vllm.server import serve
from behaviorc.engine.vllm.traffic import RequestLoop
from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.measure.margin import behavior_margin
from behaviorc.core.task import TaskContext
from behaviorc.core.vocabulary import SteerPositions

PROBES_AT_MOST = 1_000_000  # per server: RequestLoop's default (1000) ends in minutes
PROBE_PAUSE_S = 1.0  # between probes: enough to see serving go on through every push


@dataclass(frozen=True)
class ServedPoint:
    step: int
    strength: float  # served steering strength after this point's change
    served_margin: float  # measured on the server: what users get
    weights_margin: float  # the training weights alone, unsteered
    push_ms: float  # 0 when nothing was pushed at this point


@dataclass
class HandoffRecord:
    points: list[ServedPoint] = field(default_factory=list)
    push_seconds: float = 0.0
    pushes: int = 0
    requests: int = 0
    requests_failed: int = 0

    def metrics(self) -> dict[str, float]:
        served = [p.served_margin for p in self.points]
        return {
            "served_margin_start": served[0],
            "served_margin_min": min(served),
            "served_margin_end": served[-1],
            "strength_end": self.points[-1].strength,
            "pushes": float(self.pushes),
            "push_ms": 1000.0 * self.push_seconds / max(self.pushes, 1),
            "seconds_push": self.push_seconds,
            "requests_served": float(self.requests - self.requests_failed),
            "requests_failed": float(self.requests_failed),
        }


def lowered_strength(strength: float, gain_weights: float, gain_steered: float) -> float:
    """The steering strength that, with the weights' gain, gives the steered margin."""
    if gain_steered <= 0:  # the steering adds nothing to hand over: drop it
        return 0.0
    return strength * min(1.0, max(0.0, 1.0 - gain_weights / gain_steered))


@contextmanager
def live_handoff(deploy: ir.Deploy | None, ctx: TaskContext, base: str,
                 directions: Mapping[int, torch.Tensor], strength: float, positions: SteerPositions,
                 pairs: Sequence[ir.Pair], steps: int, margin_before: float,
                 margin_steered: float) -> Iterator["LiveHandoff | None"]:
    """The hand-off of a training task whose deploy says `handoff on`, started and serving
    `base` (a model folder) steered at `positions`, for the length of the block; None without one. With
    `auto` the task owns a vLLM server of `base` for as long."""
    if deploy is None:
        yield None
        return
    with ExitStack() as stack:
        if deploy.urls == "auto":
            ctx.progress(0, steps, "starting a vLLM server")
            # it serves the hand-off's checks and stops with the task: eager starts faster
            urls, push_base = [stack.enter_context(serve(base, eager=True)).url], None
        else:
            urls, push_base = list(deploy.urls), Path(base)
        handoff = LiveHandoff(urls, directions, strength, pairs, margin_before,
                              margin_steered, push_every=deploy.push_every, emit=ctx.emit,
                              api_key=deploy.api_key, timeout=deploy.timeout, positions=positions)
        stack.callback(handoff.close)
        handoff.start(push_base)
        yield handoff


class LiveHandoff:
    """Owns the served behavior of `urls` from `start()` to `finish()`."""

    def __init__(self, urls: Sequence[str], directions: Mapping[int, torch.Tensor], strength: float,
                 pairs: Sequence[ir.Pair], margin_before: float, margin_steered: float,
                 push_every: int = 0, emit: Callable[[TaskEvent], None] = lambda event: None,
                 api_key: str | None = None, timeout: float | None = None,
                 positions: SteerPositions = "all"):
        self.urls, self.directions, self.strength = list(urls), dict(directions), strength
        self.positions = positions
        self.push_every = push_every
        self.pairs, self.margin_before = pairs, margin_before
        self.gain_steered = margin_steered - margin_before
        self.emit = emit
        self.served = strength
        self.record = HandoffRecord()
        self.api_key, self.timeout = api_key, timeout
        self._engines = [VLLMEngine(url, api_key, timeout=timeout) for url in self.urls]
        # Probes for the whole hand-off, however long training runs.
        # Paced: back to back, the probes kept a CPU server's worker busy and starved the
        # training beside it (smollm2 on 2 cores: a step took minutes instead of seconds).
        self._probes = RequestLoop(self.urls, threads=1, limit=PROBES_AT_MOST, api_key=api_key,
                                   pause=PROBE_PAUSE_S)

    def generator(self) -> Engine:
        """The first server, serving the steered behavior: distillation samples it."""
        return self._engines[0]

    def start(self, base: Path | None) -> None:
        """Serve `base` (a model folder; None: the servers already serve it) with the
        steering at full strength, and start the probe requests."""
        pushed = self._push(base) if base is not None else 0.0
        self._steer(self.strength)
        self._probes.start()
        self._point(0, self.margin_before, pushed)

    def due(self, step: int, steps: int) -> bool:
        """Whether training step `step` of `steps` pushes (the last one is `finish`'s)."""
        return bool(self.push_every) and step % self.push_every == 0 and step < steps

    def step(self, step: int, weights: Mapping[str, torch.Tensor], local: Engine) -> None:
        """Push `weights` (checkpoint names) and lower the strength by what the weights
        carry now, as measured on `local` (the training copy, unsteered)."""
        pushed = self._push(weights)
        weights_margin = behavior_margin(local, self.pairs)
        strength = min(self.served, lowered_strength(
            self.strength, weights_margin - self.margin_before, self.gain_steered))
        if strength != self.served:
            self._steer(strength)
        self.emit(TrainEval(step=step, margin=weights_margin))
        self._point(step, weights_margin, pushed)

    def finish(self, step: int, weights: Mapping[str, torch.Tensor], weights_margin: float) -> HandoffRecord:
        """Serve the final trained tensors with no steering; stop the probes."""
        try:
            pushed = self._push(weights)
            self._steer(0.0)
            self._point(step, weights_margin, pushed)
        finally:
            self.close()
        return self.record

    def close(self) -> None:
        """Stop the probes and count them (safe to call twice)."""
        if self._probes is not None:
            self._probes.stop()
            self.record.requests = len(self._probes.requests)
            self.record.requests_failed = len(self._probes.failed)
            self._probes = None
        for engine in self._engines:
            engine.close()

    def _push(self, source: Path | Mapping[str, torch.Tensor]) -> float:
        report = push_weights(self.urls, source, api_key=self.api_key, timeout=self.timeout)
        self.record.push_seconds += report.seconds
        self.record.pushes += 1
        return report.seconds * 1000.0

    def _steer(self, strength: float) -> None:
        for engine in self._engines:
            if strength > 0:
                engine.set_steering(self.directions, strength, self.positions)
            else:
                engine.clear_steering()
        self.served = strength

    def _point(self, step: int, weights_margin: float, push_ms: float) -> None:
        served_margin = behavior_margin(self._engines[0], self.pairs)
        point = ServedPoint(step, self.served, served_margin, weights_margin, push_ms)
        self.record.points.append(point)
        self.emit(HandoffServed(step=step, strength=point.strength, served_margin=served_margin,
                                weights_margin=weights_margin))
        if push_ms:
            for url in self.urls:
                self.emit(Push(url=url, ms=push_ms, step=step, strength=point.strength,
                               served_margin=served_margin))


def trained_tensors(checkpoint_views: Mapping[str, torch.Tensor], target_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the checkpoint-named tensors that training changes. Fused MoE experts
    are trained in memory as one 3-D tensor and pushed as the per-expert matrices of the
    checkpoint format."""
    fused = tuple(name[: name.rindex(".") + 1] for name in target_names
                  if name.endswith(("experts.gate_up_proj", "experts.down_proj")))
    names = set(target_names)
    return {name: view.detach().contiguous().clone() for name, view in checkpoint_views.items()
            if name in names or (fused and name.startswith(fused))}


