"""The event log of a build: `DIR/events.jsonl`, one JSON object per line.

Each event is appended and flushed as it happens, so `behaviorc dash DIR` (or `tail -f`)
can follow a live build. A new build starts a new log. Every event has `t` (Unix time,
seconds), `type` and `task` (the task id, or null for build-wide events).

Emitted by the executor:

    build_start   spec, spec_sha256, out, tasks: [{id, kind, key, deps, loc}]
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

Emitted by tasks through `ctx.emit` (the dashboard draws these; other types are listed
in its log panel as they come):

    train_step    step, steps, loss, [lr], [margin]   one per optimizer step (or every k)
    train_eval    step, margin                        the behavior margin during training
    steer_sweep   strength, margin, [general_nll]     one per strength tried
                  (steer.point, as steer/tasks.py names it, is read the same way; it
                  adds capability, repetition, projection, right_share, wrong_share,
                  margins (per held-out pair) and samples (greedy replies))
    steer.verdict warnings, strength              (steer/tasks.py: the reasons not to
                  trust the steering, also in the task's data["warnings"])
    steer.layers  scores: [{layer, consistency, accuracy, effect}], chosen  (`layers auto`)
    compose_weights  terms: [{behavior, weight}], merge  (else read from the compose
                  task's result data["provenance"])
    server_health url, ok, [latency_ms], [detail]
    push          url, ok, ms, [step], [error]
    deploy.push   urls, push_ms, requests_failed     (engine/tasks.py: one all-or-nothing
                  push to several servers)
    experiment.point  point, [rate, rate_stderr, malformed, margin, general_nll,
                  arithmetic_accuracy]            (experiments/measure.py: one measured point)
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from behaviorc.diagnostics import Location

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
