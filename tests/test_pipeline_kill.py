"""Fault injection: a build killed with SIGKILL at random points, then rebuilt.

The build runs in a subprocess (this file run as a script) over a plan of small real
tasks that write several files with short sleeps in between, so kills land inside
tasks, inside the store's commit and between tasks. The rebuild must succeed, produce
exactly what an uninterrupted build produces, and reuse every task the killed build
finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

from behaviorc.core.task import Task, TaskContext, TaskResult

pytestmark = pytest.mark.processes


class Chunks(Task):
    """Writes `parts` files, each holding a hash of the upstream output and its index."""

    kind: ClassVar[str] = "kill.chunks"
    upstream: tuple["Chunks", ...] = ()
    parts: int = 3
    pause: float = 0.02

    def execute(self, ctx: TaskContext) -> TaskResult:
        seed = "".join(ctx.result(u).path("digest").read_text() for u in self.upstream)
        for i in range(self.parts):
            (ctx.out / f"part{i}.txt").write_text(hashlib.sha256(f"{seed}/{self.name}/{i}".encode()).hexdigest())
            ctx.progress(i + 1, self.parts, "writing parts")
            time.sleep(self.pause)
        whole = "".join((ctx.out / f"part{i}.txt").read_text() for i in range(self.parts))
        (ctx.out / "digest").write_text(hashlib.sha256(whole.encode()).hexdigest())
        return TaskResult(artifacts={"digest": "digest"})


class Steps(Task):
    """Long work that checkpoints in ctx.scratch and resumes from it, like training."""

    kind: ClassVar[str] = "kill.steps"
    reports: ClassVar[tuple[str, ...]] = ('resumed_from',)
    upstream: Chunks
    steps: int = 12
    pause: float = 0.02

    def execute(self, ctx: TaskContext) -> TaskResult:
        checkpoint = ctx.scratch / "state.json"
        state = {"step": 0, "value": ctx.result(self.upstream).path("digest").read_text()}
        if checkpoint.exists():
            state = json.loads(checkpoint.read_text())
        resumed_from = state["step"]
        while state["step"] < self.steps:
            state["value"] = hashlib.sha256(state["value"].encode()).hexdigest()
            state["step"] += 1
            tmp = ctx.scratch / "state.json.tmp"
            tmp.write_text(json.dumps(state))
            os.replace(tmp, checkpoint)
            ctx.progress(state["step"], self.steps, "steps")
            time.sleep(self.pause)
        (ctx.out / "digest").write_text(state["value"])
        return TaskResult(artifacts={"digest": "digest"}, metrics={"resumed_from": resumed_from})


def plan() -> list[Task]:
    a = Chunks(name="a")
    b = Chunks(name="b", upstream=(a,))
    c = Chunks(name="c", upstream=(a,), parts=4)
    d = Steps(name="d", upstream=b)
    e = Chunks(name="e", upstream=(b, c))
    f = Chunks(name="f", upstream=(e,), parts=2)
    return [d, f]


def final_digests(outcome) -> dict[str, str]:
    return {r.task.id: Path(r.result.artifacts["digest"]).read_text() for r in outcome.records}


def finished_before_kill(events_file: Path) -> set[str]:
    from behaviorc.core.events import read_events
    if not events_file.exists():
        return set()
    return {e["task"] for e in read_events(events_file)
            if e["type"] == "task_end" and e["status"] in ("done", "cached")}


def wait_for_start(events_file: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60  # only guards against a hung subprocess
    while time.monotonic() < deadline and proc.poll() is None:
        if events_file.exists() and events_file.stat().st_size > 0:
            return
        time.sleep(0.005)


def test_a_build_killed_at_random_points_resumes_and_reuses_finished_work(tmp_path):
    from behaviorc.pipeline.executor import Executor

    reference = Executor(tmp_path / "reference").run(plan())
    assert reference.ok
    expected = final_digests(reference)
    duration = sum(r.seconds for r in reference.records)

    rng = random.Random(7)
    reused_any = False
    for trial in range(10):
        out = tmp_path / f"trial{trial}"
        # odd trials kill twice: the second kill interrupts a build that was resuming
        for _ in range(1 + trial % 2):
            proc = subprocess.Popen([sys.executable, __file__, str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_for_start(out / "events.jsonl", proc)
            time.sleep(rng.uniform(0, duration * 1.1))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            finished = finished_before_kill(out / "events.jsonl")
            report = out / "report.json"
            if report.exists():
                json.loads(report.read_text())  # never half-written

        rebuilt = Executor(out).run(plan())
        assert rebuilt.ok, [(r.task.id, r.status, r.error) for r in rebuilt.records]
        assert final_digests(rebuilt) == expected
        status = {r.task.id: r.status for r in rebuilt.records}
        assert all(status[task_id] == "cached" for task_id in finished), (finished, status)
        reused_any |= bool(finished)
        store = out / ".store"
        assert not [p.name for p in store.iterdir() if ".tmp-" in p.name or ".scratch" in p.name]
        assert not list(out.glob(".report.json.tmp-*"))
    # the kill points spread over the build: some kills came after finished tasks
    assert reused_any


def test_a_killed_long_task_resumes_from_its_scratch_checkpoint(tmp_path):
    from behaviorc.pipeline.executor import Executor

    expected = final_digests(Executor(tmp_path / "reference").run(plan()))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, __file__, str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / ".store" / f"{plan()[0].key}.scratch" / "state.json"
    deadline = time.monotonic() + 60  # only guards against a hung subprocess
    while time.monotonic() < deadline:
        if checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rebuilt = Executor(out).run(plan())
    assert rebuilt.ok
    assert rebuilt.record("kill.steps:d").result.metrics["resumed_from"] >= 3
    assert final_digests(rebuilt) == expected


TRAIN_SPEC = """model base = "tiny-dense"

