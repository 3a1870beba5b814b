"""The training recipe, top to bottom: one for plain fine-tuning and for distillation.

1. load a private copy of the model (the executor's shared engines stay untouched) and
   select the spec's target groups;
2. measure before: the behavior margin on held-out pairs (`margin_before`), with the
   behavior's steering on when the task carries it (`margin_steered`), the general NLL
   (on the spec's general texts, else the default ones), and greedy replies to a few
   held-out prompts without and with the steering;
3. with a live hand-off (`handoff on` in the behavior's deploy), serve the base steered
   from here on (`behaviorc.train.handoff`);
4. the examples, from a data source: the spec's own examples, or for `distill steering`
   also what the steered model says, scored and kept (`behaviorc.train.distill_data`),
   with an optional activation-matching loss;
5. the training loop (`behaviorc.train.loop`), checkpointing into the task's scratch
   folder so a stopped build resumes; the hand-off pushes the trained tensors every
   `push_every` steps and lowers the served strength by what the weights carry;
6. measure after: `margin_after` (steering off), `general_nll_after`, where the steering
   raised the margin `steered_share = (after - before) / (steered - before)`, and the
   trained model's replies to the same prompts, beside the base and steered ones;
7. write the model folder; the hand-off serves the final weights with no steering.

The live server has one owner: for a behavior whose deploy says `handoff on`, lowering
gives the deploy to this task and emits no separate DeployModel. If training fails
midway the servers keep the last pushed weights with the strength that went with them.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location, located_at
from behaviorc.core.events import DistillData, TrainEval, TrainNote, TrainStep
from behaviorc.core.task import TaskContext, TaskResult
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.protocol import Engine, steered
from behaviorc.formats.steering import load_steering
from behaviorc.measure.capability import capability_accuracy
from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
from behaviorc.measure.margin import behavior_margin
from behaviorc.measure.nll import general_nll
from behaviorc.measure.projection import projection_score
from behaviorc.measure.replies import reply_prompts, sample_replies
from behaviorc.model.adapter import ArchitectureAdapter
from behaviorc.model.chat import system_prompted
from behaviorc.model.loading import context_positions, load_model, refuse_over_context
from behaviorc.model.chat import set_thinking, thinking_mode
from behaviorc.model.saving import save_model
from behaviorc.train.activations import Matching
from behaviorc.train.data import BatchSchedule, TrainSequence, encode_examples, encode_texts
from behaviorc.train.distributed import current_world
from behaviorc.train.distill_data import distill_data
from behaviorc.train.handoff import live_handoff, trained_tensors
from behaviorc.train.loop import CHECKPOINT_EVERY, StepEvent, train
from behaviorc.train.ranks import lead_training
from behaviorc.train.teacher import Teacher, TeacherRow

SAMPLES_IN_DATA = 8  # distilled examples kept in the task's data for a reader to see
MEMORISED = 0.05  # a last training loss below this on token targets: memorised, flagged


@dataclass
class Examples:
    """What a data source gives the loop: the behavior's sequences, optional activation
    matching, the rows that learn a teacher's distribution, and what it reports
    (metrics, data, warnings)."""

    behavior: list[TrainSequence]
    matching: Matching | None = None
    taught: list[TeacherRow] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Run:
    """The model being trained and what the data sources may use of it."""

    model: Any
    tokenizer: Any
    engine: EmbeddedEngine
    adapter: ArchitectureAdapter
    directions: dict[int, torch.Tensor]  # the behavior's steering, when the task carries it
    strength: float
    seed: int


def spec_examples(train_spec: ir.Train, run: Run, generator: Engine, ctx: TaskContext) -> Examples:
    """The data source of plain fine-tuning: the spec's examples."""
    return Examples(encode_examples(run.tokenizer, train_spec.examples, train_spec.loc))


