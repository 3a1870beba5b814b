"""The TrainBehavior plan task: fine-tune a behavior's target groups with APOLLO.

It trains a private copy of the model (the executor's shared engines stay untouched),
measures the behavior margin and the general NLL before and after on that copy, and
writes the fine-tuned model as a Hugging Face folder. Checkpoints go to the task's
scratch folder when the executor offers one, so a build stopped mid-training resumes.
With a live hand-off (`handoff on` in the behavior's deploy) the servers serve the base
steered from the start and the trained tensors as training goes, the steering lowered by
what the weights carry (`behaviorc.distill.handoff`), as for distillation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from behaviorc.atomic import atomic_folder
from behaviorc.diagnostics import BehaviorError
from behaviorc.plan.task import TaskContext, TaskResult
from behaviorc.plan.tasks import TrainBehavior

CHECKPOINT_EVERY = 50


def train_behavior(task: TrainBehavior, ctx: TaskContext) -> TaskResult:
    from behaviorc.distill.handoff import live_handoff, trained_tensors
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.protocol import steered
    from behaviorc.measure.margin import behavior_margin
    from behaviorc.measure.nll import general_nll
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.loading import load_model
    from behaviorc.testbed.scoring import testbed_rate
    from behaviorc.train.data import BatchSchedule, encode_examples, encode_texts
    from behaviorc.train.loop import StepEvent, train

    spec = task.train
    if spec.distill is not None:
        from behaviorc.distill.pipeline import distill_behavior
        return distill_behavior(task, ctx)
    decl = task.model.decl
    path = ctx.result(task.model).data["path"]
    ctx.progress(0, spec.steps, "loading the model")
    model, tokenizer = load_model(path, decl.dtype, decl.device)
    adapter = ArchitectureAdapter.for_model(model)
    try:
        targets = adapter.parameters(model, spec.targets)
    except BehaviorError as err:
        raise BehaviorError(str(err), spec.loc, hint=err.diagnostics[0].hint) from None

    behavior = encode_examples(tokenizer, spec.examples, spec.loc)
    general = encode_texts(tokenizer, spec.mix.texts) if spec.mix else []
    if not behavior:
        raise BehaviorError(f"behavior `{task.name}` has no training examples", spec.loc,
                            hint="add `examples \"FILE.jsonl\"` to its train block")
    schedule = BatchSchedule(behavior, general, spec.batch, spec.mix.ratio if spec.mix else 0.0, spec.seed)

    engine = EmbeddedEngine(model, tokenizer, name=decl.source, path=path)
    metrics: dict[str, float] = {}
    if task.eval_pairs:
        metrics["margin_before"] = behavior_margin(engine, task.eval_pairs)
    if task.general:
        metrics["general_nll_before"] = general_nll(engine, task.general)
    metrics.update(testbed_rate(engine, decl.source, task.name, "before"))
    directions = {}
    if task.handoff is not None:
        from behaviorc.steer.vectors import load_steering
        directions = dict(load_steering(ctx.result(task.steering).path("vectors"), spec.loc).directions)
        with steered(engine, directions, task.strength):
            metrics["margin_steered"] = behavior_margin(engine, task.eval_pairs)

    def trained() -> dict[str, Any]:
        return trained_tensors(adapter.checkpoint_tensors(model), list(targets))

    served: list[dict[str, Any]] = []
    with live_handoff(task, ctx, path, directions, metrics.get("margin_before", 0.0),
                      metrics.get("margin_steered", 0.0)) as handoff:

        def on_step(event: StepEvent) -> None:
            ctx.emit("train_step", step=event.step, loss=event.loss, grad_norm=event.grad_norm,
                     lr=event.lr, limiter=event.limiter, tokens_per_s=event.tokens_per_s,
                     skipped=event.skipped)
            ctx.progress(event.step, spec.steps, f"loss {event.loss:.4f}")
            if handoff is not None and handoff.due(event.step, spec.steps):
                handoff.step(event.step, trained(), engine)

        # The scratch folder outlives a stopped build, so a rerun resumes from the checkpoint.
        checkpoint = ctx.scratch / "checkpoint"
        summary = train(model, targets, schedule, spec, pad_id=tokenizer.pad_token_id, on_step=on_step,
                        checkpoint_dir=checkpoint, checkpoint_every=CHECKPOINT_EVERY)
        shutil.rmtree(checkpoint, ignore_errors=True)  # finished: a rerun starts afresh
        ctx.check_cancelled()

        metrics.update(summary.metrics())
        if task.eval_pairs:
            metrics["margin_after"] = behavior_margin(engine, task.eval_pairs)
        if task.general:
            metrics["general_nll_after"] = general_nll(engine, task.general)
        metrics.update(testbed_rate(engine, decl.source, task.name, "after"))
        if handoff is not None:
            record = handoff.finish(spec.steps, trained(), metrics["margin_after"])
            metrics.update(record.metrics())
            served = [vars(p) for p in record.points]

    save_model(model, tokenizer, Path(ctx.out) / "model")
    return TaskResult(metrics=metrics, artifacts={"model": "model"},
                      data={"losses": summary.losses, "targets": sorted(targets),
                            "prompt_format": engine.prompt_format,
                            "resumed_from": summary.resumed_from, "served": served})


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """A Hugging Face folder (checkpoint format, safetensors), written beside and renamed."""
    with atomic_folder(folder, overwrite=True) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
