"""Run a plan's tasks against the store, each once its upstream tasks are finished.

For each task: skip it when an upstream task did not succeed; reuse the stored result
when its key is in the store and verifies (`cached`); otherwise run it in a staging
folder and store what it made (`done`). A failing task is recorded with its cause and
spec location and the build goes on with every task that does not depend on it.
Cancellation (Ctrl-C, the dashboard) stops at the task's next `progress` or
`check_cancelled`; everything finished stays in the store.

With `jobs` above 1, tasks that say they are `parallel_safe` run in worker processes
(`behaviorc.pipeline.parallel`) while the executor goes on: it starts each ready task as a
worker frees up, writes the workers' events to the log as they come, and stores each
result itself. Other tasks (a live server, shared engines) run in this process, alone:
once one is ready no new worker task starts until it has run. With `jobs` 1 every task
runs here, one at a time, in plan order.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.task import Task, TaskResult
from behaviorc.pipeline.attempt import Attempt, attempt, render_failure
from behaviorc.pipeline.context import CancelSignal, EngineLoader, EnginePool, RunContext, load_embedded_engine
from behaviorc.core.events import EVENTS_FILE, EventLog, Listener, location_fields
from behaviorc.pipeline.expect import Verdict, judge
from behaviorc.pipeline.parallel import Job, Jobs, WorkerPool, start_resource_tracker, task_memory
from behaviorc.pipeline.plan import TaskExpectation
from behaviorc.pipeline.results import stamp_provenance
from behaviorc.pipeline.report import REPORT_FILE, Report, TaskRecord, count_statuses
from behaviorc.pipeline import outputs
from behaviorc.pipeline.outputs import STORE_DIR
from behaviorc.pipeline.store import InvalidEntry, Store

LOG_DIR = "logs"
CANCEL_FILE = "cancel"
POLL_SECONDS = 0.1  # how often the executor looks at the cancel signal while workers run


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


@dataclass
class _InWorker:
    """A task a worker runs now."""

    record: TaskRecord
    staging: Path
    started: float


class Executor:
    def __init__(self, out: Path, *, force: bool = False, spec_path: str = "",
                 spec_sha256: str = "", listeners: Sequence[Listener] = (),
                 engine_loader: EngineLoader = load_embedded_engine,
                 cancel: CancelSignal | None = None, expectations: Sequence[TaskExpectation] = (),
                 jobs: Jobs = Jobs(1), force_out: bool = False):
        self.out = Path(out).resolve()
        self.force = force
        self.force_out = force_out
        self.spec_path = spec_path
        self.spec_sha256 = spec_sha256
        self.store = Store(self.out / STORE_DIR)
        self.events = EventLog(self.out / EVENTS_FILE, list(listeners))
        self.engines = EnginePool(self.events, engine_loader)
        self.cancel = cancel or CancelSignal(self.out / CANCEL_FILE)
        self.expectations = list(expectations)
        self.jobs = jobs
        if jobs.most > 1:
            start_resource_tracker()  # now, while this process's stderr is still the terminal's
        self._results: dict[str, TaskResult] = {}
        self._upstream: dict[str, list[TaskRecord]] = {}  # by task key
        self._model_users: dict[str, int] = {}

    def run(self, targets: Sequence[Task]) -> BuildOutcome:
        tasks = plan_order(targets)
        records = [TaskRecord(t, deps=list(dict.fromkeys(u.id for u in t.arguments().values())))
                   for t in tasks]
        by_key = {r.task.key: r for r in records}
        self._upstream = {r.task.key: [by_key[u.key] for u in r.task.arguments().values()] for r in records}
        self._results = {}
        self._model_users = _model_users(tasks)
        self.out.mkdir(parents=True, exist_ok=True)
        outputs.claim(self.out, self.force_out)
        outputs.record(self.out, (EVENTS_FILE, REPORT_FILE, CANCEL_FILE))  # before the lock makes .store
        self.store.acquire()
        (self.out / CANCEL_FILE).unlink(missing_ok=True)  # a request meant for an earlier build
        for leftover in self.out.iterdir():
            if outputs.cut_short(leftover.name):
                leftover.unlink(missing_ok=True)
        report = Report(self.out / REPORT_FILE, self.spec_path, self.spec_sha256, str(self.out), records)
        started = time.perf_counter()
        self.events.open()
        try:
            self.events.emit("build_start", None, spec=self.spec_path, spec_sha256=self.spec_sha256,
                             out=str(self.out), pid=os.getpid(), tasks=[_plan_entry(r) for r in records])
            report.write()
            parallel = self.jobs.most > 1 and any(t.parallel_safe for t in tasks)
            self._schedule(records, report, WorkerPool(self.jobs, self.engines.loader) if parallel else None)
        finally:
            outcome = self._finish(records, report, time.perf_counter() - started)
        return outcome

    def _schedule(self, records: list[TaskRecord], report: Report, pool: WorkerPool | None) -> None:
        """Start each task once its upstream tasks are settled, until none is left or
        the build is stopped; then wait for what workers still run."""
        waiting = list(records)
        in_workers: dict[str, _InWorker] = {}
        stopping = False
        settled = True  # a task settled since the waiting ones were last looked at
        try:
            while waiting or in_workers:
                if self.cancel.is_set():
                    if not in_workers:
                        break
                    if not stopping:  # the workers' tasks stop at their next check
                        assert pool is not None
                        pool.stop()
                        self.events.emit("build_stopping", None, reason=self.cancel.reason,
                                         running=[r.record.task.id for r in in_workers.values()])
                        stopping = True
                elif settled or not in_workers:
                    waiting = self._start_ready(waiting, in_workers, report, pool)
                settled = False
                if in_workers:
                    assert pool is not None
                    for key, kind, payload in pool.wait(POLL_SECONDS):
                        if kind == "event":
                            self.events.write(payload)
                        else:
                            running = in_workers.pop(key)
                            self._settle(running.record, payload, running.staging, running.started)
                            self._finished(running.record, report)
                            settled = True
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            self.cancel.cancel("stopped with Ctrl-C")
        finally:
            if pool is not None:
                pool.close()  # terminates workers still running: their tasks are abandoned
            for running in in_workers.values():
                shutil.rmtree(running.staging, ignore_errors=True)
                running.record.status = "cancelled"
                running.record.seconds = time.perf_counter() - running.started
                self._emit_end(running.record)

    def _start_ready(self, waiting: list[TaskRecord], in_workers: dict[str, _InWorker],
                     report: Report, pool: WorkerPool | None) -> list[TaskRecord]:
        """Settle or start, in plan order, every waiting task whose upstream tasks are
        settled; returns the tasks still waiting."""
        still: list[TaskRecord] = []
        here_waits = False  # a task for this process waits for the workers to finish
        for record in waiting:
            upstream = self._upstream[record.task.key]
            in_worker = pool is not None and record.task.parallel_safe
            if self.cancel.is_set() or any(u.status in ("pending", "running") for u in upstream):
                still.append(record)
            elif self._settled_without_running(record, upstream):
                self._finished(record, report)
            elif in_worker and not here_waits and pool.has_room(lambda: self._memory_for(record.task)):
                in_workers[record.task.key] = self._send_to_worker(record, pool)
            elif not in_worker and not in_workers:
                self._run_here(record)
                self._finished(record, report)
            else:
                here_waits = here_waits or not in_worker
                still.append(record)
        return still

    def _finish(self, records: list[TaskRecord], report: Report, seconds: float) -> BuildOutcome:
        """Free engines, make the store durable, judge expectations, write the final
        report and close the log; runs however the build ended."""
        self.engines.close_all()
        for failure in self.store.wait_durable():
            self.events.emit("store_sync_failed", None, error=failure)
        cancelled = self.cancel.is_set()
        report.verdicts = judge(self.expectations, {
            r.task.id: r.result for r in records
            if r.status in ("done", "cached") and r.result is not None})
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

    def _settled_without_running(self, record: TaskRecord, upstream: list[TaskRecord]) -> bool:
        """Skip the task when an upstream task did not finish, or reuse its stored result."""
        blocked = [u.task.id for u in upstream if u.status not in ("done", "cached")]
        if blocked:
            record.status = "skipped"
            record.error = f"not run: upstream {', '.join(blocked)} did not finish"
            self._emit_end(record)
            return True
        started = time.perf_counter()
        if not self.force and self._reuse(record):
            record.seconds = time.perf_counter() - started
            self._emit_end(record)
            return True
        return False

    def _begin(self, record: TaskRecord) -> Path:
        """Mark the task running; its empty staging folder."""
        task = record.task
        self.events.emit("task_start", task.id, kind=task.kind, key=task.key)
        record.status = "running"
        return self.store.staging(task.key)

    def _run_here(self, record: TaskRecord) -> None:
        started = time.perf_counter()
        task = record.task
        staging = self._begin(record)
        ctx = RunContext(task, staging, lambda: self.store.scratch(task.key), self._results,
                         self.engines, self.events, self.cancel, self.spec_sha256)
        self._settle(record, attempt(task, ctx), staging, started)

    def _send_to_worker(self, record: TaskRecord, pool: WorkerPool) -> _InWorker:
        started = time.perf_counter()
        task = record.task
        staging = self._begin(record)
        upstream = {t.key: self._results[t.key] for t in task.walk() if t.key != task.key}
        pool.submit(Job(task, staging, self.store.root, upstream, self.spec_sha256))
        return _InWorker(record, staging, started)

    def _settle(self, record: TaskRecord, tried: Attempt, staging: Path, started: float) -> None:
        """Store what a run made, or record why it made nothing."""
        task = record.task
        try:
            if tried.status == "done":
                assert tried.result is not None
                try:
                    stamp_provenance(task, staging, tried.result, self._results, self.spec_path,
                                     self.spec_sha256)
                    stored = self.store.commit(task, staging, tried.result, time.perf_counter() - started,
                                               tried.events)
                    record.result = self._results[task.key] = stored.result
                    record.status = "done"
                except Exception:  # what the task returned cannot be stored: a bug in it
                    tried = Attempt("failed", traceback=traceback.format_exc())
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when committed
        if tried.status == "cancelled":
            self.cancel.cancel(tried.reason)
            record.status = "cancelled"
        elif tried.status == "failed":
            record.status = "failed"
            if tried.traceback is not None:
                record.internal = True
                record.log = str(self._save_traceback(task, tried.traceback))
                record.error, record.loc = render_failure(task, BehaviorError(
                    f"internal error in task {task.id} (a bug in behaviorc)",
                    hint=f"traceback saved to {record.log}"))
            else:
                record.error, record.loc = tried.error, tried.loc
            self.events.emit("task_failed", task.id, error=record.error,
                             loc=location_fields(record.loc), internal=record.internal, log=record.log)
        record.seconds = time.perf_counter() - started
        self._emit_end(record)

    def _finished(self, record: TaskRecord, report: Report) -> None:
        """After a task settled: free the engines no task still to run needs."""
        report.write_soon()
        for model_key in _model_keys(record.task):
            self._model_users[model_key] -= 1
        self.engines.keep_only(self._model_paths(self._model_users))

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

    def _save_traceback(self, task: Task, text: str) -> Path:
        name = f"{LOG_DIR}/" + task.id.replace(":", "-").replace("/", "_") + ".log"
        outputs.record(self.out, [name])
        path = self.out / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def _model_paths(self, model_users: dict[str, int]) -> set[str]:
        """Folders of the resolved models that tasks still to run read."""
        return {str(self._results[key].data["path"]) for key, users in model_users.items()
                if users > 0 and key in self._results and "path" in self._results[key].data}

    def _memory_for(self, task: Task) -> int:
        """What a worker running the task may hold, from the size of its models."""
        return task_memory({str(self._results[k].data["path"]) for k in _model_keys(task)
                            if "path" in self._results[k].data})


def _model_keys(task: Task) -> set[str]:
    """The model tasks whose folders a task loads."""
    return {model.key for model in task.models()}


def _model_users(tasks: list[Task]) -> dict[str, int]:
    """For each model task (by key), how many tasks load its model."""
    users: dict[str, int] = {}
    for task in tasks:
        for key in _model_keys(task):
            users[key] = users.get(key, 0) + 1
    return users


def _plan_entry(record: TaskRecord) -> dict:
    task = record.task
    return {"id": task.id, "kind": task.kind, "key": task.key, "deps": record.deps,
            "loc": location_fields(task.loc)}


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
