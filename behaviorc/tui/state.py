"""A build's state folded from its events: what the dashboard and the terminal progress
draw (`behaviorc.tui.styles` says how). Reading events is the only way either learns
about a build, so a live build and a replayed log look the same.

Each event is folded by its type: a task event by its class (`behaviorc.core.events`),
found from its name in the log; the executor's own events, which have no class, by name.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from behaviorc.core.events import (TASK_EVENTS, DeployPush, DistillData, EvalReplies, ExperimentPoint,
                                   HandoffServed, Push, SteerLayers, SteerPoint, SteerVerdict, TaskEvent,
                                   TrainEval, TrainNote, TrainStep)

RECENT_EVENTS = 500  # events kept for the log panel
# What the Steer panel shows of each strength tried (steer.verify's points carry more).
SWEEP_FIELDS = ("strength", "margin", "general_nll", "capability", "repetition", "right_share",
                "wrong_share", "samples")

NUMBER = re.compile(r"[-+]?\d[\d.]*(?:e[-+]?\d+)?")


def phase_name(what: str) -> str:
    """What a progress message says, numbers left out: `strength 2` and `strength 4` are
    one phase (the sweep), `loss 0.41` and `loss 0.38` one (training)."""
    return NUMBER.sub("#", what)


@dataclass
class Phase:
    """A task's sub-phase as progress events tell it: when and at which count it began."""

    name: str
    started: float  # event time of its first progress event
    first_done: int
    total: int

    def eta(self, done: int, now: float) -> float | None:
        """Seconds left at the phase's own rate so far; None until it has one."""
        if done <= self.first_done or now <= self.started or done >= self.total:
            return None
        rate = (done - self.first_done) / (now - self.started)
        return (self.total - done) / rate


@dataclass
class TaskState:
    id: str
    kind: str
    key: str = ""
    deps: list[str] = field(default_factory=list)
    loc: dict[str, Any] | None = None
    status: str = "pending"
    started: float | None = None  # event time of task_start
    seconds: float | None = None
    progress: tuple[int, int, str] | None = None
    phase: "Phase | None" = None  # the running sub-phase, for its rate and ETA
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    error_loc: dict[str, Any] | None = None
    internal: bool = False
    log: str | None = None
    note: str | None = None  # e.g. why a cached result was rebuilt

    @property
    def where(self) -> str:
        loc = self.error_loc or self.loc
        return f"{loc['file']}:{loc['line']}:{loc['column']}" if loc else ""


