"""The tasks an experiment's points are made of, beside the plan's own.

An experiment is a set of ordinary plan tasks (TrainBehavior for each trained point,
ExtractSteering for each direction) plus the measurements below, all run by the build
executor: a finished point is stored under its content key, so an experiment that was
stopped resumes where it was, and one rerun with a bigger grid reuses every point it had.
"""

from __future__ import annotations

from typing import ClassVar

from behaviorc.core import ir
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.build.kinds import ExtractSteering, ResolveModel, TrainBehavior


class MeasurePoint(Task):
    """Measure one model (the base, or a fine-tuned one) with steering off or on.

    metrics, each when its input is given: rate, rate_stderr, malformed (generated replies
    scored by the testbed behavior `score` on `users`, `samples` each), margin (on
    `pairs`), general_nll (on `general`), arithmetic_accuracy (greedy, every sum)."""

    kind: ClassVar[str] = "experiment.measure"
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    weights: TrainBehavior | None = None
    steering: ExtractSteering | None = None
    strength: float = 0.0
    score: str = ""
    users: tuple[str, ...] = ()
    samples: int = 4
    temperature: float = 1.0
    seed: int = 0
    pairs: tuple[ir.Pair, ...] = ()
    general: tuple[str, ...] = ()
    arithmetic: bool = False

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.lab.measure import measure_point
        return measure_point(self, ctx)


class GdnStates(Task):
    """The recurrent state of each GDN layer after reading each prompt.
    artifacts: states (safetensors, `layer.{L}`: [prompts, heads, key dim, value dim])."""

    kind: ClassVar[str] = "experiment.gdn_states"
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    weights: TrainBehavior | None = None
    steering: ExtractSteering | None = None
    strength: float = 0.0
    prompts: tuple[str, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.lab.measure import gdn_states
        return gdn_states(self, ctx)