behavior listen {
  train {
    examples "listen.jsonl"
    steps 4
    batch 2
    targets attn.q
    optimizer apollo { rank 8 }
  }
}
"""

# The build, killed with SIGKILL where the trained model is about to be saved: after the
# last step, before the result is stored.
KILLED_AFTER_TRAINING = """
import os, signal, sys
from behaviorc.cli import main
import behaviorc.train.recipe as recipe
recipe.save_model = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(main(["build", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_a_kill_between_the_last_step_and_the_stored_result_resumes_without_training(tmp_path, tiny_dense):
    import shutil

    from behaviorc.cli import main

    for data in ("listen.jsonl",):
        shutil.copy(Path(__file__).parents[1] / "specs" / "data" / data, tmp_path)
    spec, out = tmp_path / "train.behavior", tmp_path / "out"
    spec.write_text(TRAIN_SPEC)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TRAINING, str(spec), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    trained_steps = [e["step"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())
                     if e["type"] == "train.step"]
    assert trained_steps == [1, 2, 3, 4]

    assert main(["build", str(spec), "--out", str(out)]) == 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["type"] == "train.step"]  # no step trained again
    record = next(t for t in json.loads((out / "report.json").read_text())["tasks"] if t["id"] == "train:listen")
    assert record["status"] == "done" and record["data"]["resumed_from"] == 4
    assert len(record["data"]["losses"]) == 4 and record["metrics"]["loss_last"] == record["data"]["losses"][-1]
    assert not list((out / ".store").glob("*.scratch"))  # the checkpoint went with the stored result


if __name__ == "__main__":  # the build these tests kill (and test_pipeline_cli interrupts)
    from behaviorc.pipeline.context import CancelSignal
    from behaviorc.pipeline.executor import Executor, cancel_on_sigint
    out = Path(sys.argv[1])
    cancel = CancelSignal(out / "cancel")
    with cancel_on_sigint(cancel):
        sys.exit(Executor(out, cancel=cancel).run(plan()).exit_code)