@dataclass
class BuildState:
    spec: str = ""
    spec_sha256: str = ""
    out: str = ""
    pid: int | None = None  # of the process running the build
    started: float | None = None
    last_t: float | None = None
    finished: bool = False
    ok: bool | None = None
    cancelled: bool = False
    tasks: dict[str, TaskState] = field(default_factory=dict)
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    train_margins: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    sweeps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)  # a composition's terms
    layer_scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # `layers auto`
    verdicts: dict[str, list[str]] = field(default_factory=dict)  # why not to trust a steering
    distilled: dict[str, dict[str, Any]] = field(default_factory=dict)  # what distillation kept
    notes: dict[str, list[str]] = field(default_factory=dict)  # training notes, by task
    served: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # step, margin, strength
    pushes: list[dict[str, Any]] = field(default_factory=list)
    points: dict[str, dict[str, float]] = field(default_factory=dict)  # an experiment's measurements
    reply_tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # by evaluate.table task
    unmet: list[dict[str, Any]] = field(default_factory=list)  # `expect` lines that did not hold
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    events_seen: int = 0

    def apply(self, event: dict[str, Any]) -> None:
        self.events_seen += 1
        self.last_t = event.get("t", self.last_t)
        fold = fold_of(str(event.get("type")))
        if fold is not None:
            fold(self, event)
        if event.get("type") != "progress":
            self.recent.append(event)

    def task(self, event: dict[str, Any]) -> TaskState:
        task_id = event.get("task") or "?"
        if task_id not in self.tasks:  # an event for a task the plan did not list
            self.tasks[task_id] = TaskState(task_id, task_id.split(":")[0])
        return self.tasks[task_id]

    @property
    def running(self) -> list[TaskState]:
        return [t for t in self.tasks.values() if t.status == "running"]

    @property
    def failed(self) -> list[TaskState]:
        return [t for t in self.tasks.values() if t.status == "failed"]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tasks.values():
            counts[t.status] = counts.get(t.status, 0) + 1
        return counts

    # --- executor events --------------------------------------------------------------

    def _on_build_start(self, event: dict[str, Any]) -> None:
        fresh = BuildState(events_seen=self.events_seen)
        self.__dict__.update(fresh.__dict__)
        self.spec, self.spec_sha256, self.out = event.get("spec", ""), event.get("spec_sha256", ""), event.get("out", "")
        self.pid = event.get("pid")
        self.started = event.get("t")
        for entry in event.get("tasks", []):
            self.tasks[entry["id"]] = TaskState(entry["id"], entry.get("kind", ""), entry.get("key", ""),
                                                list(entry.get("deps", [])), entry.get("loc"))

    def _on_task_start(self, event: dict[str, Any]) -> None:
        task = self.task(event)
        task.status, task.started, task.progress, task.phase = "running", event.get("t"), None, None

    def _on_progress(self, event: dict[str, Any]) -> None:
        self._set_progress(self.task(event), int(event.get("done", 0)), int(event.get("total", 0)),
                           str(event.get("what", "")), event.get("t"))

    @staticmethod
    def _set_progress(task: TaskState, done: int, total: int, what: str, t: float | None) -> None:
        phase = task.phase
        if (phase is None or phase.name != phase_name(what) or phase.total != total
                or done < phase.first_done) and t is not None:
            task.phase = Phase(phase_name(what), float(t), done, total)
        task.progress = (done, total, what)

    def _on_cache_invalid(self, event: dict[str, Any]) -> None:
        self.task(event).note = f"stored result rejected: {event.get('reason', '')}"

    def _on_task_end(self, event: dict[str, Any]) -> None:
        task = self.task(event)
        task.status = event.get("status", task.status)
        task.seconds = event.get("seconds")
        task.metrics = dict(event.get("metrics") or {})
        task.data = dict(event.get("data") or {})
        task.artifacts = dict(event.get("artifacts") or {})
        # Results carry what a task may not have emitted as it went.
        if task.kind == "steer.verify" and task.id not in self.sweeps and task.data.get("sweep"):
            self.sweeps[task.id] = list(task.data["sweep"])
        provenance = task.data.get("provenance")
        if task.kind == "compose" and task.id not in self.weights and isinstance(provenance, dict):
            self.weights[task.id] = {"terms": list(provenance.get("terms", [])), "merge": provenance.get("merge")}

    def _on_task_failed(self, event: dict[str, Any]) -> None:
        task = self.task(event)
        task.error, task.error_loc = event.get("error"), event.get("loc")
        task.internal, task.log = bool(event.get("internal")), event.get("log")

    def _on_expectation_unmet(self, event: dict[str, Any]) -> None:
        self.unmet.append(event)

    def _on_build_end(self, event: dict[str, Any]) -> None:
        self.finished, self.ok, self.cancelled = True, bool(event.get("ok")), bool(event.get("cancelled"))

    # --- task events (behaviorc.core.events) ---------------------------------------------

    def _on_train_step(self, event: dict[str, Any]) -> None:
        if "steps" in event:  # steps are the progress of training, whatever progress said last
            # worded as training's own progress events word a step, so both are one phase
            what = f"loss {float(event['loss']):.4f}" if "loss" in event else "steps"
            self._set_progress(self.task(event), int(event.get("step", 0)), int(event["steps"]), what,
                               event.get("t"))
        if "loss" in event:
            self.losses.setdefault(event["task"], []).append((int(event.get("step", 0)), float(event["loss"])))
        if "margin" in event:
            self._on_train_eval(event)

    def _on_train_eval(self, event: dict[str, Any]) -> None:
        self.train_margins.setdefault(event["task"], []).append(
            (int(event.get("step", 0)), float(event["margin"])))

    def _on_steer_point(self, event: dict[str, Any]) -> None:
        point = {k: event[k] for k in SWEEP_FIELDS if k in event}
        self.sweeps.setdefault(event["task"], []).append(point)

    def _on_steer_verdict(self, event: dict[str, Any]) -> None:
        self.verdicts[event["task"]] = list(event.get("warnings", []))

    def _on_steer_layers(self, event: dict[str, Any]) -> None:
        self.layer_scores[event["task"]] = {"scores": list(event.get("scores", [])),
                                            "chosen": event.get("chosen")}

    def _on_distill_data(self, event: dict[str, Any]) -> None:
        self.distilled[event["task"]] = {k: event[k] for k in ("generated", "kept", "empty",
                                                               "mean_score", "engine") if k in event}

    def _on_train_note(self, event: dict[str, Any]) -> None:
        self.notes.setdefault(event["task"], []).append(str(event.get("message", "")))

    def _on_handoff_served(self, event: dict[str, Any]) -> None:
        self.served.setdefault(event["task"], []).append(
            (int(event.get("step", 0)), float(event.get("served_margin", 0.0)), float(event.get("strength", 0.0))))

    def _on_push(self, event: dict[str, Any]) -> None:
        self.pushes.append({k: v for k, v in event.items() if k != "type"})

    def _on_deploy_push(self, event: dict[str, Any]) -> None:
        """One push to several servers, all or nothing: a row per server."""
        for url in event.get("urls", []):
            self._on_push({"task": event.get("task"), "url": url, "ok": True, "ms": event.get("push_ms", 0.0),
                           "requests_failed": event.get("requests_failed")})

    def _on_eval_replies(self, event: dict[str, Any]) -> None:
        self.reply_tables[event["task"]] = {k: event.get(k) for k in ("scorer", "rows", "verdict", "side_by_side")}

    def _on_experiment_point(self, event: dict[str, Any]) -> None:
        """One measured point of an experiment: its numbers, by task id."""
        self.points[event["task"]] = {k: float(v) for k, v in event.items() if k != "t"
                                      and isinstance(v, (int, float)) and not isinstance(v, bool)}


