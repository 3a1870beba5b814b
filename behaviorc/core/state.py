"""A build's state folded from its events: what the terminal progress and the
dashboard draw. Reading events is the only way either learns about a build, so a live
build and a replayed log look the same.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RECENT_EVENTS = 500  # events kept for the log panel
# What the Steer panel shows of each strength tried (steer.verify's points carry more).
SWEEP_FIELDS = ("strength", "margin", "general_nll", "capability", "repetition", "right_share",
                "wrong_share", "samples")


# How the terminal and the dashboard show a task's status and numbers.
STATUS_STYLE = {
    "pending": ("·", "dim"), "running": ("▶", "bold yellow"), "done": ("✓", "green"),
    "cached": ("≡", "cyan"), "failed": ("✗", "bold red"), "skipped": ("-", "dim"),
    "cancelled": ("■", "magenta"),
}
SHOWN_METRICS = 3
# What a finished task's terminal line shows first: the behavior before and after; for a
# steering verification, the effect beside the random control's and the shares of pairs
# moved the right and the wrong (anti-steerable) way.
HEADLINE_METRICS = ("margin_before", "margin_steered", "margin_after", "steer_effect",
                    "control_effect", "right_share", "anti_steerable_share", "steered_share",
                    "push_ms", "requests_failed")
LINE_METRICS = 6


def format_metrics(metrics: dict[str, float], limit: int = SHOWN_METRICS) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:limit])


def headline_first(metrics: dict[str, float]) -> dict[str, float]:
    first = {k: metrics[k] for k in HEADLINE_METRICS if k in metrics}
    return {**first, **{k: v for k, v in metrics.items() if k not in first}}



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


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_text(task: "TaskState", now: float | None) -> str:
    """A running task's sub-phase, count and ETA in a few words, e.g.
    `sampling 10 prompts x 4 · 0/30` or `loss 0.41 · 12/30 (40%) · ETA 1m05s`; no ETA
    without a clock (`now` None)."""
    if task.progress is None:
        return task.note or ""
    done, total, what = task.progress
    parts = [what] if what else []
    if total > 0:
        parts.append(f"{done}/{total} ({100 * done // total}%)")
    eta = task.phase.eta(done, now) if task.phase is not None and now is not None else None
    if eta is not None:
        parts.append(f"ETA {format_seconds(eta)}")
    return " · ".join(parts)


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
        handler = getattr(self, "_on_" + str(event.get("type")).replace(".", "_"), None)
        if handler is not None:
            handler(event)
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

    # --- task events (behaviorc.core.events.TASK_EVENTS) --------------------------------

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


def reply_table_lines(table: dict[str, Any]) -> list[str]:
    """A reply table (eval.replies' fields, evaluate.table's data) as text: a row
    per model with 95% intervals, the verdict, then greedy replies side by side."""
    def cell(figure: dict[str, float] | None, percent: bool = False) -> str:
        if not figure or figure.get("mean") != figure.get("mean"):  # absent or NaN
            return "–"
        show = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:.2f}")
        return f"{show(figure['mean'])} [{show(figure['low'])}, {show(figure['high'])}]"

    lines = [f"  {'model':<9} {'behavior rate':<16} {'mean score':<19} {'distinct-2':<19} "
             f"{'NLL under base':<19} loops"]
    for row in table.get("rows") or []:
        lines.append(f"  {row['model']:<9} {cell(row.get('rate'), True):<16} "
                     f"{cell(row.get('score')):<19} {cell(row.get('distinct_2')):<19} "
                     f"{cell(row.get('nll')):<19} {row.get('looping', 0):.0%}")
    lines += [f"  verdict: {line}" for line in table.get("verdict") or []]
    for row in table.get("side_by_side") or []:
        lines.append(f"  prompt: {row['prompt']}")
        lines += [f"    {model + ':':<10}{' '.join(str(text).split())}" for model, text in row.items()
                  if model != "prompt"]
    return lines


def process_alive(pid: int | None) -> bool:
    """Whether process `pid` runs (a build killed with -9 never says it ended)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def summarize(event: dict[str, Any]) -> str:
    """One line for an event in a log: its fields other than t/type/task."""
    fields = {k: v for k, v in event.items() if k not in ("t", "type", "task", "tasks", "data")}
    parts = []
    for name, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            value = _short(value)
        elif isinstance(value, str) and "\n" in value:
            value = value.splitlines()[0]
        parts.append(f"{name}={value}")
    return " ".join(parts)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
