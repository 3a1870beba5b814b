"""The dashboard driven with the pilot against recorded event logs (tests/data/, made by
tests/data/make_event_logs.py with the real executor)."""

from __future__ import annotations

import json
import os
import shutil
import re
import time
from pathlib import Path
from typing import ClassVar

import pytest
from rich.console import Console
from textual.widgets import TabbedContent

from behaviorc.core.events import EVENTS_FILE, TrainStep
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.pipeline.commands import BuildThread
from behaviorc.pipeline.context import CancelSignal
from behaviorc.pipeline.executor import Executor
from behaviorc.tui.state import BuildState
from behaviorc.tui.app import Dashboard
from behaviorc.tui.tail import EventTail
from behaviorc.tui.widgets import PlanTree, StatePanel, TaskDetail, render_curve

pytestmark = pytest.mark.anyio  # the async tests run through anyio's pytest plugin


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio

DATA = Path(__file__).parent / "data"
NOW = 1_764_000_004.0  # a fixed clock, inside the recorded builds


def build_dir(tmp_path: Path, log: str) -> Path:
    folder = tmp_path / "build"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / log, folder / "events.jsonl")
    return folder


def as_running(lines: list[str]) -> list[str]:
    """Log lines as a running build writes them: its pid in build_start (here, ours)."""
    def live(line: str) -> str:
        event = json.loads(line)
        return json.dumps({**event, "pid": os.getpid()}) + "\n"
    return [live(line) if '"build_start"' in line else line for line in lines]


def mark_running(folder: Path) -> None:
    log = folder / EVENTS_FILE
    log.write_text("".join(as_running(log.read_text().splitlines(keepends=True))))


