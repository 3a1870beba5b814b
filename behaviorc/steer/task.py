"""The steering tasks: ExtractSteering, MeasureBase and VerifySteering, and what they run.

The methods import torch, so they are imported when a task runs: checking and planning
a spec never load them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from behaviorc.core import ir
from behaviorc.core.events import SteerLayers, SteerPoint, SteerVerdict
from behaviorc.core.metrics import STEER_BASE, STEER_EXTRACT, STEER_VERIFY
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.core.vocabulary import (FinalNormReading, Orientation, ReadPosition, SteerMethod,
                                       SteerPositions)
from behaviorc.model.chat import set_thinking, thinking_mode
from behaviorc.model.task import ResolveModel

VECTORS_FILE = "vectors.safetensors"
CONTROL_VECTOR_FILE = "control_vector.gguf"


def _engine(task: ExtractSteering | MeasureBase | VerifySteering, ctx: TaskContext):
    decl = task.model.decl
    engine = ctx.engine(ctx.result(task.model).data["path"], decl.dtype, decl.device)
    set_thinking(engine.tokenizer, decl.thinking)
    return engine


def extract_steering(task: ExtractSteering, ctx: TaskContext) -> TaskResult:
    from behaviorc.formats.steering import export_gguf, save_steering
    from behaviorc.steer.extract import choice, choice_warnings, extract

    engine = _engine(task, ctx)
    extraction = extract(
        engine, task.pairs, task.layers, task.method, task.read, orient=task.orient,
        after_final_norm=task.final_norm == "after", positions=task.positions,
        progress=ctx.progress,
        loc=task.loc)
    # The task key names exactly the inputs these vectors came from.
    vectors = extraction.vectors.with_directions(
        extraction.vectors.directions, extra={"task_key": task.key, "behavior": task.name})
    vectors = replace(vectors, spec_hash=ctx.spec_sha256)
    save_steering(vectors, ctx.out / VECTORS_FILE)
    artifacts = {"vectors": VECTORS_FILE}
    data: dict = {
        "prompt_format": engine.prompt_format,
        "thinking": thinking_mode(engine.tokenizer),
        "layers": list(vectors.layers),
        "norms": {str(layer): norm for layer, norm in vectors.norms.items()},
        # what strength 1 moves, relative to a typical hidden state at the layer
        "relative_norms": {str(layer): vectors.norms[layer] / extraction.state_norms[layer]
                           for layer in vectors.layers if extraction.state_norms.get(layer)},
    }
    # llama.cpp keeps no control vector for layer 0 (see formats.steering on GGUF numbering); the GGUF holds
    # the other layers and the data says which it left out.
    exportable = [layer for layer in vectors.layers if layer > 0]
    if exportable:
        export_gguf(vectors.select(exportable), ctx.out / CONTROL_VECTOR_FILE)
        artifacts["control_vector"] = CONTROL_VECTOR_FILE
    data["control_vector_layers"] = exportable
    metrics: dict[str, float] = {}
    if extraction.scores:
        data["scores"] = [
            {"layer": s.layer, "consistency": s.consistency, "accuracy": s.accuracy,
             "effect": s.effect, "lift": s.lift, "distillable": s.distillable,
             "behavior": s.behavior, "broke": list(s.broke)}
            for s in extraction.scores]
        chosen = next(s for s in extraction.scores if s.layer == vectors.layers[0])
        data["chosen"] = chosen.layer
        data["choice"] = choice(extraction.scores, chosen.layer)
        data["warnings"] = list(choice_warnings(extraction.scores, chosen.layer))
        metrics["layer"] = float(chosen.layer)
        metrics["separation"] = chosen.consistency
        if chosen.effect is not None:
            metrics["layer_effect"] = chosen.effect
        if chosen.lift is not None:
            metrics["layer_lift"] = chosen.lift
        ctx.emit(SteerLayers(scores=data["scores"], chosen=chosen.layer))
    return TaskResult(metrics=metrics, artifacts=artifacts, data=data)


def measure_base(task: MeasureBase, ctx: TaskContext) -> TaskResult:
    from behaviorc.steer.verify import measure_base

    engine = _engine(task, ctx)
    ctx.progress(0, 1, "measuring the base model")
    point = measure_base(engine, task.pairs, task.general)
    metrics = {"margin_before": point.margin, "general_nll_before": point.general_nll,
               "repetition_before": point.repetition}
    if point.capability is not None:
        metrics["capability_before"] = point.capability
    return TaskResult(metrics=metrics, data={"point": point.as_dict(),
                                             "prompt_format": engine.prompt_format})


def verify_steering(task: VerifySteering, ctx: TaskContext) -> TaskResult:
    from behaviorc.formats.steering import load_steering
    from behaviorc.measure.replies import reply_prompts
    from behaviorc.steer.verify import SAMPLE_PROMPTS, Budget, SweepPoint, verify

    vectors = load_steering(ctx.result(task.vectors).path("vectors"), task.loc)
    base = SweepPoint.from_dict(ctx.result(task.base).data["point"])
    engine = _engine(task, ctx)

    def on_point(point: SweepPoint, done: int, total: int) -> None:
        ctx.emit(SteerPoint(**point.as_dict()))
        ctx.progress(done, total, f"strength {point.strength:g}")

    pairs = task.base.pairs
    result = verify(engine, vectors, task.strength, pairs, task.base.general, task.sweep,
                    on_point, task.loc, Budget(task.nll_budget, task.repetition_budget),
                    base=base)
    if result.warnings:
        ctx.emit(SteerVerdict(warnings=list(result.warnings), strength=result.strength))
    control = result.control
    metrics = result.metrics()
    # Strength 1 is the pairs' own contrast; beside it, how far that moves a typical
    # hidden state at the layer, which says more about what the text can take.
    relative = {layer: result.strength * share
                for layer, share in ctx.result(task.vectors).data.get("relative_norms", {}).items()}
    if relative:
        metrics["strength_relative"] = max(relative.values())
    return TaskResult(
        metrics=metrics,
        data={
            "strength": result.strength,
            "strength_relative": relative,
            "choice": result.choice,
            "warnings": list(result.warnings),
            "control": {"strength": control.strength, "margin": control.margin,
                        "effect": result.control_effect, "right_share": control.right_share,
                        "wrong_share": control.wrong_share},
            "pairs": [{"prompt": pair.prompt, "margin_before": before, "margin_steered": after}
                      for pair, before, after in zip(pairs, result.before.margins,
                                                     result.steered.margins)],
            "sample_prompts": reply_prompts(pairs, SAMPLE_PROMPTS),
            "sweep": [p.as_dict() for p in result.sweep],
            "before": result.before.as_dict(),
            "steered": result.steered.as_dict(),
            "prompt_format": engine.prompt_format,
            "thinking": thinking_mode(engine.tokenizer),
        },
    )


class ExtractSteering(Task):
    """Steering vectors from contrast pairs. artifacts: vectors (safetensors, a
    `layer.{L}` tensor per layer), control_vector (GGUF). data: layers, norms, and for
    `auto` the per-layer scores that chose them (separation; effect, lift and
    distillable effect, reply score and broken text for the steered candidates) and the
    choice, in words."""

    kind: ClassVar[str] = "steer.extract"
    # 2: `layers auto` keeps the largest distillable effect; 3: several layers share the
    # strength; 4: `layers auto` leaves out layers whose steered replies break; 5: it
    # keeps the layer whose steered replies score highest among those lifting the positives
    version: ClassVar[int] = 5
    keyless_defaults: ClassVar[tuple[str, ...]] = ("positions",)
    reports: ClassVar[tuple[str, ...]] = STEER_EXTRACT
    provides: ClassVar[dict[str, str]] = {"steering": "vectors"}
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    # Only what extraction reads, so changing a strength does not re-extract.
    layers: tuple[int, ...] | Literal["auto"]
    method: SteerMethod
    read: ReadPosition
    orient: Orientation = "mean"
    final_norm: FinalNormReading = "before"
    # written into the vectors: everything steered with them steers these positions
    positions: SteerPositions = "all"
    pairs: tuple[ir.Pair, ...]  # the extraction split

    def execute(self, ctx: TaskContext) -> TaskResult:
        return extract_steering(self, ctx)


class MeasureBase(Task):
    """The base model's side of a steering verification, steering off: held-out margins,
    general NLL, the capability probe and greedy replies. Its key holds only the model
    and the data measured, so a change of strength, layers, method, budget or training
    reuses it. metrics: core.metrics.STEER_BASE. data: point (a steer.verify SweepPoint
    at strength 0, without a projection: that needs the direction)."""

    kind: ClassVar[str] = "steer.base"
    reports: ClassVar[tuple[str, ...]] = STEER_BASE
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    pairs: tuple[ir.Pair, ...]  # the verification's held-out pairs
    general: tuple[str, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        return measure_base(self, ctx)


class VerifySteering(Task):
    """The steerability report: held-out margins with steering off, at the spec's
    strength (or the one `strength auto` chose inside the budget) and at each sweep
    strength, beside a random control direction; per-pair changes, cost (general NLL,
    capability probe, repetition) and greedy sample replies at each strength.
    metrics: core.metrics.STEER_VERIFY. data: strength, choice, warnings (the verdict),
    control, pairs [{prompt, margin_before, margin_steered}], sweep [{strength, margin,
    general_nll, capability, repetition, projection, right_share, wrong_share, samples}],
    sample_prompts."""

    kind: ClassVar[str] = "steer.verify"
    version: ClassVar[int] = 2  # 2: the base model measured apart; probe at the strength used
    reports: ClassVar[tuple[str, ...]] = STEER_VERIFY
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    vectors: ExtractSteering
    # Steering off, measured on the held-out pairs and general texts this task verifies on.
    base: MeasureBase
    strength: float | Literal["auto"]
    sweep: tuple[float, ...]
    nll_budget: float = 0.10  # `strength auto`'s and the verdict's cost budget
    repetition_budget: float = 0.10

    def execute(self, ctx: TaskContext) -> TaskResult:
        return verify_steering(self, ctx)
