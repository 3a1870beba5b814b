"""Build progress on the terminal (when the dashboard is not used).

On a terminal: a live table of the plan with each task's state, a progress bar for the
running task and its metrics as they come. Elsewhere (a pipe, CI): one line per
finished task.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from behaviorc.build.context import CancelSignal
from behaviorc.core.state import (LINE_METRICS, STATUS_STYLE, BuildState, TaskState, format_metrics,
                                  headline_first)

class TerminalProgress:
    """An event listener that draws the build; use as a context manager around it."""

    def __init__(self, console: Console, cancel: CancelSignal):
        self.console = console
        self.cancel = cancel
        self.state = BuildState()
        self._lock = threading.Lock()
        self._live: Live | None = None

    def __enter__(self) -> "TerminalProgress":
        if self.console.is_terminal:
            self._live = Live(self, console=self.console, refresh_per_second=8, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.state.apply(event)
        if self._live is None and event["type"] == "task_end":
            self.console.print(self._line(self.state.tasks[event["task"]]), highlight=False, soft_wrap=True)

    def __rich__(self) -> RenderableType:
        with self._lock:
            table = Table.grid(padding=(0, 1))
            table.add_column(width=1)
            table.add_column(no_wrap=True)
            table.add_column(justify="right", width=7)
            table.add_column(no_wrap=True, overflow="ellipsis")
            for task in self.state.tasks.values():
                icon, style = STATUS_STYLE.get(task.status, ("?", ""))
                table.add_row(Text(icon, style), Text(task.id, style), self._time(task), self._detail(task))
            return Group(table, Text(self._footer(), style="dim"))

    def _time(self, task: TaskState) -> str:
        if task.status == "running" and task.started is not None:
            return f"{time.time() - task.started:.1f}s"
        return f"{task.seconds:.1f}s" if task.seconds is not None and task.status != "pending" else ""

    def _detail(self, task: TaskState) -> RenderableType:
        if task.status == "running":
            if task.progress and task.progress[1] > 0:
                done, total, what = task.progress
                return Group(ProgressBar(total=total, completed=done, width=24),
                             Text(f"{done}/{total} {what}", style="dim"))
            return Text(task.note or "", style="dim")
        if task.status == "failed":
            return Text((task.error or "").splitlines()[0] if task.error else "", style="red")
        return Text.assemble(*_warned(task), (format_metrics(headline_first(task.metrics), limit=LINE_METRICS), "dim"))

    def _footer(self) -> str:
        counts = self.state.counts()
        total = len(self.state.tasks)
        finished = counts.get("done", 0) + counts.get("cached", 0)
        parts = [f"{finished}/{total} tasks finished"]
        parts += [f"{counts[s]} {s}" for s in ("cached", "failed", "skipped") if counts.get(s)]
        if self.cancel.is_set() and not self.state.finished:
            parts.append("stopping at the next check (Ctrl-C again to stop now)")
        return " · ".join(parts)

    def _line(self, task: TaskState) -> Text:
        icon, style = STATUS_STYLE.get(task.status, ("?", ""))
        seconds = f"{task.seconds:.2f}s" if task.seconds is not None else ""
        return Text.assemble((f"{icon} {task.status:<9}", style), f" {task.id:<32} {seconds:>8}  ",
                             *_warned(task), (format_metrics(headline_first(task.metrics), limit=LINE_METRICS), "dim"))


def _warned(task: TaskState) -> list[tuple[str, str]]:
    """A finished task's verdict warnings (data["warnings"]), first and in yellow: the
    task did its work, but its figures say not to trust the result."""
    warnings = task.data.get("warnings") or []
    if not warnings:
        return []
    return [(f"⚠ {warnings[0]}" + (f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else "") + "  ",
             "bold yellow")]
