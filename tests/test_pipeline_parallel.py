"""The executor with `jobs` above 1: parallel-safe tasks in worker processes.

Small real tasks prove what matters without timing anything: tasks that can only finish
when another runs at the same time (they wait for each other's file), workers' pids,
the order of each task's events in the log, failures and dead workers located with
their downstream skipped, and stops: the cancel file, Ctrl-C once (tasks stop at their
next check), Ctrl-C twice (workers terminated, nothing half-written) and a SIGKILL of
the build (its workers exit; the rebuild reuses what finished). The builds that receive
signals run in a subprocess: this file run as a script.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from behaviorc.core.events import TrainStep
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.core.events import read_events
from behaviorc.pipeline.executor import Executor
from behaviorc.pipeline.parallel import Jobs

pytestmark = pytest.mark.processes

HANG_GUARD = 60.0  # seconds; only ends a test that would otherwise hang


class Text(Task):
    kind: ClassVar[str] = "par.text"
    reports: ClassVar[tuple[str, ...]] = ('pid',)
    parallel_safe: ClassVar[bool] = True
    text: str

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.out / "text.txt").write_text(self.text)
        return TaskResult(artifacts={"text": "text.txt"}, metrics={"pid": os.getpid()})


class Meet(Task):
    """Writes its name into `room`, then waits until `others` wrote theirs: it finishes
    only when they run at the same time. Emits a loss curve, as training does."""

    kind: ClassVar[str] = "par.meet"
    reports: ClassVar[tuple[str, ...]] = ('pid',)
    parallel_safe: ClassVar[bool] = True
    source: Text
    room: str
    others: tuple[str, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        room = Path(self.room)
        (room / self.name).write_text(str(os.getpid()))
        deadline = time.monotonic() + HANG_GUARD
        while not all((room / other).exists() for other in self.others):
            if time.monotonic() > deadline:
                raise BehaviorError(f"{self.name} waited alone: the tasks did not run side by side")
            time.sleep(0.01)
        for step in range(1, 6):
            ctx.emit(TrainStep(step=step, steps=5, loss=1.0 / step))
        text = ctx.result(self.source).path("text").read_text()
        (ctx.out / "met.txt").write_text(f"{text}:{self.name}")
        return TaskResult(artifacts={"met": "met.txt"}, metrics={"pid": os.getpid()})


class Gather(Task):
    """Not parallel-safe: runs in the build's own process."""

    kind: ClassVar[str] = "par.gather"
    reports: ClassVar[tuple[str, ...]] = ('pid',)
    parts: tuple[Task, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        texts = [Path(next(iter(ctx.result(p).artifacts.values()))).read_text() for p in self.parts]
        (ctx.out / "all.txt").write_text("+".join(texts))
        return TaskResult(artifacts={"all": "all.txt"}, metrics={"pid": os.getpid()})


class Breaks(Task):
    kind: ClassVar[str] = "par.breaks"
    parallel_safe: ClassVar[bool] = True
    source: Text
    how: str  # "user": a BehaviorError, "bug": an exception, "dies": the process is killed,
    # "unpicklable": a result a worker cannot send back

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.out / "half.txt").write_text("half-written")
        if self.how == "unpicklable":
            return TaskResult(data={"lock": threading.Lock()})
        if self.how == "user":
            raise BehaviorError("the data file has no pairs", hint="add a pair")
        if self.how == "bug":
            raise ZeroDivisionError("boom")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class Loops(Task):
    """Long work that checks for cancellation a hundred times a second; it can only end
    by being cancelled. Writes its pid to its scratch folder first."""

    kind: ClassVar[str] = "par.loops"
    parallel_safe: ClassVar[bool] = True
    source: Text
    writes_cancel: str = ""  # a cancel file to write, as `behaviorc dash` does,
    after: str = ""  # ... once this file exists (another task's pid: it runs too)

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.scratch / "pid").write_text(str(os.getpid()))
        deadline = time.monotonic() + HANG_GUARD
        while self.after and not Path(self.after).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.writes_cancel:
            Path(self.writes_cancel).write_text("")
        while time.monotonic() < deadline:
            ctx.progress(0, 1, "looping")
            time.sleep(0.01)
        raise BehaviorError("never cancelled")


class Holds(Task):
    """Runs while its `hold` file exists without checking for cancellation, as a long
    computation between two checkpoints does. Writes its pid to its scratch folder."""

    kind: ClassVar[str] = "par.holds"
    parallel_safe: ClassVar[bool] = True
    source: Text
    hold: str

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.scratch / "pid").write_text(str(os.getpid()))
        deadline = time.monotonic() + HANG_GUARD
        while Path(self.hold).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        ctx.check_cancelled()
        (ctx.out / "held.txt").write_text(self.name)
        return TaskResult(artifacts={"held": "held.txt"})


def statuses(outcome) -> dict[str, str]:
    return {r.task.id: r.status for r in outcome.records}


def leftovers(out: Path) -> list[str]:
    return [p.name for p in (out / ".store").iterdir() if ".tmp-" in p.name]


