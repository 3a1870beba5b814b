"""Worker processes for the tasks a build runs side by side (`--jobs N`).

The executor decides what runs where and when; a `WorkerPool` only runs what it is
given. Each worker is a spawned process (a fresh interpreter, not a fork of one that
holds threads and engines) using `Jobs.threads` torch threads, so N workers share the
cores instead of each spreading over all of them. A worker takes one `Job` at a time
over its pipe, runs the task into the staging folder the executor made, sends every
event the task emits as it happens, then the task's `Attempt`. The executor stores the
result: a worker never writes the store, so what lands there is committed by one process
exactly as for a task run in the build's own process.

Stopping: workers ignore Ctrl-C. The executor hears it, sets the shared stop event, and
each running task raises `Cancelled` at its next check. A hard stop (a second Ctrl-C)
terminates the workers; what they were writing is only in staging folders, which the
executor removes. A worker whose build process is gone (killed) exits at once, so it
never writes beside the next build's workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterator

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.task import Task, TaskResult
from behaviorc.pipeline.attempt import Attempt, attempt, render_failure
from behaviorc.pipeline.context import CancelSignal, EngineLoader, EnginePool, RunContext
from behaviorc.core.events import jsonable, make_event
from behaviorc.pipeline.store import Store
from behaviorc.engine.devices import usable_cores

# Memory one more worker task needs, for `--jobs auto`: an interpreter with torch and
# transformers loaded, plus the model several times over (weights, gradients, optimizer
# state and activations while training; measured on the testbed, rounded up).
WORKER_BYTES = 700 << 20
MODEL_COPIES = 6
PARENT_WATCH_SECONDS = 0.5


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def task_memory(model_folders: set[str]) -> int:
    """A rough upper bound on what one worker task on these models holds."""
    model_bytes = sum(f.stat().st_size for folder in model_folders
                      for f in Path(folder).glob("*.safetensors"))
    return WORKER_BYTES + MODEL_COPIES * model_bytes


@dataclass(frozen=True)
class Jobs:
    """How many tasks run at once. With `fit_memory` (`--jobs auto`) another worker
    task starts only while the free memory holds one more of them. `threads_each` fixes
    each worker's torch threads (by default the cores are shared out)."""

    most: int
    fit_memory: bool = False
    threads_each: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Jobs":
        """The value of `--jobs`."""
        if text == "auto":
            return cls(usable_cores(), fit_memory=True)
        try:
            most = int(text)
        except ValueError:
            raise BehaviorError(f"--jobs takes a number of tasks to run at once, or `auto`, not `{text}`",
                                hint="`--jobs auto` runs one task per usable core") from None
        if most < 1:
            raise BehaviorError(f"--jobs must be at least 1, not {most}")
        return cls(most)

    @property
    def threads(self) -> int:
        """Torch threads per worker: the cores shared out, so workers never oversubscribe."""
        return self.threads_each or max(1, usable_cores() // self.most)


@dataclass
class Job:
    task: Task
    staging: Path  # the task's ctx.out, made by the executor
    store_root: Path  # for the task's scratch folder
    results: dict[str, TaskResult]  # every upstream task's, by key
    spec_sha256: str


@dataclass
class _Worker:
    process: Any  # a spawn-context Process
    conn: Connection
    job: Job | None = None  # what it runs now; None when idle


class WorkerPool:
    """Up to `jobs.most` workers, started as tasks need them, each running one job at
    a time. `engine_loader` must be picklable (a module-level function)."""

    def __init__(self, jobs: Jobs, engine_loader: EngineLoader):
        self.jobs = jobs
        self.engine_loader = engine_loader
        start_resource_tracker()
        self._spawn = multiprocessing.get_context("spawn")
        self._stop = self._spawn.Event()  # shared with every worker: their CancelSignal
        self._workers: list[_Worker] = []

    @property
    def busy(self) -> int:
        return sum(w.job is not None for w in self._workers)

    def has_room(self, memory_needed: Callable[[], int]) -> bool:
        """Whether one more task may start now. The first always may: a build that can
        only run one task at a time still runs."""
        if self.busy >= self.jobs.most:
            return False
        if not self.jobs.fit_memory or self.busy == 0:
            return True
        available = available_memory()
        return available is None or available >= memory_needed()

    def submit(self, job: Job) -> None:
        worker = next((w for w in self._workers if w.job is None), None) or self._start()
        worker.conn.send(job)
        worker.job = job

    def stop(self) -> None:
        """Ask the running tasks to stop at their next check."""
        self._stop.set()

    def wait(self, timeout: float) -> list[tuple[str, str, Any]]:
        """What the busy workers sent within `timeout` seconds, in the order each sent
        it: (task key, "event", event) and (task key, "finished", Attempt)."""
        busy = [w for w in self._workers if w.job is not None]
        ready = set(wait([w.conn for w in busy], timeout))
        messages: list[tuple[str, str, Any]] = []
        for worker in busy:
            if worker.conn in ready:
                messages += self._drain(worker)
        return messages

    def close(self) -> None:
        """Let idle workers exit and terminate busy ones (a hard stop), then reap them all."""
        for worker in self._workers:
            if worker.job is None:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass  # it is gone already
            else:
                worker.process.terminate()
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers.clear()

    def _start(self) -> _Worker:
        parent_end, child_end = self._spawn.Pipe()
        process = self._spawn.Process(target=serve, name=f"behaviorc-worker-{len(self._workers) + 1}",
                                      args=(child_end, self._stop, self.jobs.threads, self.engine_loader),
                                      daemon=True)
        with _sigint_blocked():  # inherited through spawn: a Ctrl-C before the worker ignores it
            process.start()
        child_end.close()
        worker = _Worker(process, parent_end)
        self._workers.append(worker)
        return worker

    def _drain(self, worker: _Worker) -> list[tuple[str, str, Any]]:
        assert worker.job is not None
        key = worker.job.task.key
        messages: list[tuple[str, str, Any]] = []
        while worker.job is not None and worker.conn.poll():
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                messages.append((key, "finished", self._died(worker)))
                self._workers.remove(worker)
                worker.job = None
                break
            messages.append((key, kind, payload))
            if kind == "finished":
                worker.job = None
        return messages

    def _died(self, worker: _Worker) -> Attempt:
        worker.process.join(timeout=10)
        code = worker.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        assert worker.job is not None
        error, loc = render_failure(worker.job.task, BehaviorError(
            f"the worker process running task {worker.job.task.id} ended without finishing it ({how})",
            hint="out of memory? run with fewer --jobs"))
        return Attempt("failed", error=error, loc=loc)


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (every spawn needs it) with the real
    stderr. It hands `sys.stderr`'s fd to its process, and inside a Textual app (`build
    --tui`) sys.stderr is a capture whose fd is -1, which makes that start fail. The
    executor starts it before an app runs; the swap covers builds started inside one."""
    from multiprocessing import resource_tracker

    captured = sys.stderr
    if captured is not None and captured is not sys.__stderr__:
        sys.stderr = sys.__stderr__
    try:
        resource_tracker.ensure_running()
    finally:
        sys.stderr = captured


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --- in the worker process --------------------------------------------------------------

class _Forwarder:
    """A worker's event log: each event goes to the executor, which writes it."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def emit(self, type: str, task: str | None = None, **fields: Any) -> dict[str, Any]:
        event = jsonable(make_event(type, task, **fields))
        self.conn.send(("event", event))
        return event


def serve(conn: Connection, stop: Any, threads: int, engine_loader: EngineLoader) -> None:
    """A worker's life: run jobs until the executor sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _exit_with(os.getppid())
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch takes its thread count from it on import
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)

    events = _Forwarder(conn)
    engines = EnginePool(events, engine_loader)  # type: ignore[arg-type]
    cancel = CancelSignal(event=stop)
    while True:
        try:
            job: Job | None = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        scratch = Store(job.store_root).scratch
        ctx = RunContext(job.task, job.staging, lambda key=job.task.key: scratch(key), job.results,
                         engines, events, cancel, job.spec_sha256)  # type: ignore[arg-type]
        outcome = attempt(job.task, ctx)
        engines.close_all()  # each task loads its own: nothing is held between tasks
        try:
            conn.send(("finished", outcome))
        except Exception:  # a result that cannot be pickled (send pickles before writing)
            conn.send(("finished", Attempt("failed", traceback=traceback.format_exc())))


def _exit_with(parent: int) -> None:
    """End this worker as soon as the build process that started it is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="watch-build", daemon=True).start()

