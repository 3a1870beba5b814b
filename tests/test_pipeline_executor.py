"""The executor and its store, run on small real tasks that read and write files."""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
from typing import ClassVar

import pytest

from behaviorc.core.events import TaskEvent
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.pipeline.kinds import ResolveModel
from behaviorc.core import ir
from behaviorc.pipeline.context import CancelSignal
from behaviorc.core.events import read_events
from behaviorc.pipeline.executor import Executor, plan_order
from behaviorc.pipeline.store import Store


class Source(Task):
    """Writes its text to a file."""

    kind: ClassVar[str] = "test.source"
    reports: ClassVar[tuple[str, ...]] = ('length',)
    text: str

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.out / "text.txt").write_text(self.text)
        return TaskResult(artifacts={"text": "text.txt"}, metrics={"length": len(self.text)})


@dataclass(frozen=True)
class Shouted(TaskEvent):
    chars: int


class Shout(Task):
    """Reads an upstream file and writes it upper-cased `times` times, in a subfolder."""

    kind: ClassVar[str] = "test.shout"
    source: Source
    times: int = 1

    def execute(self, ctx: TaskContext) -> TaskResult:
        text = ctx.result(self.source).path("text").read_text()
        (ctx.out / "nested").mkdir()
        (ctx.out / "nested" / "loud.txt").write_text(text.upper() * self.times)
        ctx.emit(Shouted(chars=len(text) * self.times))
        return TaskResult(artifacts={"loud": "nested/loud.txt"})


class Join(Task):
    kind: ClassVar[str] = "test.join"
    parts: tuple[Shout, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        texts = [ctx.result(p).path("loud").read_text() for p in self.parts]
        for i in range(len(texts)):
            ctx.progress(i + 1, len(texts), "joining")
        (ctx.out / "joined.txt").write_text("+".join(texts))
        return TaskResult(artifacts={"joined": "joined.txt"}, data={"parts": len(texts)})


class Fails(Task):
    kind: ClassVar[str] = "test.fails"
    source: Source
    how: str  # "user": a BehaviorError without a location, "bug": a plain exception

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.out / "half.txt").write_text("half-written")
        if self.how == "user":
            raise BehaviorError("the data file has no pairs", hint="add a pair")
        raise ZeroDivisionError("boom")


STOP = CancelSignal()  # the signal of the build in the cancel test


class CancelsItself(Task):
    """Stands in for a user pressing Ctrl-C half way: it sets the build's cancel signal,
    then reports progress, where a real task would notice."""

    kind: ClassVar[str] = "test.cancels"
    source: Source

    def execute(self, ctx: TaskContext) -> TaskResult:
        (ctx.scratch / "checkpoint.txt").write_text("step 1")
        STOP.cancel("test pressed Ctrl-C")
        ctx.progress(1, 2, "working")
        raise AssertionError("progress should have raised Cancelled")


def spec_file(tmp_path: Path) -> tuple[Path, Location]:
    spec = tmp_path / "demo.behavior"
    spec.write_text('model base = "tiny-gdn"\nbehavior b {\n  steer { strength 4.0 }\n}\n')
    return spec, Location(file=str(spec), line=3, column=3, end_line=3, end_column=9)


def chain(text: str = "abc", times: int = 2) -> tuple[Source, Shout, Shout, Join]:
    source = Source(name="s", text=text)
    a = Shout(name="a", source=source, times=times)
    b = Shout(name="b", source=source, times=1)
    return source, a, b, Join(name="j", parts=(a, b))


def statuses(outcome) -> dict[str, str]:
    return {r.task.id: r.status for r in outcome.records}