def test_independent_tasks_run_side_by_side_in_workers_and_events_keep_their_order(tmp_path):
    room = tmp_path / "room"
    room.mkdir()
    source = Text(name="s", text="abc")
    names = ("a", "b")
    meets = tuple(Meet(name=n, source=source, room=str(room), others=tuple(o for o in names if o != n))
                  for n in names)
    gather = Gather(name="g", parts=meets)
    out = tmp_path / "out"
    outcome = Executor(out, jobs=Jobs(2)).run([gather])
    assert outcome.ok, [(r.task.id, r.error) for r in outcome.records]
    pids = {r.task.name: int(r.result.metrics["pid"]) for r in outcome.records}
    assert pids["a"] != pids["b"] and os.getpid() not in (pids["a"], pids["b"], pids["s"])
    assert pids["g"] == os.getpid()  # not parallel-safe: run here
    assert Path(outcome.record("par.gather:g").result.artifacts["all"]).read_text() == "abc:a+abc:b"
    assert not leftovers(out)

    events = read_events(out / "events.jsonl")
    for meet in meets:
        own = [e for e in events if e["task"] == meet.id]
        assert own[0]["type"] == "task_start" and own[-1]["type"] == "task_end"
        assert [e["step"] for e in own if e["type"] == "train.step"] == [1, 2, 3, 4, 5]

    # the rebuild starts no worker: everything is in the store, curves replayed from it
    again = Executor(out, jobs=Jobs(2)).run([gather])
    assert set(statuses(again).values()) == {"cached"}
    replayed = [e for e in read_events(out / "events.jsonl") if e["type"] == "train.step"]
    assert len(replayed) == 10 and all(e["replayed"] for e in replayed)


def test_auto_starts_another_worker_only_while_free_memory_holds_another_task(tmp_path, monkeypatch):
    tasks = [Text(name=n, text=n) for n in ("a", "b", "c")]
    plenty = Executor(tmp_path / "plenty", jobs=Jobs(2, fit_memory=True)).run(tasks)
    assert len({r.result.metrics["pid"] for r in plenty.records}) == 2

    monkeypatch.setattr("behaviorc.pipeline.parallel.available_memory", lambda: 0)
    tight = Executor(tmp_path / "tight", jobs=Jobs(2, fit_memory=True)).run(tasks)
    assert tight.ok and len({r.result.metrics["pid"] for r in tight.records}) == 1  # one at a time


def test_failures_in_workers_are_located_and_their_downstream_skipped(tmp_path):
    spec = tmp_path / "demo.behavior"
    spec.write_text('model base = "tiny-gdn"\nbehavior b {\n  steer { strength 4.0 }\n}\n')
    loc = Location(file=str(spec), line=3, column=3, end_line=3, end_column=9)
    source = Text(name="s", text="x")
    user, bug, dies, unpicklable = (Breaks(name=how, source=source, how=how, loc=loc)
                                    for how in ("user", "bug", "dies", "unpicklable"))
    fine = Text(name="fine", text="y")
    tasks = [Gather(name=f"after-{t.name}", parts=(t,)) for t in (user, bug, dies)] + [fine, unpicklable]
    out = tmp_path / "out"
    outcome = Executor(out, jobs=Jobs(2)).run(tasks)
    assert statuses(outcome) == {
        "par.text:s": "done", "par.breaks:user": "failed", "par.breaks:bug": "failed",
        "par.breaks:dies": "failed", "par.text:fine": "done", "par.gather:after-user": "skipped",
        "par.gather:after-bug": "skipped", "par.gather:after-dies": "skipped",
        "par.breaks:unpicklable": "failed"}
    assert outcome.exit_code == 1

    failed = outcome.record("par.breaks:user")
    assert failed.loc == loc and not failed.internal
    assert f"{spec}:3:3: error: the data file has no pairs" in failed.error
    bug_record = outcome.record("par.breaks:bug")
    assert bug_record.internal and "ZeroDivisionError: boom" in Path(bug_record.log).read_text()
    unsent = outcome.record("par.breaks:unpicklable")
    assert unsent.internal and "pickle" in Path(unsent.log).read_text()
    died = outcome.record("par.breaks:dies").error
    assert "ended without finishing it (killed by signal 9)" in died and f"{spec}:3:3" in died
    assert not leftovers(out) and not (out / ".store" / user.key).exists()


def test_the_dashboards_cancel_file_stops_tasks_running_in_workers(tmp_path):
    out = tmp_path / "out"
    source = Text(name="s", text="x")
    second = Loops(name="second", source=source)
    first = Loops(name="first", source=source, writes_cancel=str(out / "cancel"),
                  after=str(out / ".store" / f"{second.key}.scratch" / "pid"))
    after = Gather(name="after", parts=(first, second))
    outcome = Executor(out, jobs=Jobs(2)).run([after])
    assert outcome.cancelled and outcome.exit_code == 130
    assert statuses(outcome) == {"par.text:s": "done", "par.loops:first": "cancelled",
                                 "par.loops:second": "cancelled", "par.gather:after": "pending"}
    assert not leftovers(out)
    for task in (first, second):  # kept for a resumed build
        assert (out / ".store" / f"{task.key}.scratch" / "pid").exists()
    stopping = [e for e in read_events(out / "events.jsonl") if e["type"] == "build_stopping"]
    assert len(stopping) == 1 and stopping[0]["reason"] == "cancel requested from the dashboard"


