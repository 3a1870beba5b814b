"""Build progress on the terminal (when the dashboard is not used).

On a terminal: a live table of the plan with each task's state, a progress bar for the
running task (its sub-phase, count and ETA) and its metrics as they come. Elsewhere (a
file, a pipe, CI), lines that begin with the time: one when a task starts, one when a
running task enters a new sub-phase ("sampling 10 prompts x 4", "reading hidden
states"), one per running task at least every `LOG_INTERVAL_S` seconds (its count and
ETA, or how long it has been silent), and one per finished task.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from behaviorc.pipeline.context import CancelSignal
from behaviorc.tui.state import BuildState, TaskState
from behaviorc.tui.styles import (LINE_METRICS, STATUS_STYLE, format_metrics, format_seconds, headline_first,
                                  progress_text)

# A log line per running task at least this often (seconds): a reader of a log, or CI
# killing a job that prints nothing for 10 minutes, sees the build is alive.
LOG_INTERVAL_S = 20.0
LOG_INTERVAL_ENV = "BEHAVIORC_LOG_PROGRESS_S"
PHASE_LINE_GAP_S = 1.0


def log_interval() -> float:
    """LOG_INTERVAL_S, or the environment's BEHAVIORC_LOG_PROGRESS_S (a positive number)."""
    try:
        value = float(os.environ.get(LOG_INTERVAL_ENV, LOG_INTERVAL_S))
    except ValueError:
        return LOG_INTERVAL_S
    return value if value > 0 else LOG_INTERVAL_S


class TerminalProgress:
    """An event listener that draws the build; use as a context manager around it."""

    def __init__(self, console: Console, cancel: CancelSignal, interval: float | None = None):
        self.console = console
        self.cancel = cancel
        self.interval = interval if interval is not None else log_interval()
        self.state = BuildState()
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._heartbeat: threading.Thread | None = None
        self._stopped = threading.Event()
        self._last_line: dict[str, tuple[float, str]] = {}  # task id: (when, phase) of its last log line

    def __enter__(self) -> "TerminalProgress":
        if self.console.is_terminal:
            self._live = Live(self, console=self.console, refresh_per_second=8, transient=False)
            self._live.start()
        else:
            self._heartbeat = threading.Thread(target=self._beat, name="behaviorc-progress", daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.state.apply(event)
            if self._live is not None or event.get("task") not in self.state.tasks:
                return
            task = self.state.tasks[event["task"]]
            if event["type"] == "task_end":
                self._last_line.pop(task.id, None)
                self._print(self._line(task))
            elif event["type"] == "task_start":
                self._log_running(task, time.time())
            elif task.status == "running" and task.phase is not None:
                last, phase = self._last_line.get(task.id, (0.0, ""))
                # a new phase gets its line, unless phases flicker by (a composition's
                # tensor names): the heartbeat shows where it got to
                if phase != task.phase.name and time.time() - last >= PHASE_LINE_GAP_S:
                    self._log_running(task, time.time())

    def _beat(self) -> None:
        """Log mode: a line for each running task that has printed none for `interval`."""
        tick = min(self.interval / 4, 1.0)
        while not self._stopped.wait(tick):
            now = time.time()
            with self._lock:
                for task in self.state.running:
                    if now - self._last_line.get(task.id, (0.0, ""))[0] >= self.interval:
                        self._log_running(task, now)

    def _log_running(self, task: TaskState, now: float) -> None:
        """One log line for a running task (the lock held)."""
        self._last_line[task.id] = (now, task.phase.name if task.phase is not None else "")
        elapsed = format_seconds(now - task.started) if task.started is not None else ""
        detail = progress_text(task, now) or "starting"
        icon, style = STATUS_STYLE["running"]
        self._print(Text.assemble(_clock(now), (f"{icon} {'running':<9}", style),
                                  f" {task.id:<32} {elapsed:>8}  ", (detail, "dim")))

    def _print(self, line: Text) -> None:
        self.console.print(line, highlight=False, soft_wrap=True)

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
                done, total, _ = task.progress
                return Group(ProgressBar(total=total, completed=done, width=24),
                             Text(progress_text(task, time.time()), style="dim"))
            return Text(progress_text(task, time.time()), style="dim")
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
        return Text.assemble(_clock(time.time()), (f"{icon} {task.status:<9}", style),
                             f" {task.id:<32} {seconds:>8}  ",
                             *_warned(task), (format_metrics(headline_first(task.metrics), limit=LINE_METRICS), "dim"))


def _clock(now: float) -> tuple[str, str]:
    return time.strftime("%H:%M:%S ", time.localtime(now)), "dim"


def _warned(task: TaskState) -> list[tuple[str, str]]:
    """A finished task's verdict warnings (data["warnings"]), first and in yellow: the
    task did its work, but its figures say not to trust the result."""
    warnings = task.data.get("warnings") or []
    if not warnings:
        return []
    return [(f"⚠ {warnings[0]}" + (f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else "") + "  ",
             "bold yellow")]
