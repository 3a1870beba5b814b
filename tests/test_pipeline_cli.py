"""`behaviorc build`, `clean` and `dash` from the command line, on real specs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

from behaviorc.core import ir
from behaviorc.cli import main
from behaviorc.core.diagnostics import Location
from behaviorc.pipeline.plan import TaskExpectation
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.pipeline.executor import Executor

REPO = Path(__file__).resolve().parents[1]
# The tiny-model copy of specs/listen.behavior (the example now runs on smollm2-135m).
LISTEN = REPO / "tests" / "data" / "specs" / "listen.behavior"


def test_a_spec_with_errors_is_reported_with_locations_and_exit_1(tmp_path, capsys):
    spec = tmp_path / "bad.behavior"
    spec.write_text('model base = "tiny-gdn"\nbehavior b {\n  steer { strenght 4.0 }\n}\n')
    assert main(["build", str(spec), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{spec}:3:" in err and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_build_only_one_task_then_rebuild_cached_then_clean(tmp_path, capsys, tiny_gdn):
    out = tmp_path / "out"
    assert main(["build", str(LISTEN), "--out", str(out), "--only", "model:base"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["spec"] == str(LISTEN)
    assert [(t["id"], t["status"]) for t in report["tasks"]] == [("model:base", "done")]
    assert len(report["spec_sha256"]) == 64
    assert "built: 1 done" in capsys.readouterr().out

    assert main(["build", str(LISTEN), "--out", str(out), "--only", "base"]) == 0  # by name
    report = json.loads((out / "report.json").read_text())
    assert [(t["id"], t["status"]) for t in report["tasks"]] == [("model:base", "cached")]

    assert main(["clean", str(out)]) == 0
    assert not out.exists()


def test_an_unknown_task_gets_a_suggestion(tmp_path, capsys, tiny_gdn):
    assert main(["build", str(LISTEN), "--out", str(tmp_path / "out"), "--only", "train:lisen"]) == 1
    err = capsys.readouterr().err
    assert "no task `train:lisen`" in err and "did you mean `train:listen`?" in err


def test_an_out_folder_that_is_a_file_is_refused(tmp_path, capsys, tiny_gdn):
    (tmp_path / "taken").write_text("a file")
    assert main(["build", str(LISTEN), "--out", str(tmp_path / "taken"), "--only", "model:base"]) == 1
    err = capsys.readouterr().err
    assert f"cannot use {tmp_path / 'taken'} as the build folder" in err and "Traceback" not in err


def test_clean_and_dash_refuse_a_folder_that_holds_no_build(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["clean", str(tmp_path)]) == 1
    assert main(["dash", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not a build folder" in err and "no build in" in err
    assert (tmp_path / "notes.txt").exists()


class Measured(Task):
    kind: ClassVar[str] = "test.measured"
    reports: ClassVar[tuple[str, ...]] = ('margin_after',)
    margin: float

    def execute(self, ctx: TaskContext) -> TaskResult:
        return TaskResult(metrics={"margin_after": self.margin})


def test_clean_unused_keeps_only_what_the_last_build_used(tmp_path, capsys):
    out = tmp_path / "out"
    first, second = Measured(name="m", margin=0.8), Measured(name="m", margin=0.3)
    Executor(out).run([first])
    Executor(out).run([second])  # the spec changed: the first result is no longer used
    (out / ".store" / "0123abcd.scratch").mkdir()  # a stopped training of an older spec
    assert main(["clean", str(out), "--unused"]) == 0
    assert not (out / ".store" / "0123abcd.scratch").exists()
    assert "removed 1 stored result(s)" in capsys.readouterr().out
    assert Executor(out).run([second]).record(second.id).status == "cached"
    assert Executor(out).run([first]).record(first.id).status == "done"  # computed again
    assert (out / "report.json").exists()


def test_clean_unused_needs_a_report(tmp_path, capsys):
    out = tmp_path / "out"
    Executor(out).run([Measured(name="m", margin=0.8)])
    (out / "report.json").unlink()
    assert main(["clean", str(out), "--unused"]) == 1
    assert "has no report.json" in capsys.readouterr().err
    assert any((out / ".store").iterdir())  # nothing removed


def test_clean_keeps_files_the_build_did_not_write(tmp_path, capsys):
    out = tmp_path / "out"
    Executor(out).run([Measured(name="bad", margin=0.1), Failing(name="f")])
    assert (out / "logs" / "test.failing-f.log").exists()
    (out / "logs" / "app.log").write_text("mine")  # added after the build
    (out / "notes.txt").write_text("mine")
    assert main(["clean", str(out)]) == 0
    assert "kept what builds did not write: logs, notes.txt" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == \
        ["logs", "logs/app.log", "notes.txt"]


def test_clean_refuses_a_folder_only_looking_like_a_build(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "logs" / "app.log").write_text("x")
    assert main(["clean", str(tmp_path)]) == 1
    assert "is not a build folder" in capsys.readouterr().err
    assert (tmp_path / "logs" / "app.log").read_text() == "x" and (tmp_path / "report.json").exists()


def test_a_build_refuses_an_out_folder_holding_foreign_files_unless_forced(tmp_path, capsys, tiny_gdn):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"mine": 1}')
    (out / "events.jsonl").write_text("mine\n")
    assert main(["build", str(LISTEN), "--out", str(out), "--only", "model:base"]) == 1
    err = capsys.readouterr().err
    assert "holds files behaviorc did not write: events.jsonl, report.json" in err and "--force-out" in err
    assert (out / "report.json").read_text() == '{"mine": 1}' and not (out / ".store").exists()
    assert main(["build", str(LISTEN), "--out", str(out), "--only", "model:base", "--force-out"]) == 0
    assert json.loads((out / "report.json").read_text())["ok"]
    # the build's own folder is taken again without the flag
    assert main(["build", str(LISTEN), "--out", str(out), "--only", "model:base"]) == 0


class Failing(Task):
    kind: ClassVar[str] = "test.failing"

    def execute(self, ctx: TaskContext) -> TaskResult:
        raise RuntimeError("a bug")


def test_expect_lines_are_judged_into_the_report(tmp_path):
    loc = Location(file="x.behavior", line=9, column=5, end_line=9, end_column=30)
    good, bad = Measured(name="good", margin=0.8), Measured(name="bad", margin=0.1)
    expect = ir.Expectation(metric="margin_after", op=">", value=0.5, loc=loc)
    outcome = Executor(tmp_path / "out", expectations=[
        TaskExpectation(good.id, expect), TaskExpectation(bad.id, expect),
        TaskExpectation("test.measured:not-built", expect)]).run([good, bad])
    assert [(v.task_id, v.met) for v in outcome.verdicts] == [(good.id, True), (bad.id, False)]
    assert not outcome.ok and outcome.exit_code == 1
    assert "expectation not met: margin_after > 0.5 (measured 0.1 by test.measured:bad)" in \
        outcome.unmet[0].render()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] is False
    assert [e["met"] for e in report["expectations"]] == [True, False]


def test_ctrl_c_stops_the_build_keeps_finished_work_and_exits_130(tmp_path):
    out = tmp_path / "out"
    script = REPO / "tests" / "test_pipeline_kill.py"
    proc = subprocess.Popen([sys.executable, str(script), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events = out / "events.jsonl"
    deadline = time.monotonic() + 60  # only guards against a hung subprocess
    while time.monotonic() < deadline:
        if events.exists() and '"task_start", "task": "kill.steps:d"' in events.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    report = json.loads((out / "report.json").read_text())
    status = {t["id"]: t["status"] for t in report["tasks"]}
    assert report["cancelled"] and status["kill.steps:d"] == "cancelled"
    assert status["kill.chunks:b"] == "done"
    assert "Traceback" not in err
    assert not [p for p in (out / ".store").iterdir() if ".tmp-" in p.name]
    steps_key = next(t["key"] for t in report["tasks"] if t["id"] == "kill.steps:d")
    assert os.listdir(out / ".store" / f"{steps_key}.scratch")  # its checkpoint, for the rerun


def _clock_seconds(line: str) -> int | None:
    """The HH:MM:SS a log line of the build begins with, as seconds of the day."""
    found = re.match(r"(\d\d):(\d\d):(\d\d) ", line)
    return int(found[1]) * 3600 + int(found[2]) * 60 + int(found[3]) if found else None


def test_a_build_logging_to_a_file_prints_a_progress_line_at_least_every_30_s(tmp_path, tiny_dense, capsys):
    """A long task (training, its phases: loading, sample replies, steps) prints its
    phase, count and ETA at a steady interval into a file. The interval is lowered to
    1 s so the task need not last minutes, and it trains 40 steps so its steps phase
    outlasts an interval on a fast machine too (12 steps ended within one 2 s interval on
    an idle AMD EPYC); the requirement (a line every 30 s at most) is checked on the gaps
    between the lines' own times. The trained model is then
    found by name, `DIR/listen/model`, and `behaviorc show` says what made it."""
    spec = tmp_path / "long.behavior"
    spec.write_text(LISTEN.read_text().replace('"tiny-gdn"', '"tiny-dense"').replace("steps 30", "steps 40")
                    .replace("targets gdn.gates, gdn.proj, attn.q", "targets attn.q, mlp"))
    shutil.copytree(LISTEN.parent / "data", tmp_path / "data")
    log = tmp_path / "build.log"
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", "behaviorc.cli", "build", str(spec), "--out",
                                str(tmp_path / "out"), "--only", "train:listen"], stdout=handle,
                               stderr=subprocess.STDOUT, env={**os.environ, "BEHAVIORC_LOG_PROGRESS_S": "1"})
    text = log.read_text()
    assert code == 0, text
    lines = [line for line in text.splitlines() if _clock_seconds(line) is not None and " train:listen " in line]
    running = [line for line in lines if "▶ running" in line]
    assert lines[-1].split()[1:3] == ["✓", "done"], text
    assert len(running) >= 4, text  # it lasted several intervals
    phases = {re.sub(r"[\d.]+", "#", line.split("  ")[-1].split(" · ")[0]) for line in running}
    assert len(phases) >= 3, text  # sub-phases by name: loading, sample replies, steps
    assert any(re.search(r"loss \d\.\d+ · \d+/40 \(\d+%\)", line) for line in running), text
    # a steps line counted past the phase's first event has an ETA (lines come by the
    # clock, so how many steps fall between two of them depends on the machine)
    steps = [(int(m[1]), line) for line in running if (m := re.search(r"loss [\d.]+ · (\d+)/40", line))]
    later = [line for done, line in steps if steps[0][0] < done < 40]
    assert all("ETA " in line for line in later), text
    times = [_clock_seconds(line) for line in lines]
    gaps = [(b - a) % 86400 for a, b in zip(times, times[1:])]
    assert max(gaps) <= 30, text

    model = tmp_path / "out" / "listen" / "model"
    assert model.is_symlink() and (tmp_path / "out" / ".store") in model.resolve().parents
    assert f"results: {model.parent}" in text and (model.parent / "loss.png").is_file()
    assert main(["show", str(model)]) == 0
    shown = capsys.readouterr().out
    assert "made by:  train:listen (train" in shown and f"spec:     {spec}" in shown
    assert "from:     model:base (model): " + str(tiny_dense) in shown and "margin_after=" in shown


def test_a_running_phase_gets_an_eta_from_its_own_rate_and_a_new_phase_starts_over():
    from behaviorc.tui.state import BuildState
    from behaviorc.tui.styles import progress_text

    state = BuildState()
    state.apply({"type": "task_start", "task": "train:listen", "t": 100.0})
    state.apply({"type": "progress", "task": "train:listen", "done": 0, "total": 3,
                 "what": "sampling replies", "t": 100.0})
    state.apply({"type": "progress", "task": "train:listen", "done": 2, "total": 10,
                 "what": "loss 0.9", "t": 110.0})
    task = state.tasks["train:listen"]
    assert "ETA" not in progress_text(task, 111.0)  # one event: no rate yet
    state.apply({"type": "progress", "task": "train:listen", "done": 4, "total": 10,
                 "what": "loss 0.7", "t": 120.0})
    # 2 steps per 10 s since the phase began, 6 left: 30 s
    assert progress_text(task, 120.0) == "loss 0.7 · 4/10 (40%) · ETA 30s"
    assert "ETA" not in progress_text(task, None)  # no clock, no ETA


def test_result_links_are_replaced_in_place_and_dangling_ones_dropped(tmp_path):
    from behaviorc.pipeline.results import link_results

    out = tmp_path / "out"
    first, second = (out / ".store" / key / "model" for key in ("k1", "k2"))
    for folder in (first, second):
        folder.mkdir(parents=True)
    gone = out / ".store" / "k3" / "vectors.safetensors"
    gone.parent.mkdir()
    gone.write_bytes(b"")
    task = Measured(name="listen", margin=1.0)
    link_results(out, [(task, TaskResult(artifacts={"model": str(first)})),
                       (task, TaskResult(artifacts={"vectors": str(gone)}))])
    link = out / "listen" / "model"
    assert link.resolve() == first.resolve() and not Path(os.readlink(link)).is_absolute()
    shutil.rmtree(gone.parent)  # e.g. `behaviorc clean --unused`
    link_results(out, [(task, TaskResult(artifacts={"model": str(second), "base": str(tmp_path)}))])
    assert link.resolve() == second.resolve()
    assert sorted(p.name for p in (out / "listen").iterdir()) == ["model"]  # no staging left, k3's gone


def test_build_plots_are_pngs_beside_the_results_and_one_strength_is_no_curve(tmp_path, recwarn):
    from behaviorc.pipeline.plots import LOSS_PNG, SWEEP_PNG, write_build_plots
    from behaviorc.tui.state import BuildState

    state = BuildState()
    for step in range(1, 6):
        state.apply({"t": step, "type": "train.step", "task": "train:happy", "step": step, "steps": 5,
                     "loss": 1.0 / step})
    state.apply({"t": 6, "type": "train.eval", "task": "train:happy", "step": 5, "margin": 0.2})
    for strength, margin in ((0.0, -0.3), (2.0, 0.1), (4.0, 0.4)):
        state.apply({"t": 7, "type": "steer.point", "task": "steer.verify:happy", "strength": strength,
                     "margin": margin, "general_nll": 3.0 + strength / 10})
    state.apply({"t": 8, "type": "steer.point", "task": "steer.verify:lone", "strength": 2.0, "margin": 0.1})
    written = write_build_plots(tmp_path, state)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [f"happy/{LOSS_PNG}", f"happy/{SWEEP_PNG}"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_help_teaches_what_the_command_needs_without_repeating_the_steering_essay(capsys):
    import pytest

    for argv, wanted, unwanted in ((["steer", "push", "--help"], "steer push http://", "pca_center"),
                                   (["steer", "--help"], "pca_center", None),
                                   (["serve", "--help"], "smollm2-135m", None)):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert wanted in text and (unwanted is None or unwanted not in text), text
