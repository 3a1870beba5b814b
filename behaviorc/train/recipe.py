"""The training recipe: one class, read top to bottom, for plain fine-tuning and for
distillation (`TrainingRecipe.run`).

1. `setup`: load a private copy of the model (the executor's shared engines stay
   untouched) and select the spec's target groups;
2. `measure_before`: the behavior margin on held-out pairs (`margin_before`), with the
   behavior's steering on when the task carries it (`margin_steered`), the general NLL
   (on the spec's general texts, else the default ones), and greedy replies to a few
   held-out prompts without and with the steering;
3. with a live hand-off (`handoff on` in the behavior's deploy), serve the base steered
   from here on (`behaviorc.train.handoff`);
4. `examples`: the spec's own examples, and for `distill` also what the teacher says,
   scored and kept (`behaviorc.train.distill_data`), with an optional
   activation-matching loss;
5. `fit`: the training loop (`behaviorc.train.loop`), checkpointing into the task's
   scratch folder so a stopped build resumes; the hand-off pushes the trained tensors
   every `push_every` steps and lowers the served strength by what the weights carry;
6. `measure_after`: `margin_after` (steering off), `general_nll_after`, where the
   steering raised the margin `steered_share = (after - before) / (steered - before)`,
   and the trained model's replies to the same prompts, beside the base and steered ones;
7. `save`: write the model folder; the hand-off serves the final weights with no steering.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location, located_at
from behaviorc.core.events import DistillData, TrainEval, TrainNote, TrainStep
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.core.vocabulary import SteerPositions
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
from behaviorc.train.general_texts import GENERAL_TEACHING_TEXTS
from behaviorc.train.handoff import LiveHandoff, live_handoff, trained_tensors
from behaviorc.train.loop import CHECKPOINT_EVERY, StepEvent, log_interval, train
from behaviorc.train.ranks import lead_training
from behaviorc.train.teacher import Teacher, TeacherRow

SAMPLES_IN_DATA = 8  # distilled examples kept in the task's data for a reader to see
MEMORISED = 0.05  # a last training loss below this on token targets: memorised, flagged


@dataclass
class Examples:
    """What the data source gives the loop: the behavior's sequences, optional activation
    matching, the rows that learn a teacher's distribution, and what it reports
    (metrics, data, warnings)."""

    behavior: list[TrainSequence]
    matching: Matching | None = None
    taught: list[TeacherRow] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class TrainingRecipe:
    """The training of a TrainBehavior task (behaviorc.train.task), made from the task and
    read top to bottom in `run`. What varies (examples or distillation from a steered or
    prompted teacher, objective sft or kl, the optimizer, frozen contexts, activation
    matching, a hand-off, ranks) is the task's configuration, read where it acts. In a
    build on several processes (`--nproc`, torchrun) this runs on rank 0, which makes the
    data (distilled samples included) and measures; the loop runs on every rank, the
    model sharded over them (`behaviorc.train.ranks`)."""

    def __init__(self, task: Task, ctx: TaskContext):
        self.task, self.ctx = task, ctx
        self.spec: ir.Train = task.train
        self.steps = self.spec.steps
        self.distill = self.spec.distill
        self.system = self.distill.system if self.distill is not None else None  # the prompt teacher's
        self.pairs: Sequence[ir.Pair] = task.eval_pairs
        self.general = task.general or DEFAULT_GENERAL_TEXTS  # what training costs is always measured
        self.model_path: str = ctx.result(task.model).data["path"]
        self.steering_file = (ctx.result(task.steering).path(task.steering.artifact("steering"))
                              if task.steering else None)
        self.strength: float = (ctx.result(task.strength_from).data["strength"] if task.strength_from
                                else task.strength)
        self.anchored = self.spec.mix is not None and self.spec.mix.anchor == "kl"
        # what a teacher or an anchor may cost besides the general NLL (plain fine-tuning skips it)
        self.probed = self.distill is not None or self.anchored
        self.world = current_world()
        self.metrics: dict[str, float] = {}
        self.warnings: list[str] = []
        self.live: LiveHandoff | None = None
        self.paused_s = 0.0  # seconds of the loop spent pushing and measuring for the hand-off
        self._refuse_what_cannot_train()

    def run(self) -> TaskResult:
        """Train the behavior into a copy of the model; the result's artifact `model` is
        the trained folder. The live server has one owner: for a behavior whose deploy
        says `handoff on`, lowering gives the deploy to this task and emits no separate
        DeployModel. If training fails midway the servers keep the last pushed weights
        with the strength that went with them."""
        self.setup()
        self.measure_before()
        # with a live hand-off, the base is served steered from here on
        with live_handoff(self.task.handoff, self.ctx, self.model_path, self.directions, self.strength,
                          self.positions, self.pairs, self.steps, self.metrics.get("margin_before", 0.0),
                          self.metrics.get("margin_steered", 0.0)) as self.live:
            examples = self.examples(self.live.generator() if self.live else self.engine)
            self.fit(examples)
            self.measure_after()
            self.save()
        if self.pairs:
            self.ctx.emit(TrainEval(step=self.steps, margin=self.metrics["margin_after"],
                                    steered_share=self.metrics.get("steered_share")))
        return TaskResult(metrics=self.metrics, artifacts={"model": "model"}, data=self.data)

    def _refuse_what_cannot_train(self) -> None:
        spec, distill = self.spec, self.distill
        if distill is not None and distill.steering:
            if self.steering_file is None:
                raise BehaviorError("`distill steering` needs the behavior's steering", self.steering_loc,
                                    hint="add a steer section to the behavior")
            if not self.pairs:
                raise BehaviorError("distillation needs pairs to measure the behavior on", self.steering_loc,
                                    hint="add an eval section with pairs")
        if self.world is not None and self.task.handoff is not None:
            raise BehaviorError("a live hand-off trains in one process: it reads the weights as they "
                                "train", spec.loc, hint="build without --nproc, or drop `handoff on`")

    @property
    def steering_loc(self) -> Location | None:
        """Where the spec asks for the behavior's steering."""
        if self.distill is not None and self.distill.steering:
            return self.distill.loc or self.spec.loc or self.task.loc
        return self.task.loc

    def setup(self) -> None:
        """A private copy of the model (the executor's shared engines stay untouched), the
        spec's target groups in it, and the behavior's steering."""
        self.ctx.progress(0, self.steps, "loading the model")
        decl = self.task.model.decl
        self.model, self.tokenizer = load_model(self.model_path, decl.dtype, decl.device)
        set_thinking(self.tokenizer, decl.thinking)
        self.adapter = ArchitectureAdapter.for_model(self.model)
        with located_at(self.spec.loc):
            self.targets = self.adapter.parameters(self.model, self.spec.targets)
        self.engine = EmbeddedEngine(self.model, self.tokenizer, name=decl.source, path=self.model_path)
        vectors = load_steering(self.steering_file, self.steering_loc) if self.steering_file else None
        self.directions: dict[int, torch.Tensor] = dict(vectors.directions) if vectors else {}
        # every steered pass of this task (teacher, targets, replies, the hand-off) steers these
        self.positions: SteerPositions = vectors.positions if vectors else "all"
        self.data: dict[str, Any] = {"targets": sorted(self.targets), "served": [],
                                     "prompt_format": self.engine.prompt_format,
                                     "thinking": thinking_mode(self.tokenizer)}

    def measure_before(self) -> None:
        """The behavior margin on held-out pairs (`margin_before`), with the behavior's
        steering on when the task carries it (`margin_steered`) and with the prompt
        teacher's system prompt (`margin_teacher`), the general NLL, and greedy replies to
        a few held-out prompts from the base, prompted and steered model."""
        engine, metrics, directions, strength = self.engine, self.metrics, self.directions, self.strength
        positions = self.positions
        if self.pairs:
            metrics["margin_before"] = behavior_margin(engine, self.pairs)
            if directions:
                with steered(engine, directions, strength, positions):
                    metrics["margin_steered"] = behavior_margin(engine, self.pairs)
            self.ctx.emit(TrainEval(step=0, margin=metrics["margin_before"],
                                    margin_steered=metrics.get("margin_steered")))
        if self.pairs and self.system is not None:
            teacher_pairs = [ir.Pair(prompt=system_prompted(self.tokenizer, self.system, p.prompt),
                                     positive=p.positive, negative=p.negative) for p in self.pairs]
            with steered(engine, directions, strength, positions) if self.distill.steering else nullcontext():
                metrics["margin_teacher"] = behavior_margin(engine, teacher_pairs)
        metrics["general_nll_before"] = general_nll(engine, self.general)
        if self.probed:
            metrics["capability_before"] = capability_accuracy(engine)
        self.ctx.progress(0, self.steps, "sample replies before training")
        # a behavior taught by a system prompt alone may have no pairs: its first distill prompts then
        self.shown = reply_prompts(self.pairs) or reply_prompts(
            [ir.Pair(prompt=p, positive="", negative="") for p in self.distill.prompts] if self.distill else [])
        self.replies = {"base": sample_replies(engine, self.shown)}
        if self.system is not None:
            self.replies["prompted"] = sample_replies(
                engine, [system_prompted(self.tokenizer, self.system, p) for p in self.shown])
        if directions:
            self.replies["steered"] = sample_replies(engine, self.shown, steering=directions, strength=strength,
                                                     positions=positions)
            # How much of the trait the replies express, read by the base model unsteered.
            for which, name in (("base", "projection_before"), ("steered", "projection_steered")):
                _keep(metrics, name, projection_score(engine, directions, self.shown, self.replies[which]))

    def examples(self, generator: Engine) -> Examples:
        """The data: the spec's examples and, with `distill`, the best of what the teacher
        (the steered model, `generator`, and/or the base reading the system prompt) says
        to the distill prompts (`behaviorc.train.distill_data`)."""
        examples = Examples(encode_examples(self.tokenizer, self.spec.examples, self.spec.loc))
        if self.distill is not None:
            self._distill_into(examples, generator)
        if not examples.behavior:
            raise BehaviorError(f"behavior `{self.task.name}` has no training examples", self.spec.loc,
                                hint="add `examples \"FILE.jsonl\"` to its train block")
        return examples

    def _distill_into(self, examples: Examples, generator: Engine) -> None:
        """Add the teacher's kept samples. `objective kl` teaches the teacher's
        distribution over them and over the plain model's own replies; `match_activations`
        adds a loss pulling the hidden states toward the steered model's."""
        distill, tokenizer = self.distill, self.tokenizer
        objective = distill.objective
        loc = distill.loc or self.spec.loc
        self.ctx.progress(0, self.steps, f"sampling {len(distill.prompts)} prompts x {distill.samples}")
        began = time.perf_counter()
        teacher_prompts = ([system_prompted(tokenizer, distill.system, p) for p in distill.prompts]
                           if distill.system is not None else None)
        directions = self.directions if distill.steering else {}
        # A hand-off samples the served, steered model; otherwise this copy, steered here.
        own = generator is self.engine
        with steered(self.engine, directions, self.strength, self.positions) if own and directions \
                else nullcontext():
            data = distill_data(generator, self.engine, directions, self.strength, distill,
                                self.spec.seed, loc, teacher_prompts, self.positions,
                                keep_looping=objective.name == "kl" and objective.no_repeat > 0)
        self.ctx.emit(DistillData(generated=data.generated, kept=len(data.kept), empty=data.empty,
                                  mean_score=data.mean_score, engine="embedded" if own else "vllm"))
        examples.metrics.update(
            seconds_generate=time.perf_counter() - began, samples_generated=float(data.generated),
            samples_kept=float(len(data.kept)), samples_dropped=float(data.looping + data.broken),
            sample_score=data.mean_score)
        examples.data["samples"] = [{"prompt": s.prompt, "response": s.response, "score": s.score}
                                    for s in data.kept[:SAMPLES_IN_DATA]]
        if data.dropped:
            examples.warnings.append(f"the teacher's samples: dropped {data.dropped}")
        if data.kept_looping:
            examples.warnings.append(f"the teacher's samples: {data.kept_looping} "
                                     f"(`no_repeat {objective.no_repeat}`)")
        distilled = encode_examples(tokenizer, data.examples, loc)
        examples.behavior += distilled
        if objective.name == "kl":
            sets = [(data.kept, distilled, 1.0)]
            if objective.plain > 0:
                plain = encode_examples(tokenizer, [ir.Example(context=s.prompt, response=s.response)
                                                    for s in data.plain], loc)
                examples.behavior += plain
                sets.append((data.plain, plain, objective.plain))
            if objective.general > 0 and directions:
                general = encode_texts(tokenizer, GENERAL_TEACHING_TEXTS)
                examples.behavior += general
                examples.taught.extend(TeacherRow(sequence, sequence.context, True, objective.general,
                                                  objective.temperature) for sequence in general)
            for samples, sequences, weight in sets:
                for sample, sequence in zip(samples, sequences):
                    context = (tuple(tokenizer(system_prompted(tokenizer, distill.system, sample.prompt)).input_ids)
                               if distill.system is not None else sequence.context)
                    examples.taught.append(TeacherRow(sequence, context, bool(directions), weight,
                                                      objective.temperature, objective.no_repeat))
        if distill.match_activations > 0:
            examples.matching = Matching(distill.match_activations, self.strength, self.directions,
                                         tuple(distilled), self.positions)

    def fit(self, examples: Examples) -> None:
        """The training loop (`behaviorc.train.loop`), checkpointing into the task's scratch
        folder, which outlives a stopped build, so a rerun resumes from the checkpoint.
        The hand-off pushes the trained tensors every `push_every` steps and lowers the
        served strength by what the weights carry."""
        spec, model, tokenizer, metrics = self.spec, self.model, self.tokenizer, self.metrics
        metrics.update(examples.metrics)
        self.data.update(examples.data)
        self.warnings = list(examples.warnings)
        for warning in self.warnings:
            self.ctx.emit(TrainNote(warning))
        schedule, taught = self._schedule(examples)
        checkpoint = self.ctx.scratch / "checkpoint"
        layers = self.adapter.decoder_layers(model)

        began = time.perf_counter()
        # on several processes, each rank's training makes its own activation targets
        matching = examples.matching if self.world is None else None
        with (matching.start(model, layers, tokenizer.pad_token_id, spec.context) if matching is not None
              else nullcontext()) as extra:  # None without matching
            distributions = None
            if taught:
                self.ctx.progress(0, self.steps, f"the teacher's distributions over {len(taught)} sequences")
                teacher = Teacher(tuple(taught), self.directions, self.strength,
                                  self.distill.objective.top_k if self.distill else 0, self.positions)
                distributions = teacher.distributions(model, layers, tokenizer.pad_token_id)
            if examples.matching is not None or taught:
                metrics["seconds_targets"] = time.perf_counter() - began
            began = time.perf_counter()
            if self.world is not None:
                summary = lead_training(self.world, self.task.id, self.task.key, self.task.model.decl, spec,
                                        Path(self.model_path), schedule, checkpoint, self._on_step,
                                        self.targets, examples.matching, distributions)
            else:
                # a push sends the weights of its own step, so every push step is a log point
                log_every = (math.gcd(log_interval(next(iter(self.targets.values())).device), self.live.push_every)
                             if self.live else None)  # None: the loop's own interval
                summary = train(model, self.targets, schedule, spec, pad_id=tokenizer.pad_token_id,
                                on_step=self._on_step, log_every=log_every, checkpoint_dir=checkpoint,
                                checkpoint_every=CHECKPOINT_EVERY, extra_loss=extra, teacher=distributions)
        if self.distill is not None:
            metrics["seconds_train"] = time.perf_counter() - began - self.paused_s
        self.ctx.check_cancelled()
        metrics.update(summary.metrics())
        self.data.update(losses=summary.losses, resumed_from=summary.resumed_from)
        self._flag_memorised(examples.behavior, taught)

    def _schedule(self, examples: Examples) -> tuple[BatchSchedule, list[TeacherRow]]:
        """The batches of every step (the behavior's sequences and the general mix), and
        the rows that learn a teacher's distribution (`anchor kl`: the mix's too)."""
        spec, tokenizer = self.spec, self.tokenizer
        mix = encode_texts(tokenizer, spec.mix.texts) if spec.mix else []
        anchors = mix if self.anchored else []
        taught = examples.taught + [TeacherRow(s, s.context, False, 1.0, 1.0) for s in anchors]
        positions = context_positions(self.model.config)
        for kind, sequences in (("training example", examples.behavior), ("general text", mix)):
            for number, sequence in enumerate(sequences, 1):
                refuse_over_context(sequence.tokens, positions, f"{kind} {number}", spec.loc)
        ratio = spec.mix.ratio if spec.mix else 0.0
        return BatchSchedule(examples.behavior, mix, spec.batch, ratio, spec.seed), taught

    def _flag_memorised(self, behavior: Sequence[TrainSequence], taught: Sequence[TeacherRow]) -> None:
        """Warn when the last loss on token targets is near 0."""
        learned = {row.sequence for row in taught}
        tokens_learned = [s for s in behavior if s not in learned]
        loss_last = self.metrics["loss_last"]
        if tokens_learned and loss_last < MEMORISED:
            self.warnings.append(f"the training loss fell to {loss_last:.3f} on "
                                 f"{len(set(tokens_learned))} examples: the model has memorised them, and its "
                                 "replies may copy them (more prompts or samples, fewer steps, or `objective kl`)")
            self.ctx.emit(TrainNote(self.warnings[-1]))

    def _on_step(self, event: StepEvent) -> None:
        self.ctx.emit(TrainStep(step=event.step, steps=self.steps, loss=event.loss, grad_norm=event.grad_norm,
                                lr=event.lr, limiter=event.limiter, tokens_per_s=event.tokens_per_s,
                                skipped=event.skipped))
        self.ctx.progress(event.step, self.steps, f"loss {event.loss:.4f}")
        if self.live is not None and self.live.due(event.step, self.steps):
            handing_over = time.perf_counter()
            self.live.step(event.step, self._trained_tensors(), self.engine)
            self.paused_s += time.perf_counter() - handing_over
        self.ctx.check_cancelled()

    def measure_after(self) -> None:
        """`margin_after` (steering off), `general_nll_after`, where the steering raised the
        margin `steered_share = (after - before) / (steered - before)` (and likewise the
        prompt teacher's `teacher_share`), and the trained model's replies to the same
        prompts, beside the base and steered ones."""
        engine, metrics = self.engine, self.metrics
        if self.pairs:
            metrics["margin_after"] = behavior_margin(engine, self.pairs)
        metrics["general_nll_after"] = general_nll(engine, self.general)
        if self.probed:
            metrics["capability_after"] = capability_accuracy(engine)
        self.replies["trained"] = sample_replies(engine, self.shown)
        if self.directions:
            _keep(metrics, "projection_after",
                  projection_score(engine, self.directions, self.shown, self.replies["trained"]))
        self.data["replies"] = [{"prompt": prompt,
                                 **{which: texts[i].strip() for which, texts in self.replies.items()}}
                                for i, prompt in enumerate(self.shown)]
        if "margin_steered" in metrics:
            gain = metrics["margin_steered"] - metrics["margin_before"]
            if gain > 0:
                metrics["steered_share"] = (metrics["margin_after"] - metrics["margin_before"]) / gain
            else:  # a ratio over a gain that is not there would be noise, not a share
                self.ctx.emit(TrainNote(f"the steering did not raise the margin ({gain:+.4f}), so "
                                        "there is no steered effect for the weights to carry: no "
                                        "steered_share"))
        if "margin_teacher" in metrics and metrics["margin_teacher"] > metrics["margin_before"]:
            metrics["teacher_share"] = ((metrics["margin_after"] - metrics["margin_before"])
                                        / (metrics["margin_teacher"] - metrics["margin_before"]))
        self.data["warnings"] = self.warnings

    def save(self) -> None:
        """The model folder; the hand-off ends serving the final weights, unsteered."""
        save_model(self.model, Path(self.ctx.out) / "model", Path(self.model_path))
        if self.live is not None:
            record = self.live.finish(self.steps, self._trained_tensors(), self.metrics["margin_after"])
            self.metrics.update(record.metrics())
            self.data["served"] = [vars(p) for p in record.points]

    def _trained_tensors(self) -> dict[str, Any]:
        return trained_tensors(self.adapter.checkpoint_tensors(self.model), list(self.targets))


def _keep(metrics: dict[str, float], name: str, score: float | None) -> None:
    if score is not None:  # None: every reply was empty
        metrics[name] = score