# --- signals, in a build subprocess ------------------------------------------------------

def script_plan(room: Path, kind: str) -> list[Task]:
    source = Text(name="s", text="x")
    quick = Text(name="quick", text="q")
    if kind == "loops":
        slow: tuple[Task, ...] = tuple(Loops(name=n, source=source) for n in ("one", "two"))
    else:
        slow = tuple(Holds(name=n, source=source, hold=str(room / "hold")) for n in ("one", "two"))
    return [Gather(name="all", parts=(quick, *slow))]


def start_build(tmp_path: Path, kind: str) -> tuple[subprocess.Popen, Path, list[Path]]:
    out, room = tmp_path / "out", tmp_path / "room"
    room.mkdir()
    (room / "hold").write_text("")
    proc = subprocess.Popen([sys.executable, __file__, str(out), str(room), kind],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    slow = script_plan(room, kind)[0].parts[1:]
    pid_files = [out / ".store" / f"{t.key}.scratch" / "pid" for t in slow]
    deadline = time.monotonic() + HANG_GUARD
    while not all(f.exists() and f.read_text() for f in pid_files) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    return proc, out, pid_files


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def finished_report(out: Path) -> dict[str, str]:
    report = json.loads((out / "report.json").read_text())
    assert report["finished"] and report["cancelled"]
    return {t["id"]: t["status"] for t in report["tasks"]}


def test_ctrl_c_stops_worker_tasks_at_their_next_check(tmp_path):
    proc, out, pid_files = start_build(tmp_path, "loops")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err  # workers ignore Ctrl-C
    status = finished_report(out)
    assert status["par.loops:one"] == status["par.loops:two"] == "cancelled"
    assert status["par.gather:all"] == "pending"
    assert not leftovers(out)
    assert all(gone(int(f.read_text())) for f in pid_files)


def test_a_second_ctrl_c_terminates_the_workers_and_leaves_nothing_half_written(tmp_path):
    proc, out, pid_files = start_build(tmp_path, "holds")
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline and '"build_stopping"' not in (out / "events.jsonl").read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # the Holds tasks never check: only a hard stop ends them
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 130, err
    status = finished_report(out)
    assert status["par.holds:one"] == status["par.holds:two"] == "cancelled"
    assert not leftovers(out)
    assert all(gone(int(f.read_text())) for f in pid_files)


def test_a_killed_build_takes_its_workers_along_and_the_rebuild_reuses_finished_tasks(tmp_path):
    proc, out, pid_files = start_build(tmp_path, "holds")
    quick_done = '"task": "par.text:quick", "status": "done"'
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline and quick_done not in (out / "events.jsonl").read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workers = [int(f.read_text()) for f in pid_files]
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline and not all(gone(pid) for pid in workers):
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers)  # they noticed their build was gone

    (tmp_path / "room" / "hold").unlink()
    rebuilt = Executor(out, jobs=Jobs(2)).run(script_plan(tmp_path / "room", "holds"))
    assert rebuilt.ok
    assert statuses(rebuilt) == {"par.text:s": "cached", "par.text:quick": "cached", "par.holds:one": "done",
                                 "par.holds:two": "done", "par.gather:all": "done"}
    assert not leftovers(out)


def test_a_build_beside_the_dashboard_starts_its_workers(tmp_path):
    """As `build --tui --jobs 2`, in a fresh interpreter: Textual replaces sys.stderr with
    a capture whose fd is -1, which multiprocessing's first spawn must not be handed."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, __file__, str(out), str(tmp_path), "dashboard"],
                          capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and {t["status"] for t in report["tasks"]} == {"done"}


async def build_beside_dashboard(out: Path) -> int:
    from behaviorc.pipeline.commands import BuildThread
    from behaviorc.tui.app import Dashboard

    texts = tuple(Text(name=n, text=n) for n in ("a", "b"))
    thread = BuildThread(Executor(out, jobs=Jobs(2)), [Gather(name="all", parts=texts)])
    app = Dashboard(out, build_thread=thread)
    async with app.run_test():
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.05)
    return thread.result().exit_code


if __name__ == "__main__":  # the builds the tests above interrupt, or run beside the dashboard
    from behaviorc.pipeline.context import CancelSignal
    from behaviorc.pipeline.executor import cancel_on_sigint
    out, room, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if kind == "dashboard":
        sys.exit(asyncio.run(build_beside_dashboard(out)))
    cancel = CancelSignal(out / "cancel")
    with cancel_on_sigint(cancel):
        sys.exit(Executor(out, cancel=cancel, jobs=Jobs(2)).run(script_plan(room, kind)).exit_code)