def distilled_examples(train_spec: ir.Train, run: Run, generator: Engine, ctx: TaskContext) -> Examples:
    """The data source of distillation: the spec's examples and the best of what the
    teacher (the steered model, `generator`, and/or the base reading the system prompt)
    says to the distill prompts. `objective kl` teaches the teacher's distribution over
    them and over the plain model's own replies; `match_activations` adds a loss pulling
    the hidden states toward the steered model's."""
    distill = train_spec.distill
    loc = distill.loc or train_spec.loc
    ctx.progress(0, train_spec.steps, f"sampling {len(distill.prompts)} prompts x {distill.samples}")
    began = time.perf_counter()
    teacher_prompts = ([system_prompted(run.tokenizer, distill.system, p) for p in distill.prompts]
                       if distill.system is not None else None)
    directions = run.directions if distill.steering else {}
    # A hand-off samples the served, steered model; otherwise this copy, steered here.
    own = generator is run.engine
    with steered(run.engine, directions, run.strength) if own and directions else nullcontext():
        data = distill_data(generator, run.engine, directions, run.strength, distill,
                            run.seed, loc, teacher_prompts)
    ctx.emit(DistillData(generated=data.generated, kept=len(data.kept), empty=data.empty,
                         mean_score=data.mean_score, engine="embedded" if own else "vllm"))
    result = Examples(
        encode_examples(run.tokenizer, train_spec.examples, train_spec.loc),
        metrics={"seconds_generate": time.perf_counter() - began,
                 "samples_generated": float(data.generated), "samples_kept": float(len(data.kept)),
                 "samples_dropped": float(data.looping + data.broken), "sample_score": data.mean_score},
        data={"samples": [{"prompt": s.prompt, "response": s.response, "score": s.score}
                          for s in data.kept[:SAMPLES_IN_DATA]]})
    if data.dropped:
        result.warnings.append(f"the teacher's samples: dropped {data.dropped}")
    distilled = encode_examples(run.tokenizer, data.examples, loc)
    result.behavior += distilled
    objective = distill.objective
    if objective.name == "kl":
        sets = [(data.kept, distilled, 1.0)]
        if objective.plain > 0:
            plain = encode_examples(run.tokenizer, [ir.Example(context=s.prompt, response=s.response)
                                                    for s in data.plain], loc)
            result.behavior += plain
            sets.append((data.plain, plain, objective.plain))
        for samples, sequences, weight in sets:
            for sample, sequence in zip(samples, sequences):
                context = (tuple(run.tokenizer(system_prompted(run.tokenizer, distill.system, sample.prompt)).input_ids)
                           if distill.system is not None else sequence.context)
                result.taught.append(TeacherRow(sequence, context, bool(directions), weight, objective.temperature))
    if distill.match_activations > 0:
        result.matching = Matching(distill.match_activations, run.strength, run.directions, tuple(distilled))
    return result


