"""Staging folders that a killed writer left (a built-in model half made in the models
cache, a checkpoint half saved in a task's scratch) are removed at the next start; a
live writer's are not (issue 31 finding 8)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from behaviorc.core.atomic import atomic_folder

WRITER = """
import os, signal, sys
from pathlib import Path
from behaviorc.core.atomic import atomic_folder
with atomic_folder(Path(sys.argv[1]), overwrite=True) as staging:
    (staging / "part.bin").write_bytes(b"x" * 1000)
    print(staging, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # alive until told
"""


def writer(target: Path, how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), how], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def siblings(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".")}


def test_a_killed_writers_staging_goes_and_a_live_ones_stays(tmp_path: Path) -> None:
    target = tmp_path / "scratch" / "checkpoint"
    killed = writer(target, "kill")
    dead_staging = Path(killed.stdout.readline().strip())
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert dead_staging.is_dir()  # the kill left it, as it did before
    live = writer(target, "wait")
    live_staging = Path(live.stdout.readline().strip())
    try:
        with atomic_folder(target, overwrite=True) as staging:
            (staging / "done").write_text("1")
        assert not dead_staging.exists()
        assert live_staging.is_dir() and (live_staging / "part.bin").is_file()
    finally:
        live.communicate("\n", timeout=30)
    assert live.returncode == 0
    assert siblings(target.parent) == set()  # the live writer cleaned up after itself


def test_a_builtin_half_made_by_a_killed_build_goes_at_the_next_start(
        tiny_gdn: Path, tmp_path: Path, monkeypatch) -> None:
    from behaviorc.model.builtin import builtin_path, ensure_builtin

    monkeypatch.setenv("BEHAVIORC_HOME", str(tmp_path / "home"))
    made = builtin_path("tiny-gdn")
    killed = writer(made, "kill")
    killed.stdout.readline()
    killed.wait(timeout=30)
    assert any(name.endswith(".tmp") for name in siblings(made.parent))
    shutil.copytree(tiny_gdn, made)  # made meanwhile, by another build
    assert ensure_builtin("tiny-gdn") == made
    assert siblings(made.parent) == set()
    assert os.listdir(made.parent) == [made.name]
