"""Snapshots of the dashboard at 80x24 on the recorded logs (pytest-textual-snapshot).
Update after a deliberate change with `pytest tests/test_tui_snapshot.py --snapshot-update`
and look at the SVGs before committing them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from behaviorc.tui.app import Dashboard

DATA = Path(__file__).parent / "data"
NOW = 1_764_000_004.0


def dashboard(tmp_path: Path, log: str) -> Dashboard:
    folder = tmp_path / "build"
    folder.mkdir()
    lines = (DATA / log).read_text().splitlines(keepends=True)
    if log == "events_live.jsonl":  # a running build's pid in its build_start (ours)
        lines = [json.dumps({**json.loads(line), "pid": os.getpid()}) + "\n"
                 if '"build_start"' in line else line for line in lines]
    (folder / "events.jsonl").write_text("".join(lines))
    return Dashboard(folder, now=lambda: NOW)


def loaded(app: Dashboard):
    async def wait(pilot) -> None:
        events = sum(1 for _ in open(app.build_dir / "events.jsonl"))
        for _ in range(200):
            await pilot.pause(0.02)
            if app.state.events_seen >= events:
                break
        await pilot.pause(0.2)  # a redraw after the last batch
    return wait


@pytest.mark.parametrize("log, keys", [
    ("events_ok.jsonl", ()),
    ("events_ok.jsonl", ("2",)),
    ("events_ok.jsonl", ("3",)),
    ("events_failed.jsonl", ("4",)),
    ("events_live.jsonl", ()),
])
def test_dashboard_panels(snap_compare, tmp_path, log, keys):
    app = dashboard(tmp_path, log)
    assert snap_compare(app, press=keys, terminal_size=(80, 24), run_before=loaded(app))


def test_task_detail(snap_compare, tmp_path):
    app = dashboard(tmp_path, "events_failed.jsonl")
    # the tree's rows: base, model, listen, its 4 tasks, concise, train (the cursor starts above)
    assert snap_compare(app, press=["down"] * 9 + ["enter", "_"], terminal_size=(80, 24),
                        run_before=loaded(app))