def run_training(ctx: TaskContext, *, task_id: str, task_key: str, name: str, model_path: str,
                 decl: ir.ModelDecl,
                 train_spec: ir.Train, eval_pairs: Sequence[ir.Pair], general: Sequence[str],
                 steering_file: Path | None, strength: float, handoff: ir.Deploy | None,
                 loc: Location | None) -> TaskResult:
    """Train `name`'s behavior into a copy of the model at `model_path`; the result's
    artifact `model` is the trained folder. In a build on several processes (`--nproc`,
    torchrun) this runs on rank 0, which makes the data (distilled samples included) and
    measures; the loop runs on every rank, the model sharded over them
    (`behaviorc.train.ranks`)."""
    distill = train_spec.distill
    source = distilled_examples if distill is not None else spec_examples
    if distill is not None and distill.steering:
        loc = distill.loc or train_spec.loc or loc
        if steering_file is None:
            raise BehaviorError("`distill steering` needs the behavior's steering", loc,
                                hint="add a steer section to the behavior")
        if not eval_pairs:
            raise BehaviorError("distillation needs pairs to measure the behavior on", loc,
                                hint="add an eval section with pairs")

    world = current_world()
    if world is not None and handoff is not None:
        raise BehaviorError("a live hand-off trains in one process: it reads the weights as they "
                            "train", train_spec.loc, hint="build without --nproc, or drop `handoff on`")
    anchored = train_spec.mix is not None and train_spec.mix.anchor == "kl"
    if world is not None and (anchored or (distill is not None and distill.objective.name == "kl")):
        raise BehaviorError("a teacher's distribution (`objective kl`, `anchor kl`) trains in one "
                            "process", (train_spec.mix.loc if anchored else distill.loc) or train_spec.loc,
                            hint="build without --nproc, or write `objective sft` / drop `anchor kl`")

    # 1. the model and its targets
    ctx.progress(0, train_spec.steps, "loading the model")
    model, tokenizer = load_model(model_path, decl.dtype, decl.device)
    set_thinking(tokenizer, decl.thinking)
    adapter = ArchitectureAdapter.for_model(model)
    with located_at(train_spec.loc):
        targets = adapter.parameters(model, train_spec.targets)
    engine = EmbeddedEngine(model, tokenizer, name=decl.source, path=model_path)
    directions = dict(load_steering(steering_file, loc).directions) if steering_file else {}
    run = Run(model, tokenizer, engine, adapter, directions, strength, train_spec.seed)

    # 2. before
    general = general or DEFAULT_GENERAL_TEXTS  # what training costs is always measured
    metrics: dict[str, float] = {}
    if eval_pairs:
        metrics["margin_before"] = behavior_margin(engine, eval_pairs)
        if directions:
            with steered(engine, directions, strength):
                metrics["margin_steered"] = behavior_margin(engine, eval_pairs)
        ctx.emit(TrainEval(step=0, margin=metrics["margin_before"],
                           margin_steered=metrics.get("margin_steered")))
    system = distill.system if distill is not None else None
    if eval_pairs and system is not None:  # the prompt teacher's margin: the prompts with the system prompt
        teacher_pairs = [ir.Pair(prompt=system_prompted(tokenizer, system, p.prompt), positive=p.positive,
                                 negative=p.negative) for p in eval_pairs]
        with steered(engine, directions, strength) if distill.steering else nullcontext():
            metrics["margin_teacher"] = behavior_margin(engine, teacher_pairs)
    metrics["general_nll_before"] = general_nll(engine, general)
    # what a teacher or an anchor may cost besides the general NLL (plain fine-tuning skips it)
    probed = distill is not None or anchored
    if probed:
        metrics["capability_before"] = capability_accuracy(engine)
    ctx.progress(0, train_spec.steps, "sample replies before training")
    # a behavior taught by a system prompt alone may have no pairs: its first distill prompts then
    shown = reply_prompts(eval_pairs) or reply_prompts(
        [ir.Pair(prompt=p, positive="", negative="") for p in distill.prompts] if distill else [])
    replies = {"base": sample_replies(engine, shown)}
    if system is not None:
        replies["prompted"] = sample_replies(engine, [system_prompted(tokenizer, system, p) for p in shown])
    if directions:
        replies["steered"] = sample_replies(engine, shown, steering=directions, strength=strength)
        # How much of the trait the replies express, read by the base model unsteered.
        for which, name in (("base", "projection_before"), ("steered", "projection_steered")):
            _keep(metrics, name, projection_score(engine, directions, shown, replies[which]))

    def trained() -> dict[str, Any]:
        return trained_tensors(adapter.checkpoint_tensors(model), list(targets))

    data: dict[str, Any] = {"targets": sorted(targets), "served": [],
                            "prompt_format": engine.prompt_format,
                            "thinking": thinking_mode(tokenizer)}
    with ExitStack() as stack:
        # 3. the live hand-off, serving the base steered
        live = stack.enter_context(live_handoff(
            handoff, ctx, model_path, directions, strength, eval_pairs, train_spec.steps,
            metrics.get("margin_before", 0.0), metrics.get("margin_steered", 0.0)))

        # 4. the examples
        examples = source(train_spec, run, live.generator() if live else engine, ctx)
        if not examples.behavior:
            raise BehaviorError(f"behavior `{name}` has no training examples", train_spec.loc,
                                hint="add `examples \"FILE.jsonl\"` to its train block")
        metrics.update(examples.metrics)
        data.update(examples.data)
        warnings = list(examples.warnings)
        for warning in warnings:
            ctx.emit(TrainNote(warning))
        mix = encode_texts(tokenizer, train_spec.mix.texts) if train_spec.mix else []
        taught = examples.taught + [TeacherRow(s, s.context, False, 1.0, 1.0) for s in (mix if anchored else [])]
        positions = context_positions(model.config)
        for kind, sequences in (("training example", examples.behavior), ("general text", mix)):
            for number, sequence in enumerate(sequences, 1):
                refuse_over_context(sequence.tokens, positions, f"{kind} {number}", train_spec.loc)
        schedule = BatchSchedule(examples.behavior, mix, train_spec.batch,
                                 train_spec.mix.ratio if train_spec.mix else 0.0, train_spec.seed)

        # 5. the loop
        paused = [0.0]  # seconds of the loop spent pushing and measuring for the hand-off

        def on_step(event: StepEvent) -> None:
            ctx.emit(TrainStep(step=event.step, steps=train_spec.steps, loss=event.loss,
                               grad_norm=event.grad_norm, lr=event.lr, limiter=event.limiter,
                               tokens_per_s=event.tokens_per_s, skipped=event.skipped))
            ctx.progress(event.step, train_spec.steps, f"loss {event.loss:.4f}")
            if live is not None and live.due(event.step, train_spec.steps):
                handing_over = time.perf_counter()
                live.step(event.step, trained(), engine)
                paused[0] += time.perf_counter() - handing_over
            ctx.check_cancelled()

        # The scratch folder outlives a stopped build, so a rerun resumes from the checkpoint.
        checkpoint = ctx.scratch / "checkpoint"
        matching, extra, distributions = examples.matching, None, None
        began = time.perf_counter()
        if matching is not None and world is None:  # on several processes, each rank's training makes its own
            extra = stack.enter_context(matching.start(model, adapter.decoder_layers(model),
                                                       tokenizer.pad_token_id, train_spec.context))
        if taught:
            ctx.progress(0, train_spec.steps, f"the teacher's distributions over {len(taught)} sequences")
            teacher = Teacher(tuple(taught), directions, strength, distill.objective.top_k if distill else 0)
            distributions = teacher.distributions(model, adapter.decoder_layers(model), tokenizer.pad_token_id)
        if matching is not None or taught:
            metrics["seconds_targets"] = time.perf_counter() - began
        began = time.perf_counter()
        if world is not None:
            summary = lead_training(world, task_id, task_key, decl, train_spec, Path(model_path),
                                    schedule, checkpoint, on_step, targets, matching)
        else:
            summary = train(model, targets, schedule, train_spec, pad_id=tokenizer.pad_token_id,
                            on_step=on_step, checkpoint_dir=checkpoint,
                            checkpoint_every=CHECKPOINT_EVERY, extra_loss=extra, teacher=distributions)
        if train_spec.distill is not None:
            metrics["seconds_train"] = time.perf_counter() - began - paused[0]
        ctx.check_cancelled()
        metrics.update(summary.metrics())
        data.update(losses=summary.losses, resumed_from=summary.resumed_from)
        learned = {row.sequence for row in taught}
        tokens_learned = [s for s in examples.behavior if s not in learned]
        if tokens_learned and metrics["loss_last"] < MEMORISED:
            warnings.append(f"the training loss fell to {metrics['loss_last']:.3f} on "
                            f"{len(set(tokens_learned))} examples: the model has memorised them, and its "
                            "replies may copy them (more prompts or samples, fewer steps, or `objective kl`)")
            ctx.emit(TrainNote(warnings[-1]))

        # 6. after
        if eval_pairs:
            metrics["margin_after"] = behavior_margin(engine, eval_pairs)
        metrics["general_nll_after"] = general_nll(engine, general)
        if probed:
            metrics["capability_after"] = capability_accuracy(engine)
        replies["trained"] = sample_replies(engine, shown)
        if directions:
            _keep(metrics, "projection_after", projection_score(engine, directions, shown, replies["trained"]))
        data["replies"] = [{"prompt": prompt, **{which: texts[i].strip() for which, texts in replies.items()}}
                           for i, prompt in enumerate(shown)]
        if "margin_steered" in metrics:
            gain = metrics["margin_steered"] - metrics["margin_before"]
            if gain > 0:
                metrics["steered_share"] = (metrics["margin_after"] - metrics["margin_before"]) / gain
            else:  # a ratio over a gain that is not there would be noise, not a share
                ctx.emit(TrainNote(f"the steering did not raise the margin ({gain:+.4f}), so "
                                   "there is no steered effect for the weights to carry: no "
                                   "steered_share"))
        if "margin_teacher" in metrics and metrics["margin_teacher"] > metrics["margin_before"]:
            metrics["teacher_share"] = ((metrics["margin_after"] - metrics["margin_before"])
                                        / (metrics["margin_teacher"] - metrics["margin_before"]))
        data["warnings"] = warnings

        # 7. the model folder; the hand-off ends on the final weights, unsteered
        save_model(model, Path(ctx.out) / "model", Path(model_path))
        if live is not None:
            record = live.finish(train_spec.steps, trained(), metrics["margin_after"])
            metrics.update(record.metrics())
            data["served"] = [vars(p) for p in record.points]
    if eval_pairs:
        ctx.emit(TrainEval(step=train_spec.steps, margin=metrics["margin_after"],
                           steered_share=metrics.get("steered_share")))
    return TaskResult(metrics=metrics, artifacts={"model": "model"}, data=data)


def _keep(metrics: dict[str, float], name: str, score: float | None) -> None:
    if score is not None:  # None: every reply was empty
        metrics[name] = score
