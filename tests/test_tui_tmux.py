"""The real `behaviorc dash DIR` in a real terminal (tmux, 80x24), read off the screen."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(shutil.which("tmux") is None,
                                 reason="tmux is not installed (the setup script installs it)")]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_for_screen(session: str, text: str, limit: float = 60.0) -> str:
    """The screen once it shows `text`; the limit only guards against a hung app."""
    deadline = time.monotonic() + limit
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"the screen never showed {text!r}; it showed:\n{screen}")


def test_dash_in_a_real_terminal(tmp_path):
    folder = tmp_path / "build"
    folder.mkdir()
    shutil.copy(DATA / "events_failed.jsonl", folder / "events.jsonl")
    session = f"behaviorc-test-{uuid.uuid4().hex[:8]}"
    command = f"{sys.executable} -m behaviorc.cli dash {folder}; sleep 30"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", command)
    try:
        wait_for_screen(session, "FAILED · 5/9 tasks")
        screen = wait_for_screen(session, "q quit")  # the footer draws last
        assert "✗ train" in screen and "▼ concise" in screen and "- deploy" in screen
        assert "tab next panel" in screen
        assert all(len(line) <= 80 for line in screen.splitlines())

        tmux("send-keys", "-t", session, "4")
        screen = wait_for_screen(session, "tests/data/demo.behavior:17:3: error")
        assert "hint: try lr 3e-5" in screen

        tmux("send-keys", "-t", session, "q")
        # the app exits and the shell runs `sleep`: the dashboard's screen is gone
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "FAILED" in tmux("capture-pane", "-p", "-t", session):
            time.sleep(0.2)
        assert "FAILED" not in tmux("capture-pane", "-p", "-t", session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
