"""The build dashboard: `behaviorc build --tui` and `behaviorc dash DIR`.

A worker thread follows `DIR/events.jsonl` and posts `EventsRead` batches; the app folds
them into a `BuildState` on its own thread and redraws at most `REDRAW_HZ` times a
second, so a fast stream of events costs one redraw per frame, not one per event.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, RichLog, Static, TabbedContent, TabPane, Tree
from textual.worker import get_current_worker

from behaviorc.core.events import EVENTS_FILE, process_alive
from behaviorc.tui.state import BuildState
from behaviorc.tui.styles import progress_text, summarize
from behaviorc.tui.tail import EventsRead, EventTail
from behaviorc.tui.widgets import (PlanTree, StatePanel, TaskDetail, draw_compose_deploy, draw_errors,
                                   draw_replies, draw_steering, draw_task_detail, draw_training)

REDRAW_HZ = 10
POLL_SECONDS = 0.05  # how long the tail worker sleeps when the log has nothing new
LIVENESS_SECONDS = 1.0  # how often to ask whether an unfinished build still runs
PANELS = ("train", "steer", "deploy", "errors", "replies")


class Dashboard(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "behaviorc"
    BINDINGS = [
        Binding("q", "quit_dashboard", "quit"),
        Binding("c", "cancel_build", "cancel build"),
        Binding("tab", "next_panel", "next panel", priority=True),
        Binding("1", "panel(0)", "train", show=False),
        Binding("2", "panel(1)", "steer", show=False),
        Binding("3", "panel(2)", "deploy", show=False),
        Binding("4", "panel(3)", "errors", show=False),
        Binding("5", "panel(4)", "replies", show=False),
    ]

    def __init__(self, build_dir: Path, cancel: Callable[[], None] | None = None,
                 build_thread: threading.Thread | None = None, now: Callable[[], float] = time.time):
        super().__init__()
        self.build_dir = Path(build_dir)
        self.cancel = cancel
        self.build_thread = build_thread
        self.now = now
        self.state = BuildState()
        self.cancel_requested = False
        self._dirty = True
        self._new_log_lines: list[str] = []
        self._alive = (0.0, True)  # (when asked, the answer)

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with Horizontal():
            yield PlanTree(id="plan")
            with TabbedContent(id="panels", initial="train"):
                with TabPane("1 Train", id="train"):
                    yield StatePanel(draw_training, id="train-view")
                with TabPane("2 Steer", id="steer"):
                    yield StatePanel(draw_steering, id="steer-view")
                with TabPane("3 Deploy", id="deploy"):
                    yield StatePanel(draw_compose_deploy, id="deploy-view")
                with TabPane("4 Errors", id="errors"):
                    with Vertical():
                        yield StatePanel(draw_errors, id="errors-view")
                        yield RichLog(id="log", max_lines=500, wrap=False, markup=False)
                with TabPane("5 Replies", id="replies"):
                    yield StatePanel(draw_replies, id="replies-view")
        yield Footer()

    def on_mount(self) -> None:
        # Held, not queried at each redraw: a query searches the screen on top, which is
        # a task's detail while one is open.
        self._status_bar = self.query_one("#status", Static)
        self._plan_tree = self.query_one(PlanTree)
        self._panels = list(self.query(StatePanel))
        self._log_view = self.query_one("#log", RichLog)
        self._tabs = self.query_one(TabbedContent)
        self._plan_tree.focus()
        self.set_interval(1 / REDRAW_HZ, self.redraw)
        self.follow_events()

    # --- events -----------------------------------------------------------------------

    @work(thread=True, exclusive=True)
    def follow_events(self) -> None:
        tail = EventTail(self.build_dir / EVENTS_FILE)
        worker = get_current_worker()
        try:
            while not worker.is_cancelled:
                events, restarted = tail.read()
                if events or restarted:
                    self.post_message(EventsRead(events, restarted))
                else:
                    time.sleep(POLL_SECONDS)
        finally:
            tail.close()

    def on_events_read(self, message: EventsRead) -> None:
        if message.restarted:
            self.state = BuildState()
            self.cancel_requested = False
        for event in message.events:
            self.state.apply(event)
            if event.get("type") != "progress":
                self._new_log_lines.append(f"{event.get('task') or 'build'}  {event.get('type')}  {summarize(event)}")
        self._dirty = True

    def redraw(self) -> None:
        if (not self._dirty and not self.state.running) or not self._status_bar.is_attached:
            return  # nothing new, or the app is closing
        self._dirty = False
        now = self.now()
        self._status_bar.update(Text(self.status_line()))  # task ids like `x[n=5]` are not markup
        self._plan_tree.refresh_labels(self.state, now)
        for panel in self._panels:
            panel.show(self.state)
        for line in self._new_log_lines[-500:]:
            self._log_view.write(line)
        self._new_log_lines.clear()

    def status_line(self) -> str:
        state = self.state
        if state.started is None:
            if self.build_thread is not None and not self.build_thread.is_alive():
                return "the build stopped before it began: press q to see why"
            return f"waiting for a build in {self.build_dir}"
        counts = state.counts()
        finished = counts.get("done", 0) + counts.get("cached", 0)
        spec = Path(state.spec).name or str(self.build_dir)
        if state.finished:
            verdict = "stopped" if state.cancelled else ("ok" if state.ok else "FAILED")
        elif not self.build_alive():
            verdict = "stopped without finishing (the build process is gone)"
        else:
            verdict = "stopping…" if self.cancel_requested else "running"
        extra = "".join(f" · {counts[s]} {s}" for s in ("cached", "failed", "skipped") if counts.get(s))
        line = f"{spec} · {verdict} · {finished}/{len(state.tasks)} tasks{extra}"
        if not state.finished:  # what each running task is doing: its sub-phase, count, ETA
            now = self.now()
            line += "".join(f" | {task.id}: {progress_text(task, now) or 'starting'}" for task in state.running)
        return line

    def build_alive(self) -> bool:
        """Whether the build writing this log still runs (a killed one never says so)."""
        asked, alive = self._alive
        if time.monotonic() - asked >= LIVENESS_SECONDS:
            if self.build_thread is not None:
                alive = self.build_thread.is_alive()
            else:
                alive = process_alive(self.state.pid)
            self._alive = (time.monotonic(), alive)
        return alive

    # --- keys -------------------------------------------------------------------------

    def action_panel(self, index: int) -> None:
        self._tabs.active = PANELS[index]

    def action_next_panel(self) -> None:
        self._tabs.active = PANELS[(PANELS.index(self._tabs.active) + 1) % len(PANELS)]

    def action_cancel_build(self) -> None:
        if (self.cancel is None or self.state.finished or self.state.started is None
                or not self.build_alive()):
            self.notify("no build is running", severity="warning")
            return
        self.cancel()
        self.cancel_requested = True
        self._dirty = True
        self.notify("asked the build to stop; finished tasks are kept")

    def action_quit_dashboard(self) -> None:
        if self.build_thread is not None and self.build_thread.is_alive() and self.cancel is not None:
            self.cancel()  # the build runs inside this process: it cannot outlive the app
        self.exit()

    def on_tree_node_selected(self, message: Tree.NodeSelected) -> None:
        task_id = message.node.data
        if task_id in self.state.tasks:
            self.push_screen(TaskDetail(draw_task_detail(self.state, task_id, self.now())))
