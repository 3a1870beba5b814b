"""Lowering a checked spec to a Plan of tasks.

Each behavior becomes the tasks its sections ask for: steer -> extract + verify,
train -> train + task vector, `from ...` -> import. Compositions combine the behaviors'
task vectors (and steering vectors), deploys push a model into live servers. The spec
is already checked, so lowering cannot fail; the choices it makes on the user's behalf
(which pairs verify a steering vector) are recorded as plan notes.
"""

from __future__ import annotations

from behaviorc.core import ir
from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
from behaviorc.pipeline.plan import Plan, TaskExpectation
from behaviorc.core.task import Task
from behaviorc.pipeline.kinds import (AnswerPrompts, ComposeBehaviors, DeployModel, ExportLora,
                                  ExtractSteering, ExtractTaskVector, ImportModel, ImportTaskVector, MeasureBase,
                                  ReplyTable, ResolveModel, TrainBehavior, VerifySteering)

HOLD_OUT_EVERY = 5  # without eval pairs, every 5th steer pair verifies instead of extracting
TABLE_PROMPTS = 8  # held-out pair prompts the reply table answers when the eval names none


def lower(spec: ir.Spec) -> Plan:
    return _Lowering(spec).plan()


class _Lowering:
    def __init__(self, spec: ir.Spec) -> None:
        self.spec = spec
        self.created: list[Task] = []
        self.notes: list[str] = []
        self.expectations: list[TaskExpectation] = []
        self.models: dict[str, ResolveModel] = {}
        self.steering: dict[str, ExtractSteering] = {}
        self.weights: dict[str, TrainBehavior | ImportModel] = {}
        self.vectors: dict[str, ExtractTaskVector | ImportTaskVector] = {}
        self.compositions: dict[str, ComposeBehaviors] = {}
        self.deploy_ids: set[str] = set()

    def plan(self) -> Plan:
        for behavior in self.spec.behaviors:
            self._behavior(behavior)
        for compose in self.spec.compositions:
            self._compose(compose)
        for deploy in self.spec.deploys:
            self._deploy(deploy)
        # Every task is created after the tasks it depends on, so creation order is a
        # dependency order; equal keys are the same work, kept once.
        ordered: dict[str, Task] = {}
        for task in self.created:
            ordered.setdefault(task.key, task)
        return Plan(self.spec, tuple(ordered.values()), tuple(self.notes), tuple(self.expectations))

    def _add(self, task: Task) -> Task:
        self.created.append(task)
        return task

    def _model(self, name: str) -> ResolveModel:
        if name not in self.models:
            decl = self.spec.model(name)
            self.models[name] = self._add(ResolveModel(name=name, decl=decl, loc=decl.loc))
        return self.models[name]

    def _behavior(self, b: ir.Behavior) -> None:
        model = self._model(b.model)
        eval_pairs = b.eval.pairs if b.eval else ()
        general = self._general(b)
        verify = train = None
        if b.steer:
            verify = self._steer(b, model, eval_pairs, general)
        if b.train:
            # Distillation samples the steered model; a hand-off serves it while training.
            handoff = self._handoff(b.name) if b.steer else None
            uses_steering = b.steer is not None and ((b.train.distill is not None and b.train.distill.steering)
                                                     or handoff is not None)
            # `strength auto` is chosen by the verification: training reads its result.
            chosen = uses_steering and b.steer.strength == "auto"
            train = self._add(TrainBehavior(
                name=b.name, model=model, train=b.train,
                eval_pairs=eval_pairs or (b.steer.pairs if b.steer else ()), general=general,
                steering=self.steering[b.name] if uses_steering else None,
                strength=b.steer.strength if uses_steering and not chosen else 0.0,
                strength_from=verify if chosen else None,
                handoff=handoff, loc=b.train.loc))
            if not train.eval_pairs:
                self.notes.append(f"`{b.name}` has no pairs to measure its margin on: add an "
                                  "eval section with pairs")
            self.weights[b.name] = train
            self.vectors[b.name] = self._add(ExtractTaskVector(
                name=b.name, model=model, finetuned=train, loc=b.train.loc))
        if b.external and b.external.kind == "model":
            imported = self._add(ImportModel(name=b.name, external=b.external, loc=b.external.loc))
            self.weights[b.name] = imported
            self.vectors[b.name] = self._add(ExtractTaskVector(
                name=b.name, model=model, finetuned=imported, loc=b.external.loc))
        elif b.external:
            self.vectors[b.name] = self._add(ImportTaskVector(
                name=b.name, model=model, external=b.external, loc=b.external.loc))
        table = self._reply_table(b, model, verify, train) if b.eval and b.eval.score else None
        # Training answers for the lasting effect, verification for the steered one, the
        # reply table for replies (the checker has made sure one of them reports each metric).
        answering = [t for t in (train, verify, self.steering.get(b.name), table) if t is not None]
        for expect in b.eval.expect if b.eval else ():
            source = next((t for t in answering if expect.metric in t.reports), None)
            if source is not None:  # else the checker has warned that nothing measures it
                self.expectations.append(TaskExpectation(source.id, expect))

    def _reply_table(self, b: ir.Behavior, model: ResolveModel, verify: VerifySteering | None,
                     train: TrainBehavior | None) -> ReplyTable:
        """Every model the behavior makes, and the prompted base, answering held-out prompts:
        the eval's, else those of the pairs no steering was extracted from."""
        evaluation = b.eval
        prompts = evaluation.prompts
        if not prompts:
            held_out = verify.base.pairs if verify is not None else evaluation.pairs
            prompts = tuple(dict.fromkeys(p.prompt for p in held_out if p.prompt.strip()))[:TABLE_PROMPTS]
            self.notes.append(f"`{b.name}`: the reply table answers the {len(prompts)} prompts of "
                              "the held-out pairs (`prompts` in eval names others)")
        common = dict(model=model, prompts=prompts, samples=evaluation.samples,
                      max_tokens=evaluation.max_tokens, loc=evaluation.score.loc)
        answers = [self._add(AnswerPrompts(name=f"{b.name}.base", variant="base", **common))]
        if evaluation.system:
            answers.append(self._add(AnswerPrompts(name=f"{b.name}.prompted", variant="prompted",
                                                   system=evaluation.system, **common)))
        if verify is not None:
            answers.append(self._add(AnswerPrompts(
                name=f"{b.name}.steered", variant="steered", source=self.steering[b.name],
                strength=b.steer.strength,
                verification=verify if b.steer.strength == "auto" else None, **common)))
        if train is not None:
            answers.append(self._add(AnswerPrompts(name=f"{b.name}.trained", variant="trained",
                                                   source=train, **common)))
        projection = evaluation.score.kind == "projection"
        return self._add(ReplyTable(
            name=b.name, model=model, answers=tuple(answers), score=evaluation.score,
            steering=self.steering[b.name] if projection else None,
            pairs=b.steer.pairs if projection else (), loc=evaluation.score.loc))

    def _handoff(self, name: str) -> ir.Deploy | None:
        """The live deploy of `name` that hands its steering over to the weights while
        it trains. Its training task owns the servers, so it is not deployed again."""
        return next((d for d in self.spec.deploys if d.target == name and d.handoff and d.live), None)

    def _general(self, b: ir.Behavior) -> tuple[str, ...]:
        if b.eval and b.eval.general:
            return b.eval.general
        if b.train and b.train.mix:
            return b.train.mix.texts
        return DEFAULT_GENERAL_TEXTS

    def _steer(self, b: ir.Behavior, model: ResolveModel, eval_pairs: tuple[ir.Pair, ...],
               general: tuple[str, ...]) -> VerifySteering:
        steer = b.steer
        pairs = steer.pairs
        if eval_pairs:
            extract_pairs, verify_pairs = pairs, eval_pairs
        elif len(pairs) >= HOLD_OUT_EVERY:
            held_out = {i for i in range(HOLD_OUT_EVERY - 1, len(pairs), HOLD_OUT_EVERY)}
            extract_pairs = tuple(p for i, p in enumerate(pairs) if i not in held_out)
            verify_pairs = tuple(pairs[i] for i in sorted(held_out))
            self.notes.append(f"`{b.name}`: {len(verify_pairs)} of {len(pairs)} steer pairs "
                              f"(every {HOLD_OUT_EVERY}th) are held out to verify the steering")
        else:
            extract_pairs = verify_pairs = pairs
            self.notes.append(f"`{b.name}`: fewer than {HOLD_OUT_EVERY} steer pairs and no eval "
                              "pairs, so the steering is verified on the pairs it was extracted "
                              "from (an optimistic margin)")
        extract = self._add(ExtractSteering(
            name=b.name, model=model, layers=steer.layers, method=steer.method, read=steer.read,
            orient=steer.orient, final_norm=steer.final_norm, positions=steer.positions,
            pairs=extract_pairs, loc=steer.loc))
        self.steering[b.name] = extract
        # The base model measured apart: no strength, layer or method in its key.
        base = self._add(MeasureBase(name=b.name, model=model, pairs=verify_pairs, general=general,
                                     loc=steer.loc))
        return self._add(VerifySteering(
            name=b.name, model=model, vectors=extract, base=base, strength=steer.strength,
            sweep=steer.sweep, nll_budget=steer.nll_budget,
            repetition_budget=steer.repetition_budget, loc=steer.loc))

    def _compose(self, c: ir.Compose) -> None:
        names = [t.behavior for t in c.terms]
        self.compositions[c.name] = self._add(ComposeBehaviors(
            name=c.name, model=self._model(c.model), compose=c,
            vectors=tuple(self.vectors[n] for n in names),
            steering=tuple(self.steering[n] for n in names if n in self.steering),
            steering_strengths=tuple(self.spec.behavior(n).steer.strength
                                     for n in names if n in self.steering),
            loc=c.loc))

    def _deploy(self, d: ir.Deploy) -> None:
        train = self.weights.get(d.target)
        if isinstance(train, TrainBehavior) and train.handoff == d:
            self.notes.append(f"`{d.target}` is deployed live by its training ({train.id}): the "
                              "hand-off serves it from the first step to the final weights")
            return
        if d.target in self.compositions:
            source = self.compositions[d.target]
            model = source.model
            steering = source if d.steering or d.named else None
            strength = 1.0  # the composed vector already carries each behavior's strength
        else:
            behavior = self.spec.behavior(d.target)
            source = self.weights.get(d.target)  # None: a behavior that only steers
            model = self._model(behavior.model)
            steering = self.steering[d.target] if d.steering or d.named else None
            strength = behavior.steer.strength if steering else 1.0
        name, n = d.target, 1
        while f"{DeployModel.kind}:{name}" in self.deploy_ids:
            n += 1
            name = f"{d.target}.{n}"
        self.deploy_ids.add(f"{DeployModel.kind}:{name}")
        adapter = None
        if d.lora is not None and source is not None:
            adapter = self._add(ExportLora(name=name, model=model, source=source, form=d.lora,
                                           loc=d.loc))
        self._add(DeployModel(name=name, deploy=d, model=model, source=source, steering=steering,
                              steering_strength=strength, adapter=adapter, loc=d.loc))
