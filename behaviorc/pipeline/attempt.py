"""Running one task's `execute` and saying what came of it, before anything is stored.

The same in the build's process and in a worker process (`behaviorc.pipeline.parallel`): an
`Attempt` is plain data, so a worker sends it back to the executor, which stores the
result or records the failure exactly as for a task it ran itself.
"""

from __future__ import annotations

import errno
import traceback
from dataclasses import dataclass, field
from typing import Any

from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.core.task import Cancelled, Task, TaskResult
from behaviorc.pipeline.context import RunContext


MACHINE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # a full disk, quota, read-only


@dataclass
class Attempt:
    status: str  # done | cancelled | failed
    result: TaskResult | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # what the task emitted, stored with it
    reason: str = ""  # why it was cancelled
    error: str | None = None  # the rendered diagnostics of a BehaviorError
    loc: Location | None = None
    traceback: str | None = None  # a bug in the task (or in storing what it made)


def attempt(task: Task, ctx: RunContext) -> Attempt:
    try:
        result = task.execute(ctx)
        if not isinstance(result, TaskResult):
            raise TypeError(f"{type(task).__name__}.execute returned "
                            f"{type(result).__name__}, not a TaskResult")
        undeclared = sorted(set(result.metrics) - set(task.reports))
        if undeclared:  # the checker's `expect` and the report's readers would not know them
            raise TypeError(f"{type(task).__name__} reported metrics it does not declare in "
                            f"`reports`: {', '.join(undeclared)}")
        return Attempt("done", result=result, events=ctx.emitted)
    except (Cancelled, KeyboardInterrupt) as err:
        return Attempt("cancelled", reason=str(err) or "interrupted")
    except BehaviorError as err:
        error, loc = render_failure(task, err)
        return Attempt("failed", error=error, loc=loc)
    except OSError as err:
        if err.errno not in MACHINE_ERRORS:
            return Attempt("failed", traceback=traceback.format_exc())
        # the machine, not behaviorc: say so where it is read, not only in the log
        where = f" ({err.filename})" if err.filename else ""
        error, loc = render_failure(task, BehaviorError(
            f"{err.strerror or err}{where}", hint="free some space (or quota), or build "
            "into a folder on another disk with --out, then build again: finished tasks are kept"))
        return Attempt("failed", error=error, loc=loc)
    except Exception:  # a bug in a task: keep the traceback, report it plainly
        return Attempt("failed", traceback=traceback.format_exc())


def render_failure(task: Task, err: BehaviorError) -> tuple[str, Location | None]:
    """The error's diagnostics, pointed at the task's place in the spec when the error
    itself does not say where."""
    err = err.with_parent_location(task.loc)
    loc = next((d.loc for d in err.diagnostics if d.loc is not None), None)
    return err.render(), loc