def test_runs_in_dependency_order_and_stores_artifacts(tmp_path):
    source, a, b, join = chain()
    outcome = Executor(tmp_path / "out").run([join])
    assert outcome.ok and outcome.exit_code == 0
    order = [r.task.id for r in outcome.records]
    assert order.index("test.source:s") < order.index("test.shout:a") < order.index("test.join:j")
    joined = Path(outcome.record("test.join:j").result.artifacts["joined"])
    assert joined.is_absolute() and joined.read_text() == "ABCABC+ABC"

    events = read_events(tmp_path / "out" / "events.jsonl")
    starts = [e["task"] for e in events if e["type"] == "task_start"]
    assert starts == order
    assert events[0]["type"] == "build_start" and events[-1]["type"] == "build_end"
    assert [t["id"] for t in events[0]["tasks"]] == order
    assert all({"t", "type", "task"} <= set(e) for e in events)
    assert any(e["type"] == "shouted" and e["task"] == "test.shout:a" for e in events)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] and report["finished"]
    assert [t["status"] for t in report["tasks"]] == ["done"] * 4
    assert report["tasks"][0]["metrics"] == {"length": 3}


def test_unchanged_rebuild_is_all_cached_and_a_change_reruns_only_downstream(tmp_path):
    out = tmp_path / "out"
    Executor(out).run([chain()[3]])
    again = Executor(out).run([chain()[3]])
    assert set(statuses(again).values()) == {"cached"}
    replayed = [e for e in read_events(out / "events.jsonl") if e.get("replayed")]
    assert [(e["type"], e["task"], e["chars"]) for e in replayed] == [
        ("shouted", "test.shout:a", 6), ("shouted", "test.shout:b", 3)]
    assert Path(again.record("test.join:j").result.artifacts["joined"]).read_text() == "ABCABC+ABC"

    changed = Executor(out).run([chain(times=3)[3]])
    assert statuses(changed) == {"test.source:s": "cached", "test.shout:a": "done",
                                 "test.shout:b": "cached", "test.join:j": "done"}
    assert Path(changed.record("test.join:j").result.artifacts["joined"]).read_text() == "ABCABCABC+ABC"


def test_force_reruns_everything_and_partial_targets_run_only_their_upstream(tmp_path):
    out = tmp_path / "out"
    source, a, b, join = chain()
    only_b = Executor(out).run([b])
    assert statuses(only_b) == {"test.source:s": "done", "test.shout:b": "done"}
    full = Executor(out).run([join])
    assert statuses(full) == {"test.source:s": "cached", "test.shout:a": "done",
                              "test.shout:b": "cached", "test.join:j": "done"}
    forced = Executor(out, force=True).run([join])
    assert set(statuses(forced).values()) == {"done"}


def test_a_failing_task_keeps_the_rest_and_reports_where(tmp_path):
    spec, loc = spec_file(tmp_path)
    source = Source(name="s", text="x")
    bad = Fails(name="bad", source=source, how="user", loc=loc)
    after_bad = Shout(name="after", source=source)
    downstream = Join(name="j", parts=(after_bad,))

    class NeedsBad(Task):
        kind: ClassVar[str] = "test.needs_bad"
        bad: Fails

    needs_bad = NeedsBad(name="n", bad=bad)
    outcome = Executor(tmp_path / "out").run([bad, downstream, needs_bad])
    assert statuses(outcome) == {"test.source:s": "done", "test.fails:bad": "failed",
                                 "test.shout:after": "done", "test.join:j": "done",
                                 "test.needs_bad:n": "skipped"}
    assert outcome.exit_code == 1
    failed = outcome.record("test.fails:bad")
    assert failed.loc == loc and not failed.internal
    assert f"{spec}:3:3: error: the data file has no pairs" in failed.error
    assert "steer { strength 4.0 }" in failed.error and "hint: add a pair" in failed.error

    store = tmp_path / "out" / ".store"
    assert not any(".tmp-" in p.name for p in store.iterdir())  # the half-written folder is gone
    assert not (store / bad.key).exists()
    events = read_events(tmp_path / "out" / "events.jsonl")
    failure = next(e for e in events if e["type"] == "task_failed")
    assert failure["task"] == "test.fails:bad" and failure["loc"]["line"] == 3
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] is False
    assert {t["id"]: t["status"] for t in report["tasks"]}["test.needs_bad:n"] == "skipped"

    # once fixed (another task, another key), the finished work is reused
    fixed = Executor(tmp_path / "out").run([downstream])
    assert set(statuses(fixed).values()) == {"cached"}


