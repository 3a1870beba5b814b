"""Regenerate the dashboard's fixture logs: `python tests/data/make_event_logs.py`.

Runs the real executor over stand-in tasks that carry the real task kinds and emit the
events the real tasks document (behaviorc/core/events.py), then rewrites times and
paths so the logs are the same on every machine:

    events_ok.jsonl      a whole build of demo.behavior
    events_failed.jsonl  the same with train:concise failing at its spec location
    events_live.jsonl    the first build cut in the middle of training (still running)
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.core.events import Push, SteerPoint, TrainEval, TrainStep
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.pipeline.executor import Executor

HERE = Path(__file__).parent
SPEC = "tests/data/demo.behavior"
T0 = 1_764_000_000.0
TICK = 0.05


def at(line: int, column: int, end: int) -> Location:
    return Location(file=SPEC, line=line, column=column, end_line=line, end_column=end)


class Model(Task):
    kind: ClassVar[str] = "model"

    def execute(self, ctx: TaskContext) -> TaskResult:
        return TaskResult(data={"path": "~/.cache/behaviorc/tiny-gdn", "num_layers": 4})


class Extract(Task):
    kind: ClassVar[str] = "steer.extract"
    model: Model

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.out / "vectors.safetensors").write_bytes(b"stand-in")
        return TaskResult(artifacts={"vectors": "vectors.safetensors"}, data={"layers": [1, 2, 3]})


class Verify(Task):
    kind: ClassVar[str] = "steer.verify"
    reports: ClassVar[tuple[str, ...]] = ('margin_before', 'margin_steered', 'margin_after')
    vectors: Extract

    def execute(self, ctx: TaskContext) -> TaskResult:
        sweep = []
        for strength in (0, 2, 4, 6, 8):
            point = {"strength": strength, "margin": round(-0.4 + 0.9 * math.tanh(strength / 4), 4),
                     "general_nll": round(3.1 + 0.02 * strength ** 2, 4)}
            ctx.emit(SteerPoint(**point))
            sweep.append(point)
        return TaskResult(metrics={"margin_before": -0.4, "margin_steered": 0.4855, "margin_after": 0.4855},
                          data={"sweep": sweep})


class Train(Task):
    kind: ClassVar[str] = "train"
    reports: ClassVar[tuple[str, ...]] = ('loss_first', 'loss_last', 'margin_before', 'margin_after', 'general_nll_before', 'general_nll_after')
    model: Model
    fail_at: int = 0
    loc_line: int = 0

    def execute(self, ctx: TaskContext) -> TaskResult:
        steps = 60
        for step in range(1, steps + 1):
            if step == self.fail_at:
                raise BehaviorError("loss is NaN at step 25 (learning rate 3e-3 is too high)",
                                    loc=at(self.loc_line, 3, 8), hint="try lr 3e-5")
            loss = round(2.5 * math.exp(-step / 20) + 0.3, 4)
            ctx.emit(TrainStep(step=step, steps=steps, loss=loss, lr=3e-5))
            if step % 10 == 0:
                ctx.emit(TrainEval(step=step, margin=round(-0.4 + step / 60, 4)))
            ctx.progress(step, steps, "steps")
        (ctx.out / "model").mkdir()
        (ctx.out / "model" / "config.json").write_text("{}")
        return TaskResult(artifacts={"model": "model"},
                          metrics={"loss_first": 2.6779, "loss_last": 0.4244, "margin_before": -0.4,
                                   "margin_after": 0.6, "general_nll_before": 3.1, "general_nll_after": 3.12})


class TaskVector(Task):
    kind: ClassVar[str] = "task_vector"
    finetuned: Train

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.out / "task_vector.safetensors").write_bytes(b"stand-in")
        return TaskResult(artifacts={"task_vector": "task_vector.safetensors"})


class Compose(Task):
    kind: ClassVar[str] = "compose"
    vectors: tuple[TaskVector, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.out / "model").mkdir()
        return TaskResult(artifacts={"model": "model"}, data={"provenance": {
            "terms": [{"behavior": "listen", "weight": 1.0}, {"behavior": "concise", "weight": 0.5}],
            "merge": {"method": "ties", "density": 0.2}}})


class Deploy(Task):
    kind: ClassVar[str] = "deploy"
    reports: ClassVar[tuple[str, ...]] = ('push_ms', 'requests_failed')
    source: Compose

    def execute(self, ctx: TaskContext) -> TaskResult:
        url = "http://127.0.0.1:8000"
        for step, ms in ((20, 35.0), (40, 33.0), (60, 34.0)):
            ctx.emit(Push(url=url, ms=ms, step=step))
        return TaskResult(metrics={"push_ms": 34.0, "requests_failed": 0.0}, data={"urls": [url]})


def plan(failing: bool) -> list[Task]:
    model = Model(name="base", loc=at(1, 1, 24))
    extract = Extract(name="listen", model=model, loc=at(4, 3, 8))
    verify = Verify(name="listen", vectors=extract, loc=at(4, 3, 8))
    listen = Train(name="listen", model=model, loc=at(10, 3, 8))
    concise = Train(name="concise", model=model, loc=at(17, 3, 8),
                    fail_at=25 if failing else 0, loc_line=17)
    compose = Compose(name="persona", loc=at(23, 1, 8),
                      vectors=(TaskVector(name="listen", finetuned=listen, loc=at(3, 1, 9)),
                               TaskVector(name="concise", finetuned=concise, loc=at(16, 1, 9))))
    return [verify, Deploy(name="persona", source=compose, loc=at(27, 1, 7))]


def normalize(events: list[dict], out: str) -> list[dict]:
    """Fixed times (one tick per event) and paths relative to the repository."""
    started: dict[str, float] = {}
    for i, event in enumerate(events):
        event["t"] = round(T0 + i * TICK, 4)
        event.pop("pid", None)  # of the process that recorded it
        if event["type"] == "task_start":
            started[event["task"]] = event["t"]
        if event["type"] in ("task_end", "build_end"):
            event["seconds"] = round(event["t"] - started.get(event["task"], T0), 4)
    text = json.dumps(events).replace(out, "out/demo")
    return json.loads(text)


def record(failing: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        Executor(out, spec_path=SPEC, spec_sha256="d3m0" * 16).run(plan(failing))
        lines = (out / "events.jsonl").read_text().splitlines()
        return normalize([json.loads(line) for line in lines], str(out))


def write(name: str, events: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(e) + "\n" for e in events))


def main() -> int:
    whole = record(failing=False)
    write("events_ok.jsonl", whole)
    write("events_failed.jsonl", record(failing=True))
    cut = next(i for i, e in enumerate(whole)
               if e["type"] == TrainStep.type and e["task"] == "train:listen" and e["step"] == 30)
    write("events_live.jsonl", whole[: cut + 1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
