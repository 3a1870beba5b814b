"""What a running task sees: its folders, upstream results, shared engines, the event
log and the build's cancellation.

`RunContext` implements `behaviorc.core.task.TaskContext`:

- `out`: an empty staging folder inside the store; promoted atomically when `execute`
  returns, deleted if it raises.
- `scratch`: a folder stable for the task's key that survives a killed or cancelled
  build (removed once the result is stored). Long tasks keep resumable state there,
  e.g. training checkpoints; a rerun of the same task finds them, a task with other
  inputs (another key) never does.
- `result(task)`: an upstream task's result, artifact paths absolute.
- `engine(path, dtype, device)`: shared engines from `EnginePool`.
- `emit`, `progress`, `check_cancelled`.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from behaviorc.core.task import Cancelled, Task, TaskResult
from behaviorc.core.events import EventLog, TaskEvent

EngineLoader = Callable[[str, str, str], Any]
PROGRESS_INTERVAL = 0.2  # seconds between progress events of one task


class CancelSignal:
    """Set by Ctrl-C, by the dashboard, or by a `cancel` file another process writes
    into the build folder (`behaviorc dash` does this for a build it did not start).
    `event` may be a multiprocessing Event, so worker processes see the same signal."""

    def __init__(self, request_file: Path | None = None, event: Any = None):
        self.request_file = request_file
        self._event = event if event is not None else threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        # A stat per check costs microseconds; tasks check a few times a second.
        if not self._event.is_set() and self.request_file is not None:
            if self.request_file.exists():
                self.cancel("cancel requested from the dashboard")
        return self._event.is_set()

    def check(self) -> None:
        if self.is_set():
            raise Cancelled(self.reason)


def load_embedded_engine(path: str, dtype: str, device: str) -> Any:
    from behaviorc.engine.embedded import EmbeddedEngine
    return EmbeddedEngine.load(path, dtype=dtype, device=device)


class EnginePool:
    """Engines shared by the tasks of a build, one per (model folder, dtype, device).

    The executor calls `keep_only` after each task with the model folders that the
    remaining tasks still need; every other engine is closed and its memory returned.
    """

    def __init__(self, events: EventLog, loader: EngineLoader = load_embedded_engine):
        self.events = events
        self.loader = loader
        self._engines: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, model_path: str, dtype: str, device: str, task_id: str) -> Any:
        key = (_normal(model_path), dtype, device)
        with self._lock:
            if key not in self._engines:
                started = time.perf_counter()
                self._engines[key] = self.loader(key[0], dtype, device)
                self.events.emit("engine_loaded", task_id, path=key[0], dtype=dtype, device=device,
                                 seconds=round(time.perf_counter() - started, 3))
            return self._engines[key]

    def loaded(self) -> list[str]:
        return sorted({path for path, _, _ in self._engines})

    def keep_only(self, needed_paths: set[str]) -> None:
        needed = {_normal(p) for p in needed_paths}
        with self._lock:
            doomed = [key for key in self._engines if key[0] not in needed]
            for key in doomed:
                self._free(key)
        if doomed:
            _return_memory()

    def close_all(self) -> None:
        self.keep_only(set())

    def _free(self, key: tuple[str, str, str]) -> None:
        engine = self._engines.pop(key)
        close = getattr(engine, "close", None)
        if callable(close):
            close()
        self.events.emit("engine_freed", None, path=key[0], dtype=key[1], device=key[2])


def _normal(path: str) -> str:
    return str(Path(path).resolve())


def _return_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # only when something already imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class RunContext:
    def __init__(self, task: Task, out: Path, scratch_dir: Callable[[], Path],
                 results: dict[str, TaskResult], engines: EnginePool, events: EventLog,
                 cancel: CancelSignal, spec_sha256: str = ""):
        self.task = task
        self.out = out
        self.spec_sha256 = spec_sha256
        self._scratch_dir = scratch_dir
        self._results = results
        self._engines = engines
        self._events = events
        self._cancel = cancel
        self._last_progress = 0.0
        self.emitted: list[dict[str, Any]] = []  # stored with the result, replayed when reused

    @property
    def scratch(self) -> Path:
        return self._scratch_dir()

    def result(self, task: Task) -> TaskResult:
        if task.key not in self._results:
            raise KeyError(f"{self.task.id} asked for the result of {task.id}, "
                           "which is not one of its finished upstream tasks")
        return self._results[task.key]

    def engine(self, model_path: str, dtype: str = "float32", device: str = "auto") -> Any:
        return self._engines.get(str(model_path), dtype, device, self.task.id)

    def emit(self, event: TaskEvent) -> None:
        event = self._events.emit(event.type, self.task.id, **event.fields())
        self.emitted.append({k: v for k, v in event.items() if k not in ("t", "task")})

    def progress(self, done: int, total: int, what: str = "") -> None:
        self.check_cancelled()
        now = time.monotonic()
        if done >= total or now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            self._events.emit("progress", self.task.id, done=done, total=total, what=what)

    def check_cancelled(self) -> None:
        self._cancel.check()
