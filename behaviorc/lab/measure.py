"""What the experiment tasks run: measurements of one model, steered or not."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from behaviorc.core.task import TaskContext, TaskResult
from behaviorc.lab.tasks import GdnStates, MeasurePoint

STATES_FILE = "states.safetensors"


def _engine(task: MeasurePoint | GdnStates, ctx: TaskContext) -> Any:
    decl = task.model.decl
    if task.weights is not None:
        path = str(ctx.result(task.weights).path("model"))
    else:
        path = ctx.result(task.model).data["path"]
    return ctx.engine(path, decl.dtype, decl.device)


@contextmanager
def _steered(engine: Any, task: MeasurePoint | GdnStates, ctx: TaskContext) -> Iterator[None]:
    """The task's steering on for the block (none when it has no vectors or strength 0)."""
    from behaviorc.engine.protocol import steered
    from behaviorc.formats.steering import load_steering

    if task.steering is None or task.strength == 0:
        yield
        return
    vectors = load_steering(ctx.result(task.steering).path("vectors"))
    with steered(engine, vectors.directions, task.strength):
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
    ctx.emit("experiment.point", point=task.name, **metrics)
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
