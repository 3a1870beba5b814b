"""The event log of a build: `DIR/events.jsonl`, one JSON object per line.

Each event is appended and flushed as it happens, so `behaviorc dash DIR` (or `tail -f`)
can follow a live build. A new build starts a new log. Every event has `t` (Unix time,
seconds), `type` and `task` (the task id, or null for build-wide events).

Emitted by the executor:

    build_start   spec, spec_sha256, out, pid (of the build process), tasks: [{id, kind, key, deps, loc}]
    task_start    kind, key
    progress      done, total, what          (throttled to a few per second per task)
    cache_invalid reason                     (a stored result failed verification; rebuilt)
    task_end      status done|cached|failed|skipped|cancelled, seconds, metrics, data,
                  artifacts (absolute paths)
    engine_loaded / engine_freed   path, dtype, device
    task_failed   error (rendered diagnostic), loc, internal (bool), log (traceback file)
    expectation_unmet  metric, op, value, actual, loc   (an `expect` line that did not hold)
    store_sync_failed  error                 (an fsync failed; the entry is verified when read)
    build_stopping     reason, running: [task ids]   (cancelled while worker processes run
                  tasks: they stop at their next check; `--jobs` above 1 only)
    build_end     ok, cancelled, seconds, counts {status: n}

A cached task's own events (those below) are emitted again, with `replayed: true`,
just before its task_end, so a rebuild's log shows what the stored result came from.

Emitted by tasks through `ctx.emit`: the `TaskEvent` classes below, each with its
fields, named in the log after its class (`TrainStep` is `train.step`). Every one of
them is folded by the dashboard's state (`behaviorc.tui.state`); a test holds this.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, TextIO

from behaviorc.core.diagnostics import Location

EVENTS_FILE = "events.jsonl"
RESERVED_FIELDS = ("t", "type", "task")

Listener = Callable[[dict[str, Any]], None]


class EventLog:
    """Appends events to a file and hands each to in-process listeners (the terminal
    progress display). Safe to call from several threads."""

    def __init__(self, path: Path, listeners: list[Listener] | None = None):
        self.path = Path(path)
        self.listeners = list(listeners or [])
        self._lock = threading.Lock()
        self._file: TextIO | None = None

    def open(self) -> None:
        """Start a new log. The previous build's log is unlinked rather than truncated,
        so a reader following it sees a new file (another inode), never a rewind."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def emit(self, type: str, task: str | None = None, **fields: Any) -> dict[str, Any]:
        return self.write(make_event(type, task, **fields))

    def write(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append an event made elsewhere (a worker process's), keeping its time."""
        line = json.dumps(event, default=_jsonable)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
        for listener in self.listeners:
            listener(event)
        return event


def make_event(type: str, task: str | None = None, **fields: Any) -> dict[str, Any]:
    event = {"t": round(time.time(), 4), "type": type, "task": task}
    for name, value in fields.items():
        if name in RESERVED_FIELDS:
            raise ValueError(f"event field {name!r} is reserved")
        event[name] = value
    return event


def location_fields(loc: Location | None) -> dict[str, Any] | None:
    return loc.model_dump() if loc is not None else None


def jsonable(event: dict[str, Any]) -> dict[str, Any]:
    """The event as it reads back from the log (tensors as lists, paths as strings)."""
    return json.loads(json.dumps(event, default=_jsonable))


def _jsonable(value: Any) -> Any:
    """Values tasks commonly emit that JSON does not know (tensors, numpy scalars, paths)."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event in a log (a line cut short by a kill is left out)."""
    events = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def process_alive(pid: int | None) -> bool:
    """Whether process `pid` runs: a build killed with -9 never writes its build_end, so a
    reader of its log asks about the pid its build_start gave."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


# --- what tasks emit ---------------------------------------------------------------------


# Every task event's class by its name in the log, filled as each class is defined.
TASK_EVENTS: dict[str, type[TaskEvent]] = {}


@dataclass(frozen=True)
class TaskEvent:
    """An event a task emits as it works. `type`, its name in the log, is made from its
    class's name (`TrainStep` -> `train.step`), so a name and its class never disagree."""

    type: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", ".", cls.__name__).lower()
        if cls.type in TASK_EVENTS:
            raise TypeError(f"{cls.__name__} and {TASK_EVENTS[cls.type].__name__} are both {cls.type!r}")
        TASK_EVENTS[cls.type] = cls

    def fields(self) -> dict[str, Any]:
        """The event's fields as written: an optional field left at None is left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class TrainStep(TaskEvent):
    """One optimizer step."""

    step: int
    steps: int
    loss: float
    grad_norm: float | None = None
    lr: float | None = None
    limiter: int | None = None  # limiter activations in this step
    tokens_per_s: float | None = None
    skipped: bool | None = None  # the NaN/inf guard dropped the step
    margin: float | None = None  # the behavior margin, when measured at this step


@dataclass(frozen=True)
class TrainEval(TaskEvent):
    """The behavior margin of the training weights (steering off) at a step."""

    step: int
    margin: float
    margin_steered: float | None = None  # at step 0, when the task carries steering
    steered_share: float | None = None  # at the last step, when there was a steered gain


@dataclass(frozen=True)
class SteerPoint(TaskEvent):
    """One strength of a steering verification sweep: what it did and what it cost."""

    strength: float
    margin: float
    general_nll: float | None = None
    capability: float | None = None  # the capability probe's accuracy
    repetition: float | None = None  # share of repeated 3-grams in the sample replies
    projection: float | None = None  # the replies' activation-projection score
    right_share: float | None = None  # held-out pairs moved the right way
    wrong_share: float | None = None  # ... and the wrong way (anti-steerable)
    margins: list[float] | tuple[float, ...] | None = None  # per held-out pair
    samples: list[str] | tuple[str, ...] | None = None  # greedy replies
    # the replies read back (steer.verify.SweepPoint): behavior score, coherence, and why
    # the text broke (empty: it held)
    behavior: float | None = None
    distinct_2: float | None = None
    looping: float | None = None
    reply_nll: float | None = None
    broke: list[str] | tuple[str, ...] | None = None


@dataclass(frozen=True)
class SteerVerdict(TaskEvent):
    """Why not to trust a steering vector (empty: nothing against it), and the strength
    verification settled on."""

    warnings: list[str]
    strength: float


@dataclass(frozen=True)
class SteerLayers(TaskEvent):
    """How well each layer separates the pairs, and the one `layers auto` chose."""

    scores: list[dict]  # steer.extract's per-layer figures (numbers; `broke`: reasons)
    chosen: int


@dataclass(frozen=True)
class DistillData(TaskEvent):
    """What distillation sampled and kept."""

    generated: int
    kept: int
    empty: int
    mean_score: float
    engine: str  # embedded | vllm


@dataclass(frozen=True)
class TrainNote(TaskEvent):
    """Something about a training run a reader should know (e.g. no steered gain)."""

    message: str


@dataclass(frozen=True)
class HandoffServed(TaskEvent):
    """A live hand-off's served behavior after a change of weights or strength."""

    step: int
    strength: float
    served_margin: float
    weights_margin: float


@dataclass(frozen=True)
class Push(TaskEvent):
    """A push of weights into one live server."""

    url: str
    ms: float
    ok: bool = True
    step: int | None = None
    strength: float | None = None
    served_margin: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class DeployPush(TaskEvent):
    """One all-or-nothing push of a model into several live servers."""

    urls: list[str]
    push_ms: float
    requests: int
    requests_failed: int


@dataclass(frozen=True)
class EvalReplies(TaskEvent):
    """A behavior's reply table: per model (base, prompted, steered, trained) its scored
    replies' figures, the verdict in words, and greedy replies side by side."""

    scorer: str  # markers | projection | judge
    # {model, replies, rate, score, distinct_2, repeated_share, nll: {mean, low, high},
    #  tokens, looping}
    rows: list[dict[str, Any]]
    verdict: list[str]
    side_by_side: list[dict[str, str]]  # {prompt, base, prompted, ...}: greedy replies


@dataclass(frozen=True)
class ExperimentPoint(TaskEvent):
    """One measured point of an experiment; its metrics are written as fields."""

    point: str
    values: dict[str, float]

    def fields(self) -> dict[str, Any]:
        return {"point": self.point, **self.values}

