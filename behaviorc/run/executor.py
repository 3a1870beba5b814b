"""Run a plan's tasks against the store, in dependency order.

For each task, in order: skip it when an upstream task did not succeed; reuse the stored
result when its key is in the store and verifies (`cached`); otherwise run it in a
staging folder and store what it made (`done`). A failing task is recorded with its
cause and spec location and the build goes on with every task that does not depend on
it. Cancellation (Ctrl-C, the dashboard) stops at the task's next `progress` or
`check_cancelled`; everything finished stays in the store.

Tasks run one at a time. Each task's work is confined to `_run_task` with its own
context and staging folder, so a pool running the ready tasks of the DAG can replace the
loop in `run` without touching the rest.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from behaviorc.diagnostics import BehaviorError, Diagnostic, Location
from behaviorc.plan.task import Cancelled, Task, TaskResult
from behaviorc.plan.tasks import ResolveModel
from behaviorc.run.context import CancelSignal, EngineLoader, EnginePool, RunContext, load_embedded_engine
from behaviorc.run.events import EVENTS_FILE, EventLog, Listener, location_fields
from behaviorc.run.expect import Expectation, Verdict, judge
from behaviorc.run.report import REPORT_FILE, Report, TaskRecord, count_statuses
from behaviorc.run.store import InvalidEntry, Store

STORE_DIR = ".store"
LOG_DIR = "logs"
CANCEL_FILE = "cancel"


@dataclass
class BuildOutcome:
    records: list[TaskRecord]
    cancelled: bool
    report_path: Path
    events_path: Path
    verdicts: list[Verdict]

    @property
    def ok(self) -> bool:
        return (not self.cancelled and all(r.status in ("done", "cached") for r in self.records)
                and not self.unmet)

    @property
    def failed(self) -> list[TaskRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def unmet(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.met]

    @property
    def exit_code(self) -> int:
        if self.cancelled:
            return 130
        return 0 if self.ok else 1

    def record(self, task_id: str) -> TaskRecord:
        return next(r for r in self.records if r.task.id == task_id)


def plan_order(targets: Sequence[Task]) -> list[Task]:
    """The targets and everything upstream of them, each once, dependencies first."""
    ordered: dict[str, Task] = {}
    for target in targets:
        for task in target.walk():
            ordered.setdefault(task.key, task)
    return list(ordered.values())


class Executor:
    def __init__(self, out: Path, *, force: bool = False, spec_path: str = "",
                 spec_sha256: str = "", listeners: Sequence[Listener] = (),
                 engine_loader: EngineLoader = load_embedded_engine,
                 cancel: CancelSignal | None = None, expectations: Sequence[Expectation] = ()):
        self.out = Path(out).resolve()
        self.force = force
        self.spec_path = spec_path
        self.spec_sha256 = spec_sha256
        self.store = Store(self.out / STORE_DIR)
        self.events = EventLog(self.out / EVENTS_FILE, list(listeners))
        self.engines = EnginePool(self.events, engine_loader)
        self.cancel = cancel or CancelSignal(self.out / CANCEL_FILE)
        self.expectations = list(expectations)
        self._results: dict[str, TaskResult] = {}

    def run(self, targets: Sequence[Task]) -> BuildOutcome:
        tasks = plan_order(targets)
        records = [TaskRecord(t, deps=list(dict.fromkeys(u.id for u in t.arguments().values())))
                   for t in tasks]
        by_key = {r.task.key: r for r in records}
        self._results = {}
        self.out.mkdir(parents=True, exist_ok=True)
        self.store.acquire()
        (self.out / CANCEL_FILE).unlink(missing_ok=True)  # a request meant for an earlier build
        for leftover in self.out.glob(f".{REPORT_FILE}.tmp-*"):  # a report write a kill cut short
            leftover.unlink(missing_ok=True)
        report = Report(self.out / REPORT_FILE, self.spec_path, self.spec_sha256, str(self.out), records)
        started = time.perf_counter()
        self.events.open()
        try:
            self.events.emit("build_start", None, spec=self.spec_path, spec_sha256=self.spec_sha256,
                             out=str(self.out), tasks=[_plan_entry(r) for r in records])
            report.write()
            model_users = _model_users(tasks)
            for record in records:
                if self.cancel.is_set():
                    break
                self._run_task(record, [by_key[u.key] for u in record.task.arguments().values()])
                report.write_soon()
                for model_key in _model_keys(record.task):
                    model_users[model_key] -= 1
                self.engines.keep_only(self._model_paths(model_users))
        finally:
            outcome = self._finish(records, report, time.perf_counter() - started)
        return outcome

    def _finish(self, records: list[TaskRecord], report: Report, seconds: float) -> BuildOutcome:
        """Free engines, make the store durable, judge expectations, write the final
        report and close the log; runs however the build ended."""
        self.engines.close_all()
        for failure in self.store.wait_durable():
            self.events.emit("store_sync_failed", None, error=failure)
        cancelled = self.cancel.is_set()
        report.verdicts = judge(self.expectations, records)
        report.write(finished=True, cancelled=cancelled)
        outcome = BuildOutcome(records, cancelled, report.path, self.events.path, report.verdicts)
        for verdict in outcome.unmet:
            fields = verdict.as_json()
            self.events.emit("expectation_unmet", fields.pop("task"), **fields)
        self.events.emit("build_end", None, ok=outcome.ok, cancelled=cancelled,
                         seconds=round(seconds, 4), counts=count_statuses(records))
        self.events.close()
        self.store.release()
        return outcome

    # --- one task ---------------------------------------------------------------------

    def _run_task(self, record: TaskRecord, upstream: list[TaskRecord]) -> None:
        task = record.task
        blocked = [u.task.id for u in upstream if u.status not in ("done", "cached")]
        if blocked:
            record.status = "skipped"
            record.error = f"not run: upstream {', '.join(blocked)} did not finish"
            self._emit_end(record)
            return
        started = time.perf_counter()
        if not self.force and self._reuse(record):
            record.seconds = time.perf_counter() - started
            self._emit_end(record)
            return
        self.events.emit("task_start", task.id, kind=task.kind, key=task.key)
        record.status = "running"
        staging = self.store.staging(task.key)
        ctx = RunContext(task, staging, lambda: self.store.scratch(task.key), self._results,
                         self.engines, self.events, self.cancel, self.spec_sha256)
        try:
            result = task.execute(ctx)
            if not isinstance(result, TaskResult):
                raise TypeError(f"{type(task).__name__}.execute returned "
                                f"{type(result).__name__}, not a TaskResult")
            stored = self.store.commit(task, staging, result, time.perf_counter() - started, ctx.emitted)
            record.result = self._results[task.key] = stored.result
            record.status = "done"
        except (Cancelled, KeyboardInterrupt) as err:
            self.cancel.cancel(str(err) or "interrupted")
            record.status = "cancelled"
        except BehaviorError as err:
            record.status = "failed"
            record.error, record.loc = _render_failure(task, err)
        except Exception:  # a bug in a task: keep the traceback, report it plainly
            record.status = "failed"
            record.internal = True
            record.log = str(self._save_traceback(task))
            record.error, record.loc = _render_failure(task, BehaviorError(
                f"internal error in task {task.id} (a bug in behaviorc)",
                hint=f"traceback saved to {record.log}"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when committed
        record.seconds = time.perf_counter() - started
        if record.status == "failed":
            self.events.emit("task_failed", task.id, error=record.error,
                             loc=location_fields(record.loc), internal=record.internal, log=record.log)
        self._emit_end(record)

    def _reuse(self, record: TaskRecord) -> bool:
        task = record.task
        try:
            stored = self.store.lookup(task.key)
        except InvalidEntry as err:
            record.cache_note = str(err)
            self.events.emit("cache_invalid", task.id, key=task.key, reason=str(err))
            self.store.discard(task.key)
            return False
        if stored is None:
            return False
        for event in stored.events:  # what the task showed when it ran (curves, sweeps)
            fields = {k: v for k, v in event.items() if k != "type"}
            self.events.emit(event["type"], task.id, replayed=True, **fields)
        record.result = self._results[task.key] = stored.result
        record.status = "cached"
        return True

    def _emit_end(self, record: TaskRecord) -> None:
        result = record.result or TaskResult()
        self.events.emit("task_end", record.task.id, status=record.status,
                         seconds=round(record.seconds, 4), metrics=result.metrics, data=result.data,
                         artifacts=result.artifacts)

    def _save_traceback(self, task: Task) -> Path:
        logs = self.out / LOG_DIR
        logs.mkdir(exist_ok=True)
        path = logs / (task.id.replace(":", "-").replace("/", "_") + ".log")
        path.write_text(traceback.format_exc(), encoding="utf-8")
        return path

    def _model_paths(self, model_users: dict[str, int]) -> set[str]:
        """Folders of the resolved models that tasks still to run read."""
        return {str(self._results[key].data["path"]) for key, users in model_users.items()
                if users > 0 and key in self._results and "path" in self._results[key].data}


def _model_keys(task: Task) -> set[str]:
    """The ResolveModel tasks a task reads its model from."""
    return {u.key for u in task.arguments().values() if isinstance(u, ResolveModel)}


def _model_users(tasks: list[Task]) -> dict[str, int]:
    """For each ResolveModel (by key), how many tasks read its model directly."""
    users: dict[str, int] = {}
    for task in tasks:
        for key in _model_keys(task):
            users[key] = users.get(key, 0) + 1
    return users


def _plan_entry(record: TaskRecord) -> dict:
    task = record.task
    return {"id": task.id, "kind": task.kind, "key": task.key, "deps": record.deps,
            "loc": location_fields(task.loc)}


def _render_failure(task: Task, err: BehaviorError) -> tuple[str, Location | None]:
    """The error's diagnostics, pointed at the task's place in the spec when the error
    itself does not say where."""
    diagnostics = [d if d.loc is not None else Diagnostic(d.severity, d.message, task.loc, d.hint)
                   for d in err.diagnostics]
    loc = next((d.loc for d in diagnostics if d.loc is not None), None)
    return "\n".join(d.render() for d in diagnostics), loc


@contextmanager
def cancel_on_sigint(cancel: CancelSignal) -> Iterator[None]:
    """First Ctrl-C asks the build to stop at the next check; a second one interrupts
    at once (KeyboardInterrupt). Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.cancel("stopped with Ctrl-C")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