Fold = Callable[[BuildState, dict[str, Any]], None]
EXECUTOR_FOLDS: dict[str, Fold] = {
    "build_start": BuildState._on_build_start, "task_start": BuildState._on_task_start,
    "progress": BuildState._on_progress, "cache_invalid": BuildState._on_cache_invalid,
    "task_end": BuildState._on_task_end, "task_failed": BuildState._on_task_failed,
    "expectation_unmet": BuildState._on_expectation_unmet, "build_end": BuildState._on_build_end,
}
TASK_EVENT_FOLDS: dict[type[TaskEvent], Fold] = {
    TrainStep: BuildState._on_train_step, TrainEval: BuildState._on_train_eval,
    SteerPoint: BuildState._on_steer_point, SteerVerdict: BuildState._on_steer_verdict,
    SteerLayers: BuildState._on_steer_layers, DistillData: BuildState._on_distill_data,
    TrainNote: BuildState._on_train_note, HandoffServed: BuildState._on_handoff_served,
    Push: BuildState._on_push, DeployPush: BuildState._on_deploy_push,
    EvalReplies: BuildState._on_eval_replies, ExperimentPoint: BuildState._on_experiment_point,
}


def fold_of(name: str) -> Fold | None:
    """How an event named `name` in a log changes the state; None: it does not."""
    task_event = TASK_EVENTS.get(name)
    return TASK_EVENT_FOLDS.get(task_event) if task_event is not None else EXECUTOR_FOLDS.get(name)
