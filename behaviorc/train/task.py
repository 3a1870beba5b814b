"""The TrainBehavior task: train a behavior into the weights (`behaviorc.train.recipe`),
from the spec's examples or, with `distill steering`, from what the steered model says."""

from __future__ import annotations

from typing import ClassVar

from behaviorc.core import ir
from behaviorc.core.metrics import TRAIN
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.model.task import ResolveModel


class TrainBehavior(Task):
    """APOLLO fine-tuning of the behavior's targets. artifacts: model (a Hugging Face
    folder). metrics: core.TRAIN."""

    kind: ClassVar[str] = "train"
    reports: ClassVar[tuple[str, ...]] = TRAIN
    provides: ClassVar[dict[str, str]] = {"model": "model"}
    model: ResolveModel
    train: ir.Train
    eval_pairs: tuple[ir.Pair, ...]
    general: tuple[str, ...]
    # Set when train.distill makes the steered behavior permanent, or a hand-off serves
    # it steered while it trains: the vectors, at `strength`.
    steering: Task | None = None  # provides "steering"
    strength: float = 0.0
    # Set for `strength auto`: the task whose result's data["strength"] is the strength
    # (the verification's choice inside the budget), read instead of `strength`.
    strength_from: Task | None = None
    # Set when a live deploy of this behavior says `handoff on`: this task then owns
    # the deploy's servers and hands the steering over to the weights while it trains.
    handoff: ir.Deploy | None = None

    @property
    def parallel_safe(self) -> bool:  # type: ignore[override]
        """A worker may train it, unless it owns a live deploy's servers."""
        return self.handoff is None

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.train.recipe import TrainingRecipe

        return TrainingRecipe(self, ctx).run()
