"""`DIR/report.json`: what a build did, task by task.

    {"spec": path, "spec_sha256": hex, "out": DIR, "ok": bool, "cancelled": bool,
     "finished": bool, "started": t, "seconds": s, "counts": {status: n},
     "tasks": [{"id", "kind", "key", "deps", "status", "seconds", "metrics", "data",
                "artifacts" (absolute paths), "error", "loc", "internal", "log"}],
     "expectations": [{"task", "metric", "op", "value", "actual", "met", "loc"}]}

`ok` means every task finished (done or cached) and every judged `expect` line held.

`status` is one of pending, running, done, cached, failed, skipped, cancelled. The file is
replaced atomically, at the start, at most every `min_interval` seconds while tasks end,
and at the end, so a killed build leaves a consistent (if slightly older) report, with
`finished` false.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from behaviorc.core.diagnostics import Location
from behaviorc.core.task import Task, TaskResult
from behaviorc.core.atomic import write_json_atomic

if TYPE_CHECKING:
    from behaviorc.pipeline.expect import Verdict

REPORT_FILE = "report.json"
STATUSES = ("pending", "running", "done", "cached", "failed", "skipped", "cancelled")


@dataclass
class TaskRecord:
    """One task's state in a build; the executor updates it, the report writes it."""

    task: Task
    deps: list[str]
    status: str = "pending"
    seconds: float = 0.0
    result: TaskResult | None = None
    error: str | None = None
    loc: Location | None = None
    internal: bool = False
    log: str | None = None
    cache_note: str | None = None  # why a stored result was not reused

    def as_json(self) -> dict[str, Any]:
        result = self.result or TaskResult()
        return {
            "id": self.task.id,
            "kind": self.task.kind,
            "key": self.task.key,
            "deps": self.deps,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "metrics": result.metrics,
            "data": result.data,
            "artifacts": result.artifacts,
            "error": self.error,
            "loc": self.loc.model_dump() if self.loc else None,
            "internal": self.internal,
            "log": self.log,
        }


def count_statuses(records: list[TaskRecord]) -> dict[str, int]:
    statuses = [r.status for r in records]
    return {s: statuses.count(s) for s in STATUSES if s in statuses}


@dataclass
class Report:
    path: Path
    spec: str
    spec_sha256: str
    out: str
    records: list[TaskRecord]
    min_interval: float = 0.5
    started: float = field(default_factory=time.time)
    verdicts: list["Verdict"] = field(default_factory=list)  # judged at the end of the build
    _last_write: float = 0.0

    def as_json(self, finished: bool, cancelled: bool) -> dict[str, Any]:
        statuses = [r.status for r in self.records]
        ok = (finished and not cancelled and all(s in ("done", "cached") for s in statuses)
              and all(v.met for v in self.verdicts))
        return {
            "spec": self.spec,
            "spec_sha256": self.spec_sha256,
            "out": self.out,
            "ok": ok,
            "finished": finished,
            "cancelled": cancelled,
            "started": self.started,
            "seconds": round(time.time() - self.started, 4),
            "counts": count_statuses(self.records),
            "tasks": [r.as_json() for r in self.records],
            "expectations": [v.as_json() for v in self.verdicts],
        }

    def write(self, finished: bool = False, cancelled: bool = False) -> None:
        write_json_atomic(self.path, self.as_json(finished, cancelled))
        self._last_write = time.monotonic()

    def write_soon(self) -> None:
        """Write unless the last write was very recent (keeps per-task cost flat)."""
        if time.monotonic() - self._last_write >= self.min_interval:
            self.write()
