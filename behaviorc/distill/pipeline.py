"""Distillation as the TrainBehavior task: make a steered behavior permanent.

Phases, each timed into the task's metrics:
1. measure (base model): the margin on held-out pairs without steering
   (`margin_before`) and with it (`margin_steered`), the general NLL (`general_nll_before`);
2. generate (`seconds_generate`): sample the prompts with steering on, score, keep the
   best (`behaviorc.distill.data`). With a live hand-off the samples come from the
   server, which serves exactly that steered model; otherwise from the embedded copy;
3. targets (`seconds_targets`): the steered hidden states for activation matching,
   when `match_activations` is on;
4. train (`seconds_train`, pushes excluded): the plain model on (prompt, kept sample)
   plus the spec's own examples and general mix, APOLLO and context-frozen as the spec
   says, through the training loop;
5. push (`seconds_push`): with a live hand-off, the base at the start, the trained
   tensors every `push_every` steps and at the end (`behaviorc.distill.handoff`);
6. verify: `margin_after` (trained, no steering), `general_nll_after`, and
   `steered_share = (margin_after - margin_before) / (margin_steered - margin_before)`,
   the share of the steered effect the weights now carry (1: all of it; not reported
   when the steering did not raise the margin).

The live server has one owner: for a behavior whose deploy says `handoff on`, lowering
gives the deploy to this task and emits no separate DeployModel. With `auto` this task
starts the server (the base model) for its whole run and stops it after; with URLs it
pushes into them. If training fails midway the servers keep the last pushed weights
with the strength that went with them, a consistent pair.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

from behaviorc.diagnostics import BehaviorError
from behaviorc.plan.task import TaskContext, TaskResult
from behaviorc.plan.tasks import TrainBehavior

SAMPLES_IN_DATA = 8  # distilled examples kept in the task's data for a reader to see
PROJECTION_PROMPTS = 3  # eval prompts replied to for the activation-projection score


def distill_behavior(task: TrainBehavior, ctx: TaskContext) -> TaskResult:
    from behaviorc.distill.activations import ActivationMatch, steered_targets
    from behaviorc.distill.data import distill_data
    from behaviorc.distill.handoff import live_handoff, trained_tensors
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.protocol import steered
    from behaviorc.measure.margin import behavior_margin
    from behaviorc.measure.nll import general_nll
    from behaviorc.measure.projection import replies_and_score
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.loading import load_model
    from behaviorc.steer.vectors import load_steering
    from behaviorc.train.data import BatchSchedule, encode_examples, encode_texts
    from behaviorc.train.loop import StepEvent, train
    from behaviorc.train.tasks import save_model

    spec = task.train
    distill = spec.distill
    loc = distill.loc or spec.loc or task.loc
    if task.steering is None:
        raise BehaviorError("`distill steering` needs the behavior's steering", loc,
                            hint="add a steer section to the behavior")
    if not task.eval_pairs:
        raise BehaviorError("distillation needs pairs to measure the behavior on", loc,
                            hint="add an eval section with pairs")
    decl = task.model.decl
    path = ctx.result(task.model).data["path"]
    directions = dict(load_steering(ctx.result(task.steering).path("vectors"), loc).directions)
    ctx.progress(0, spec.steps, "loading the model")
    model, tokenizer = load_model(path, decl.dtype, decl.device)
    adapter = ArchitectureAdapter.for_model(model)
    try:
        targets = adapter.parameters(model, spec.targets)
    except BehaviorError as err:
        raise BehaviorError(str(err), spec.loc, hint=err.diagnostics[0].hint) from None
    engine = EmbeddedEngine(model, tokenizer, name=decl.source, path=path)
    pairs, general = task.eval_pairs, task.general

    metrics: dict[str, float] = {"margin_before": behavior_margin(engine, pairs)}
    with steered(engine, directions, task.strength):
        metrics["margin_steered"] = behavior_margin(engine, pairs)
    # How much of the trait replies express (measure.projection): base, steered, trained.
    reply_prompts = list(dict.fromkeys(p.prompt for p in pairs))[:PROJECTION_PROMPTS]
    projections = {"projection_before": replies_and_score(engine, directions, reply_prompts)[1],
                   "projection_steered": replies_and_score(engine, directions, reply_prompts,
                                                           task.strength)[1]}
    if general:
        metrics["general_nll_before"] = general_nll(engine, general)
    ctx.emit("train_eval", step=0, margin=metrics["margin_before"],
             margin_steered=metrics["margin_steered"])

    with ExitStack() as stack:
        handoff = stack.enter_context(live_handoff(task, ctx, path, directions, metrics["margin_before"],
                                                   metrics["margin_steered"]))
        generator = handoff.generator() if handoff is not None else engine

        ctx.progress(0, spec.steps, f"sampling {len(distill.prompts)} prompts x {distill.samples}")
        began = time.perf_counter()
        # Sampled from the served, steered model in a hand-off; else from this one, steered.
        with steered(engine, directions, task.strength) if handoff is None else nullcontext():
            data = distill_data(generator, engine, directions, task.strength, distill, spec.seed, loc)
        metrics["seconds_generate"] = time.perf_counter() - began
        metrics["samples_generated"] = float(data.generated)
        metrics["samples_kept"] = float(len(data.kept))
        metrics["sample_score"] = data.mean_score
        ctx.emit("distill.data", generated=data.generated, kept=len(data.kept), empty=data.empty,
                 mean_score=data.mean_score, engine="vllm" if handoff else "embedded")

        distilled = encode_examples(tokenizer, data.examples, loc)
        behavior = encode_examples(tokenizer, spec.examples, spec.loc) + distilled
        mix = encode_texts(tokenizer, spec.mix.texts) if spec.mix else []
        schedule = BatchSchedule(behavior, mix, spec.batch, spec.mix.ratio if spec.mix else 0.0, spec.seed)

        extra_loss = None
        if distill.match_activations > 0:
            began = time.perf_counter()
            layers = adapter.decoder_layers(model)
            wanted = steered_targets(model, layers, directions, task.strength, distilled,
                                     tokenizer.pad_token_id)
            extra_loss = stack.enter_context(
                ActivationMatch(layers, wanted, distill.match_activations, spec.context))
            metrics["seconds_targets"] = time.perf_counter() - began

        paused_training = [0.0]  # seconds of the loop spent pushing and measuring

        def trained() -> dict[str, Any]:
            return trained_tensors(adapter.checkpoint_tensors(model), list(targets))

        def on_step(event: StepEvent) -> None:
            ctx.emit("train_step", step=event.step, steps=spec.steps, loss=event.loss,
                     grad_norm=event.grad_norm, lr=event.lr, limiter=event.limiter,
                     tokens_per_s=event.tokens_per_s, skipped=event.skipped)
            ctx.progress(event.step, spec.steps, f"loss {event.loss:.4f}")
            if handoff is not None and handoff.due(event.step, spec.steps):
                handing_over = time.perf_counter()
                handoff.step(event.step, trained(), engine)
                paused_training[0] += time.perf_counter() - handing_over
            ctx.check_cancelled()

        began = time.perf_counter()
        summary = train(model, targets, schedule, spec, pad_id=tokenizer.pad_token_id,
                        on_step=on_step, extra_loss=extra_loss)
        metrics["seconds_train"] = time.perf_counter() - began - paused_training[0]

        metrics["margin_after"] = behavior_margin(engine, pairs)
        projections["projection_after"] = replies_and_score(engine, directions, reply_prompts)[1]
        metrics.update({k: v for k, v in projections.items() if v is not None})
        if general:
            metrics["general_nll_after"] = general_nll(engine, general)
        gain = metrics["margin_steered"] - metrics["margin_before"]
        if gain > 0:
            metrics["steered_share"] = (metrics["margin_after"] - metrics["margin_before"]) / gain
        else:  # a ratio over a gain that is not there would be noise, not a share
            ctx.emit("distill.note", message=f"the steering did not raise the margin ({gain:+.4f}), "
                     "so there is no steered effect for the weights to carry: no steered_share")
        metrics.update(summary.metrics())
        folder = Path(ctx.out) / "model"
        save_model(model, tokenizer, folder)

        served: list[dict[str, Any]] = []
        if handoff is not None:
            record = handoff.finish(spec.steps, trained(), metrics["margin_after"])
            metrics.update(record.metrics())
            served = [vars(p) for p in record.points]
    ctx.emit("train_eval", step=spec.steps, margin=metrics["margin_after"],
             steered_share=metrics.get("steered_share"))
    return TaskResult(
        metrics=metrics, artifacts={"model": "model"},
        data={"losses": summary.losses, "targets": sorted(targets), "served": served,
              "prompt_format": engine.prompt_format,
              "samples": [{"prompt": s.prompt, "response": s.response, "score": s.score}
                          for s in data.kept[:SAMPLES_IN_DATA]]})