def test_a_bug_in_a_task_is_an_internal_error_with_a_saved_traceback(tmp_path):
    spec, loc = spec_file(tmp_path)
    bad = Fails(name="bug", source=Source(name="s", text="x"), how="bug", loc=loc)
    outcome = Executor(tmp_path / "out").run([bad])
    record = outcome.record("test.fails:bug")
    assert record.status == "failed" and record.internal
    assert "internal error in task test.fails:bug" in record.error
    assert f"{spec}:3:3" in record.error
    log = Path(record.log)
    assert log.parent == tmp_path / "out" / "logs"
    assert "ZeroDivisionError: boom" in log.read_text() and "Traceback" not in record.error


def test_cancel_keeps_finished_tasks_and_the_scratch_folder(tmp_path):
    out = tmp_path / "out"
    source = Source(name="s", text="x")
    stopper = CancelsItself(name="stop", source=source)
    later = Shout(name="later", source=source)
    outcome = Executor(out, cancel=STOP).run([stopper, later])
    assert outcome.cancelled and outcome.exit_code == 130
    assert statuses(outcome) == {"test.source:s": "done", "test.cancels:stop": "cancelled",
                                 "test.shout:later": "pending"}
    assert (out / ".store" / f"{stopper.key}.scratch" / "checkpoint.txt").read_text() == "step 1"
    report = json.loads((out / "report.json").read_text())
    assert report["cancelled"] and not report["ok"]
    resumed = Executor(out).run([later])
    assert statuses(resumed) == {"test.source:s": "cached", "test.shout:later": "done"}


def test_a_cancel_file_stops_a_build_before_its_next_task(tmp_path):
    out = tmp_path / "out"
    Executor(out).run([])  # an earlier build
    signal = CancelSignal(out / "cancel")
    executor = Executor(out, cancel=signal)
    (out / "cancel").write_text("")  # left from the earlier build: must not stop this one
    first = executor.run([Source(name="s", text="x")])
    assert first.ok

    class WritesCancel(Task):
        kind: ClassVar[str] = "test.writes_cancel"

        def execute(self, ctx: TaskContext) -> TaskResult:
            (out / "cancel").write_text("")  # as `behaviorc dash` does from another process
            return TaskResult()

    second = Executor(out).run([WritesCancel(name="w"), Shout(name="x", source=Source(name="s2", text="y"))])
    assert second.cancelled and second.exit_code == 130
    assert statuses(second) == {"test.writes_cancel:w": "done", "test.source:s2": "pending",
                                "test.shout:x": "pending"}


def test_a_corrupted_artifact_is_detected_and_rebuilt(tmp_path):
    out = tmp_path / "out"
    source, a, b, join = chain()
    first = Executor(out).run([join])
    loud = Path(first.record("test.shout:a").result.artifacts["loud"])
    loud.write_text("tampered")
    second = Executor(out).run([join])
    assert statuses(second)["test.shout:a"] == "done"
    assert statuses(second)["test.shout:b"] == "cached"
    assert "nested/loud.txt changed on disk" in second.record("test.shout:a").cache_note
    assert loud.read_text() == "ABCABC"
    events = read_events(out / "events.jsonl")
    assert [e["task"] for e in events if e["type"] == "cache_invalid"] == ["test.shout:a"]

    (out / ".store" / source.key / "result.json").write_text("{not json")
    third = Executor(out).run([join])
    assert statuses(third)["test.source:s"] == "done"

    result_file = out / ".store" / source.key / "result.json"
    result_file.write_text(result_file.read_text().replace('"length": 3', '"length": 4'))  # still JSON
    fourth = Executor(out).run([join])
    assert statuses(fourth)["test.source:s"] == "done"
    assert "result.json changed on disk" in fourth.record("test.source:s").cache_note
    assert fourth.record("test.source:s").result.metrics == {"length": 3}


def test_a_staging_folder_left_by_a_killed_build_is_removed(tmp_path):
    out = tmp_path / "out"
    source = Source(name="s", text="x")
    Executor(out).run([])  # the killed build had taken the folder
    stale = out / ".store" / f"{source.key}.tmp-99999999"
    stale.mkdir(parents=True)
    (stale / "text.txt").write_text("half")
    outcome = Executor(out).run([source])
    assert outcome.ok and not stale.exists()
    assert Path(outcome.records[0].result.artifacts["text"]).read_text() == "x"