def text_of(renderable) -> str:
    console = Console(width=100, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


async def settle(app: Dashboard, pilot, until) -> None:
    """Let the tail worker deliver events and the app redraw, until `until()` holds."""
    for _ in range(200):
        await pilot.pause(0.02)
        if until():
            break
    await pilot.pause(0.15)  # one more redraw tick after the last batch


def panel_text(app: Dashboard, panel_id: str) -> str:
    return text_of(app.query_one(f"#{panel_id}", StatePanel).draw(app.state))


def tree_labels(app: Dashboard) -> dict[str, str]:
    return app.query_one(PlanTree).labels()


async def test_replaying_a_finished_build_shows_every_task_and_panel(tmp_path):
    app = Dashboard(build_dir(tmp_path, "events_ok.jsonl"), now=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot, lambda: app.state.finished)
        assert app.state.ok and len(app.state.tasks) == 9
        labels = tree_labels(app)
        assert labels["train:listen"].startswith("✓ train ")
        assert all(label.startswith("✓") for label in labels.values())
        assert "ok · 9/9 tasks" in app.status_line()

        training = panel_text(app, "train-view")
        assert "train:listen  [done]" in training and "step 60: 0.4245" in training
        assert "margin" in training and "+0.600" in training

        steering = panel_text(app, "steer-view")
        assert "-0.400" in steering and "0.485" in steering  # margins before / steered
        assert [p["strength"] for p in app.state.sweeps["steer.verify:listen"]] == [0, 2, 4, 6, 8]

        deploy = panel_text(app, "deploy-view")
        assert "composition persona" in deploy and "+0.5" in deploy and "ties" in deploy
        assert "http://127.0.0.1:8000" in deploy and "pushes (3)" in deploy

        assert "no errors" in panel_text(app, "errors-view")


async def test_keys_switch_panels_and_enter_opens_a_task(tmp_path):
    app = Dashboard(build_dir(tmp_path, "events_ok.jsonl"), now=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot, lambda: app.state.finished)
        panels = app.query_one(TabbedContent)
        assert panels.active == "train"
        await pilot.press("3")
        assert panels.active == "deploy"
        await pilot.press("tab")
        assert panels.active == "errors"
        await pilot.press("tab")
        assert panels.active == "replies"
        await pilot.press("tab")
        assert panels.active == "train"
        await pilot.press("2")
        assert panels.active == "steer"

        tree = app.query_one(PlanTree)
        assert app.focused is tree
        tree.cursor_line = tree.node_for("train:listen").line
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert isinstance(app.screen, TaskDetail)
        detail = text_of(app.screen.body)
        assert "train:listen" in detail and "loss_last" in detail and "demo.behavior:10:3" in detail
        await pilot.press("escape")
        await pilot.pause(0.05)
        assert not isinstance(app.screen, TaskDetail)


async def test_a_failed_build_shows_the_error_with_its_spec_location(tmp_path):
    app = Dashboard(build_dir(tmp_path, "events_failed.jsonl"), now=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot, lambda: app.state.finished)
        assert "FAILED" in app.status_line() and "1 failed · 3 skipped" in app.status_line()
        labels = tree_labels(app)
        assert labels["train:concise"].startswith("✗") and labels["compose:persona"].startswith("-")
        errors = panel_text(app, "errors-view")
        assert "✗ train:concise" in errors
        assert "tests/data/demo.behavior:17:3: error: loss is NaN" in errors
        assert "17 |   train {" in errors and "hint: try lr 3e-5" in errors


async def test_cancel_from_the_dashboard_writes_the_request_only_for_a_live_build(tmp_path):
    requests: list[str] = []
    folder = build_dir(tmp_path, "events_live.jsonl")
    mark_running(folder)
    live = Dashboard(folder, cancel=lambda: requests.append("cancel"), now=lambda: NOW)
    async with live.run_test(size=(80, 24)) as pilot:
        await settle(live, pilot, lambda: live.state.losses.get("train:listen"))
        assert live.state.tasks["train:listen"].status == "running"
        await pilot.press("c")
        assert requests == ["cancel"] and "stopping…" in live.status_line()

    finished = Dashboard(build_dir(tmp_path / "other", "events_ok.jsonl"),
                         cancel=lambda: requests.append("late"), now=lambda: NOW)
    async with finished.run_test(size=(80, 24)) as pilot:
        await settle(finished, pilot, lambda: finished.state.finished)
        await pilot.press("c")
        assert requests == ["cancel"]  # nothing to cancel after the build ended


async def test_a_build_killed_before_it_finished_is_shown_as_gone(tmp_path):
    requests: list[str] = []
    folder = build_dir(tmp_path, "events_live.jsonl")
    (folder / ".store").mkdir()
    (folder / ".store" / "lock").write_text("")  # released by the kernel, nothing written since
    app = Dashboard(folder, cancel=lambda: requests.append("cancel"), now=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot, lambda: app.state.losses.get("train:listen"))
        assert "stopped without finishing" in app.status_line()
        await pilot.press("c")
        assert requests == []


async def test_following_a_live_log_and_a_new_build_replacing_it(tmp_path):
    folder = tmp_path / "build"
    folder.mkdir()
    lines = as_running((DATA / "events_ok.jsonl").read_text().splitlines(keepends=True))
    log = folder / "events.jsonl"
    log.write_text("".join(lines[:40]) + lines[40][:25])  # the last line half-written
    app = Dashboard(folder, now=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot, lambda: app.state.events_seen >= 40)
        assert app.state.events_seen == 40 and not app.state.finished
        with open(log, "a") as handle:
            handle.write(lines[40][25:] + "".join(lines[41:]))
        await settle(app, pilot, lambda: app.state.finished)
        assert app.state.events_seen == len(lines) and app.state.ok

        log.unlink()  # what a new build does before writing its first event
        log.write_text("".join(lines[:3]))
        await settle(app, pilot, lambda: not app.state.finished)
        assert app.state.events_seen == 3 and not app.state.finished
        assert "running" in app.status_line()


def test_the_tail_skips_lines_cut_by_a_kill(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text('{"t": 1, "type": "a", "task": null}\n{"t": 2, "type": "b", "ta')
    tail = EventTail(log)
    events, restarted = tail.read()
    assert [e["type"] for e in events] == ["a"] and not restarted
    with open(log, "a") as handle:
        handle.write('sk": null}\nnot json\n')
    events, _ = tail.read()
    assert [e["type"] for e in events] == ["b"]
    tail.close()


def test_state_from_events_and_the_curve():
    state = BuildState()
    state.apply({"t": 1, "type": "build_start", "task": None, "tasks": [{"id": "train:x", "kind": "train"}]})
    state.apply({"t": 2, "type": "train.step", "task": "train:x", "step": 1, "loss": 2.0, "margin": 0.1})
    state.apply({"t": 3, "type": "something_new", "task": "train:x", "value": 1})
    assert state.losses["train:x"] == [(1, 2.0)] and state.train_margins["train:x"] == [(1, 0.1)]
    assert state.recent[-1]["type"] == "something_new"
    assert render_curve([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert len(render_curve(list(range(1000)), width=40)) == 40
    assert render_curve([]) == ""


@pytest.mark.parametrize("log", ["events_ok.jsonl", "events_failed.jsonl", "events_live.jsonl"])
def test_fixture_logs_fold_into_a_consistent_state(log):
    from behaviorc.core.events import read_events
    state = BuildState()
    for event in read_events(DATA / log):
        state.apply(event)
    assert set(state.tasks) >= {"train:listen", "deploy:persona"}
    assert state.finished == (log != "events_live.jsonl")


async def test_a_live_build_redraws_while_a_task_detail_is_open(tmp_path):
    """A live build keeps redrawing under an open detail screen; nothing is looked up on
    the screen on top."""
    app = Dashboard(build_dir(tmp_path, "events_live.jsonl"), now=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot, lambda: app.state.losses.get("train:listen"))
        tree = app.query_one(PlanTree)
        tree.cursor_line = tree.node_for("train:listen").line
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert isinstance(app.screen, TaskDetail)
        with open(app.build_dir / "events.jsonl", "a") as handle:
            handle.write('{"t": 1764000003.0, "type": "train.step", "task": "train:listen", '
                         '"step": 31, "steps": 60, "loss": 0.85}\n')
        await settle(app, pilot, lambda: app.state.losses["train:listen"][-1][0] == 31)
        assert isinstance(app.screen, TaskDetail)
        await pilot.press("escape", "2")
        await pilot.pause(0.1)
        assert app.query_one(TabbedContent).active == "steer"
        assert "step 31: 0.8500" in panel_text(app, "train-view")


def test_unmet_expectations_are_listed_with_their_location():
    from behaviorc.tui.widgets import draw_errors
    state = BuildState()
    state.apply({"t": 1, "type": "expectation_unmet", "task": "train:x", "metric": "margin_after",
                 "op": ">", "value": 0.5, "actual": 0.1, "met": False,
                 "loc": {"file": "a.behavior", "line": 9, "column": 5, "end_line": 9, "end_column": 9}})
    assert "a.behavior:9:5: expect margin_after > 0.5: measured 0.1 by train:x" in text_of(draw_errors(state))


def test_the_event_names_the_task_implementations_use_are_drawn():
    state = BuildState()
    state.apply({"t": 1, "type": "build_start", "task": None,
                 "tasks": [{"id": "steer.verify:b", "kind": "steer.verify"}, {"id": "compose:p", "kind": "compose"},
                           {"id": "deploy:p", "kind": "deploy"}]})
    state.apply({"t": 2, "type": "steer.point", "task": "steer.verify:b", "strength": 4.0, "margin": 0.3,
                 "general_nll": 3.0})
    state.apply({"t": 3, "type": "task_end", "task": "compose:p", "status": "done", "metrics": {},
                 "data": {"provenance": {"terms": [{"behavior": "b", "weight": -0.8}], "merge": "ties"}}})
    state.apply({"t": 4, "type": "deploy.push", "task": "deploy:p", "urls": ["http://a:1", "http://b:2"],
                 "push_ms": 33.0, "requests_failed": 0})
    assert state.sweeps["steer.verify:b"] == [{"strength": 4.0, "margin": 0.3, "general_nll": 3.0}]
    assert state.weights["compose:p"]["terms"] == [{"behavior": "b", "weight": -0.8}]
    assert [(p["url"], p["ms"]) for p in state.pushes] == [("http://a:1", 33.0), ("http://b:2", 33.0)]


def test_the_steer_panel_shows_the_verdict_the_costs_and_the_sample_replies():
    from behaviorc.tui.widgets import draw_steering

    state = BuildState()
    state.apply({"t": 1, "type": "build_start", "task": None,
                 "tasks": [{"id": "steer.verify:b", "kind": "steer.verify"}]})
    for strength, reply in ((0.0, "It was fine."), (4.0, "It was wonderful, wonderful!")):
        state.apply({"t": 2, "type": "steer.point", "task": "steer.verify:b", "strength": strength,
                     "margin": strength / 10, "general_nll": 3.0, "capability": 0.5,
                     "repetition": 0.0, "samples": [reply]})
    state.apply({"t": 3, "type": "task_end", "task": "steer.verify:b", "status": "done",
                 "metrics": {"margin_before": 0.0, "margin_steered": 0.4, "steer_effect": 0.4,
                             "control_effect": 0.5, "anti_steerable_share": 0.25},
                 "data": {"sample_prompts": ["How was your day?"],
                          "warnings": ["the steering effect does not beat a random direction"]}})
    text = text_of(draw_steering(state))
    assert "⚠ b: the steering effect does not beat a random direction" in text
    assert "control" in text and "0.5" in text and "capability" in text
    assert "How was your day?" in text
    assert "It was fine." in text and "It was wonderful, wonderful!" in text


class Quick(Task):
    kind: ClassVar[str] = "test.quick"
    reports: ClassVar[tuple[str, ...]] = ('answer',)

    def execute(self, ctx: TaskContext) -> TaskResult:
        return TaskResult(metrics={"answer": 42.0})


class Slow(Task):
    """Long work that reports progress, as training does."""

    kind: ClassVar[str] = "test.slow"
    before: Quick
    steps: int = 400

    def execute(self, ctx: TaskContext) -> TaskResult:
        for step in range(self.steps):
            ctx.emit(TrainStep(step=step + 1, steps=self.steps, loss=1.0 / (step + 1)))
            ctx.progress(step + 1, self.steps, "steps")
            time.sleep(0.02)
        return TaskResult()


async def test_build_tui_runs_the_build_beside_the_app_and_c_cancels_it(tmp_path):
    """What `behaviorc build --tui` does: a real build in a thread, the app following it."""
    out = tmp_path / "out"
    signal = CancelSignal(out / "cancel")
    thread = BuildThread(Executor(out, cancel=signal), [Slow(name="s", before=Quick(name="q"))])
    app = Dashboard(out, cancel=signal.cancel, build_thread=thread)
    async with app.run_test(size=(80, 24)) as pilot:
        thread.start()
        await settle(app, pilot, lambda: len(app.state.losses.get("test.slow:s", [])) >= 3)
        assert "running" in app.status_line()
        # the running task's sub-phase and count, on every tab
        assert re.search(r"test\.slow:s: .* · \d+/400 \(\d+%\)", app.status_line())
        assert app.query_one(PlanTree).labels()["test.quick:q"].startswith("✓")
        await pilot.press("c")
        await settle(app, pilot, lambda: app.state.finished)
        assert app.state.cancelled and "stopped" in app.status_line()
        assert app.state.tasks["test.slow:s"].status == "cancelled"
    outcome = thread.result()
    assert outcome.exit_code == 130
    assert outcome.record("test.quick:q").status == "done"


async def test_the_train_tab_ends_with_the_margins_the_distilled_samples_and_the_replies(tmp_path):
    """What a distillation ends with is on the Train tab before quitting: the margins and
    steered_share, a few distilled samples, the greedy replies, and the loss as a plot."""
    events = [{"t": 1.0, "type": "build_start", "task": None, "spec": "d.behavior", "out": str(tmp_path),
               "tasks": [{"id": "train:happy", "kind": "train"}]},
              {"t": 1.0, "type": "task_start", "task": "train:happy", "kind": "train"},
              {"t": 1.5, "type": "progress", "task": "train:happy", "done": 0, "total": 4,
               "what": "sampling 10 prompts x 4"}]
    events += [{"t": 2.0 + step, "type": "train.step", "task": "train:happy", "step": step, "steps": 4,
                "loss": 2.0 / step} for step in range(1, 5)]
    events += [{"t": 7.0, "type": "task_end", "task": "train:happy", "status": "done", "seconds": 6.0,
                "metrics": {"margin_before": -0.305, "margin_steered": 0.018, "margin_after": -0.085,
                            "steered_share": 0.68},
                "data": {"samples": [{"prompt": "How was your day?", "response": "Wonderful, thanks!",
                                      "score": 1.25}],
                         "replies": [{"prompt": "Tell me about rain.", "base": "Rain is water.",
                                      "steered": "Rain is a joyful gift!", "trained": "Rain is lovely."}]}},
               {"t": 7.1, "type": "build_end", "task": None, "ok": True, "cancelled": False, "seconds": 6.1}]
    (tmp_path / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events))
    app = Dashboard(tmp_path, now=lambda: 8.0)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(app, pilot, lambda: app.state.finished)
        await pilot.press("1")
        assert app.query_one(TabbedContent).active == "train"
        training = panel_text(app, "train-view")
    assert "margin  before -0.305  steered +0.018  after -0.085  steered_share +0.680" in training
    assert "How was your day?  score +1.250" in training and "Wonderful, thanks!" in training
    assert "Tell me about rain." in training
    assert "base:     Rain is water." in training and "trained:  Rain is lovely." in training
    assert "2 ┤" in training and "0.5 ┤" in training  # the loss plot's axis: highest, lowest
    assert "step 4: 0.5000" in training


def test_a_running_training_shows_its_sub_phase_on_the_train_tab():
    from behaviorc.tui.widgets import draw_training

    state = BuildState()
    state.apply({"t": 1.0, "type": "build_start", "task": None, "tasks": [{"id": "train:happy", "kind": "train"}]})
    state.apply({"t": 1.0, "type": "task_start", "task": "train:happy", "kind": "train"})
    state.apply({"t": 2.0, "type": "progress", "task": "train:happy", "done": 0, "total": 30,
                 "what": "sampling 10 prompts x 4"})
    assert "▶ sampling 10 prompts x 4 · 0/30 (0%)" in text_of(draw_training(state))
