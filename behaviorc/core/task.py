"""Plan tasks: frozen, hashable units of work with a content key.

A task's fields are its whole input: the slice of the checked spec it reads (data
already loaded, so file contents are in it) and its upstream tasks. Its `key` hashes the
kind, the method version and all of that, with upstream tasks contributing their own
keys, so a rebuild reruns exactly the tasks whose inputs changed.

Tasks never schedule anything; the executor (`behaviorc.pipeline`) orders them by
`arguments()`, gives each a `TaskContext`, stores what `execute` returns and reports.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol

from pydantic import BaseModel, ConfigDict, Field

from behaviorc.core.diagnostics import Location
from behaviorc.core.events import TaskEvent


class TaskResult(BaseModel):
    """What a task leaves behind. `artifacts` are file or folder names inside the task's
    output directory when stored; `TaskContext.result` hands them back as absolute paths."""

    metrics: dict[str, float] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)

    def path(self, name: str) -> Path:
        return Path(self.artifacts[name])


class TaskContext(Protocol):
    """What the executor gives a running task."""

    out: Path  # an empty folder for this task's artifacts, promoted atomically on success
    spec_sha256: str  # of the spec being built, for artifact metadata (not part of any key)
    # A folder stable for the task's key that survives a killed build (removed once the
    # result is stored): resumable state such as training checkpoints.
    scratch: Path

    def result(self, task: "Task") -> TaskResult:
        """An upstream task's result, artifact paths absolute."""

    def engine(self, model_path: str, dtype: str = "float32", device: str = "auto") -> Any:
        """A shared EmbeddedEngine for a model folder; the executor frees it when no
        remaining task needs that model."""

    def emit(self, event: TaskEvent) -> None:
        """Append an event (with this task's id) to events.jsonl, e.g. a training step."""

    def progress(self, done: int, total: int, what: str = "") -> None:
        """Report progress of long work; also checks for cancellation."""

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if the user stopped the build."""


class Cancelled(Exception):
    """The user stopped the build; the executor keeps what finished."""


class Task(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    kind: ClassVar[str]
    # Bump when a method's implementation changes what it produces: cached results of
    # the old version are then not reused.
    version: ClassVar[int] = 1
    # Fields added to a kind after its keys were in use: while one holds its default it
    # is left out of the key, so the tasks built before it keep their keys and results.
    keyless_defaults: ClassVar[tuple[str, ...]] = ()
    # Whether the executor may run this task in a worker process beside others (`--jobs`).
    # True only for self-contained work: it reads its inputs and upstream results and
    # writes ctx.out, loading any engine it needs for itself. A task that holds a live
    # server or state shared with other tasks leaves it False and runs in the build's
    # own process, alone. A kind may make it a property when it depends on the fields.
    parallel_safe: ClassVar[bool] = False
    # The metrics a result may carry (a tuple from behaviorc.core.metrics); the executor
    # refuses a result with any other, so the checker's `expect` always knows them.
    reports: ClassVar[tuple[str, ...]] = ()
    # What a result offers downstream tasks, by role ("model", "steering"): the artifact
    # name holding it. A consumer asks its upstream task, whatever that task's kind.
    provides: ClassVar[dict[str, str]] = {}

    name: str  # the behavior, composition or model this task is about
    loc: Location | None = Field(default=None, exclude=True)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    def arguments(self) -> dict[str, "Task"]:
        """Upstream tasks, by field name (tuples of tasks are numbered `field.i`)."""
        found: dict[str, Task] = {}
        for field_name in type(self).model_fields:
            value = getattr(self, field_name)
            if isinstance(value, Task):
                found[field_name] = value
            elif isinstance(value, tuple):
                for i, item in enumerate(value):
                    if isinstance(item, Task):
                        found[f"{field_name}.{i}"] = item
        return found

    @cached_property
    def key(self) -> str:
        own = {
            name: _plain(getattr(self, name))
            for name in type(self).model_fields
            if name != "loc" and not _holds_tasks(getattr(self, name))
            and not (name in self.keyless_defaults
                     and getattr(self, name) == type(self).model_fields[name].default)
        }
        payload = {
            "kind": self.kind,
            "version": self.version,
            "fields": own,
            "upstream": {name: task.key for name, task in self.arguments().items()},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def artifact(self, role: str) -> str:
        """The name of the artifact that holds what this task provides as `role`."""
        return self.provides[role]

    def models(self) -> tuple["Task", ...]:
        """The model tasks whose folders this task loads: by convention its `model` field.
        The executor frees a model's engine once no remaining task needs it."""
        model = getattr(self, "model", None)
        return (model,) if isinstance(model, Task) else ()

    def execute(self, ctx: TaskContext) -> TaskResult:
        raise NotImplementedError(f"{type(self).__name__}.execute")

    def walk(self) -> Iterator["Task"]:
        """This task and everything upstream of it, each once, dependencies first."""
        seen: set[str] = set()

        def visit(task: Task) -> Iterator[Task]:
            if task.key in seen:
                return
            seen.add(task.key)
            for upstream in task.arguments().values():
                yield from visit(upstream)
            yield task

        yield from visit(self)


def _holds_tasks(value: Any) -> bool:
    return isinstance(value, Task) or (isinstance(value, tuple) and any(isinstance(v, Task) for v in value))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