def test_a_second_build_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "out"

    class BuildsAgain(Task):
        kind: ClassVar[str] = "test.builds_again"
        reports: ClassVar[tuple[str, ...]] = ("refused", "holder")

        def execute(self, ctx: TaskContext) -> TaskResult:
            with pytest.raises(BehaviorError, match="another build is running"):
                Executor(out).run([Source(name="s", text="x")])
            return TaskResult(metrics={"refused": 1.0, "holder": float(Store(out / ".store").holder())})

    outcome = Executor(out).run([BuildsAgain(name="b")])
    assert outcome.records[0].result.metrics == {"refused": 1.0, "holder": float(os.getpid())}
    assert outcome.ok and Store(out / ".store").holder() is None  # what the dashboard asks


def test_a_task_naming_a_missing_artifact_fails_as_a_bug(tmp_path):
    class Liar(Task):
        kind: ClassVar[str] = "test.liar"

        def execute(self, ctx: TaskContext) -> TaskResult:
            return TaskResult(artifacts={"model": "model"})

    outcome = Executor(tmp_path / "out").run([Liar(name="l")])
    record = outcome.records[0]
    assert record.status == "failed" and record.internal
    assert "wrote no such file" in Path(record.log).read_text()


class UsesEngine(Task):
    kind: ClassVar[str] = "test.uses_engine"
    reports: ClassVar[tuple[str, ...]] = ('engine',)
    model: ResolveModel

    def execute(self, ctx: TaskContext) -> TaskResult:
        path = ctx.result(self.model).data["path"]
        engine = ctx.engine(path)
        return TaskResult(metrics={"engine": float(id(engine) % 1000)})


class Resolve(ResolveModel):
    """A ResolveModel that 'resolves' to a folder it makes, without loading anything."""

    kind: ClassVar[str] = "test.resolve"
    folder: str

    def execute(self, ctx: TaskContext) -> TaskResult:
        Path(self.folder).mkdir(exist_ok=True)
        return TaskResult(data={"path": self.folder})


class CountingEngine:
    """A stand-in engine: the real one needs a model; this one records its life."""

    def __init__(self, path: str, journal: list[str]):
        self.path, self.journal = path, journal
        journal.append(f"load {Path(path).name}")

    def close(self) -> None:
        self.journal.append(f"close {Path(self.path).name}")


def test_engines_are_shared_and_freed_after_the_last_task_that_needs_them(tmp_path):
    journal: list[str] = []
    decl = ir.ModelDecl(name="base", source="tiny-gdn", kind="builtin")
    one = Resolve(name="one", decl=decl, folder=str(tmp_path / "model-one"))
    two = Resolve(name="two", decl=decl, folder=str(tmp_path / "model-two"))
    tasks = [UsesEngine(name="1a", model=one), UsesEngine(name="1b", model=one),
             UsesEngine(name="2a", model=two)]

    events_seen: list[str] = []
    outcome = Executor(tmp_path / "out", engine_loader=lambda p, d, v: CountingEngine(p, journal),
                       listeners=[lambda e: events_seen.append(f"{e['type']} {e['task']}")]).run(tasks)
    assert outcome.ok
    assert journal == ["load model-one", "close model-one", "load model-two", "close model-two"]
    m = outcome.record("test.uses_engine:1a").result.metrics
    assert m == outcome.record("test.uses_engine:1b").result.metrics  # the same engine
    # model one is freed right after 1b, its last user, before 2a starts
    freed = events_seen.index("engine_freed None")
    assert events_seen.index("task_end test.uses_engine:1b") < freed < \
        events_seen.index("task_start test.uses_engine:2a")


def test_plan_order_lists_each_task_once_after_its_upstream():
    source, a, b, join = chain()
    order = plan_order([b, join, source])
    assert [t.id for t in order] == ["test.source:s", "test.shout:b", "test.shout:a", "test.join:j"]
