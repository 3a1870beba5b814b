"""The tasks an experiment's points are made of, beside the plan's own, and what they run:
measurements of one model, steered or not.

An experiment is a set of ordinary plan tasks (TrainBehavior for each trained point,
ExtractSteering for each direction) plus the measurements below, all run by the build
executor: a finished point is stored under its content key, so an experiment that was
stopped resumes where it was, and one rerun with a bigger grid reuses every point it had.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

from behaviorc.core import ir
from behaviorc.core.events import ExperimentPoint
from behaviorc.core.metrics import EXPERIMENT_POINT
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.model.chat import set_thinking
from behaviorc.model.task import ResolveModel
from behaviorc.steer.task import ExtractSteering
from behaviorc.train.task import TrainBehavior

STATES_FILE = "states.safetensors"


def _engine(task: MeasurePoint | GdnStates, ctx: TaskContext) -> Any:
    decl = task.model.decl
    if task.weights is not None:
        path = str(ctx.result(task.weights).path("model"))
    else:
        path = ctx.result(task.model).data["path"]
    engine = ctx.engine(path, decl.dtype, decl.device)
    set_thinking(engine.tokenizer, decl.thinking)
    return engine


@contextmanager
def _steered(engine: Any, task: MeasurePoint | GdnStates, ctx: TaskContext) -> Iterator[None]:
    """The task's steering on for the block, at the vectors' positions (none when it has
    no vectors or strength 0)."""
    from behaviorc.engine.protocol import steered
    from behaviorc.formats.steering import load_steering

    if task.steering is None or task.strength == 0:
        yield
        return
    vectors = load_steering(ctx.result(task.steering).path("vectors"))
    with steered(engine, vectors.directions, task.strength, vectors.positions):
        yield


def measure_point(task: MeasurePoint, ctx: TaskContext) -> TaskResult:
    from behaviorc.measure.margin import behavior_margin
    from behaviorc.measure.nll import general_nll
    from behaviorc.model.testbed_corpus import arithmetic_prompts
    from behaviorc.lab.scoring import behavior_rate

    engine = _engine(task, ctx)
    metrics: dict[str, float] = {}
    steps = sum(map(bool, (task.score, task.pairs, task.general, task.arithmetic)))
    done = 0

    def advance(what: str) -> None:
        nonlocal done
        done += 1
        ctx.progress(done, steps, what)

    with _steered(engine, task, ctx):
        if task.score:
            rate = behavior_rate(engine, task.users, task.score, task.samples, task.temperature, task.seed)
            metrics.update(rate=rate.rate, rate_stderr=rate.stderr, malformed=rate.malformed)
            advance(f"rate {rate.rate:.3f}")
        if task.pairs:
            metrics["margin"] = behavior_margin(engine, task.pairs)
            advance(f"margin {metrics['margin']:.3f}")
        if task.general:
            metrics["general_nll"] = general_nll(engine, task.general)
            advance(f"general NLL {metrics['general_nll']:.3f}")
        if task.arithmetic:
            accuracy = behavior_rate(engine, arithmetic_prompts(), "arithmetic", samples=1, temperature=0.0)
            metrics["arithmetic_accuracy"] = accuracy.rate
            advance(f"arithmetic {accuracy.rate:.2f}")
    ctx.emit(ExperimentPoint(point=task.name, values=metrics))
    return TaskResult(metrics=metrics)


def gdn_states(task: GdnStates, ctx: TaskContext) -> TaskResult:
    import torch
    from safetensors.torch import save_file

    engine = _engine(task, ctx)
    layers = [i for i, kind in enumerate(engine.info.layer_kinds) if kind == "gdn"]
    states: dict[str, list[torch.Tensor]] = {f"layer.{layer}": [] for layer in layers}
    with _steered(engine, task, ctx):
        for done, prompt in enumerate(task.prompts, 1):
            for layer in layers:
                states[f"layer.{layer}"].append(engine.gdn_state(prompt, layer))
            ctx.progress(done, len(task.prompts), "reading GDN states")
    path = Path(ctx.out) / STATES_FILE
    save_file({name: torch.stack(rows).contiguous() for name, rows in states.items()}, str(path),
              metadata={"layers": ",".join(map(str, layers))})
    return TaskResult(artifacts={"states": STATES_FILE}, data={"layers": layers})


class MeasurePoint(Task):
    """Measure one model (the base, or a fine-tuned one) with steering off or on.

    metrics, each when its input is given: rate, rate_stderr, malformed (generated replies
    scored by the testbed behavior `score` on `users`, `samples` each), margin (on
    `pairs`), general_nll (on `general`), arithmetic_accuracy (greedy, every sum)."""

    kind: ClassVar[str] = "experiment.measure"
    reports: ClassVar[tuple[str, ...]] = EXPERIMENT_POINT
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
        return gdn_states(self, ctx)
