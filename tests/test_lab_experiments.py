"""Each `behaviorc experiment` runs end to end on the testbed with a reduced grid, and its
results.json reads back with the fields its plots and summary use; bad options are
located errors. All experiments share one result folder, so the base model's points are
measured once and reused (which also exercises the executor's cache)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from behaviorc.cli import main

SPECS = Path(__file__).resolve().parent.parent / "specs"


@pytest.fixture(scope="module")
def spec(tmp_path_factory, testbed) -> Path:
    """specs/testbed_listen.behavior with its data paths made absolute."""
    text = (SPECS / "testbed_listen.behavior").read_text().replace('"data/', f'"{SPECS}/data/')
    path = tmp_path_factory.mktemp("spec") / "testbed.behavior"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


# Points this small cost less than starting a worker process (an interpreter importing
# torch): they run in the test's process, except where running them side by side is
# what a test is about.
REDUCED = ["--seeds", "2", "--samples", "1", "--prompts", "8", "--steps", "3", "--jobs", "1"]


def run(name: str, spec: Path, out: Path, *options: str) -> dict:
    assert main(["experiment", name, str(spec), "--out", str(out), *options]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name
    for plot in results["plots"]:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    # an answer, or a plain statement that the points measured cannot give one
    assert "**Answer:**" in summary or "**The data cannot support a conclusion:**" in summary
    return results


FIRST_RUNS: dict[str, dict] = {}


def test_sample_efficiency(spec, out):
    results = run("sample-efficiency", spec, out, "--grid", "5,20", *REDUCED, "--jobs", "2")
    FIRST_RUNS["sample-efficiency"] = results
    assert results["measure"] == "rate" and results["grid"] == [5, 20]
    for row in results["points"]:
        assert len(row["after"]) == 2
        change = row["change"]
        assert change["low"] <= change["mean"] <= change["high"]
        assert row["distinguishable"] == (change["low"] > 0 or change["high"] < 0)
    assert results["smallest_n"] in (None, 5, 20)


def dashboard_view(folder: Path) -> tuple[str, dict[str, str], list[str], str]:
    """What `behaviorc dash FOLDER` shows once it read the whole log: the status line,
    the plan tree's task labels and branch names, and the Train panel's text."""
    from rich.console import Console

    from behaviorc.tui.app import Dashboard
    from behaviorc.tui.widgets import PlanTree, StatePanel

    async def drive() -> tuple[str, dict[str, str], list[str], str]:
        app = Dashboard(folder)
        lines = len((folder / "events.jsonl").read_text().splitlines())
        async with app.run_test(size=(100, 40)) as pilot:
            for _ in range(400):
                await pilot.pause(0.02)
                if app.state.events_seen >= lines:
                    break
            await pilot.pause(0.15)  # one more redraw after the last batch
            tree = app.query_one(PlanTree)
            console = Console(width=100, record=True, file=open(os.devnull, "w"))
            console.print(app.query_one("#train-view", StatePanel).draw(app.state))
            return (app.status_line(), tree.labels(), [str(b.label) for b in tree.root.children],
                    console.export_text())

    return asyncio.run(drive())


def test_the_dashboard_shows_an_experiment_while_it_runs_and_once_it_ended(out, tmp_path):
    """`behaviorc dash` on test_sample_efficiency's folder: every point a task, a loss
    curve per training, the measured points' numbers; and on the log cut in the middle
    of the run, as a dashboard following it sees it then."""
    if "sample-efficiency" not in FIRST_RUNS:
        pytest.skip("reads test_sample_efficiency's folder: run the module")
    results = FIRST_RUNS["sample-efficiency"]
    report = json.loads((out / "report.json").read_text())
    ids = [t["id"] for t in report["tasks"]]
    trains = [i for i in ids if i.startswith("train:")]
    status, labels, branches, train_panel = dashboard_view(out)
    assert status == f"testbed.behavior · ok · {len(ids)}/{len(ids)} tasks"
    assert set(labels) == set(ids) and all(label.startswith("✓") for label in labels.values())
    assert "listen[n=5,seed=0]" in branches  # point names are not read as markup
    assert len(trains) == 4
    for train in trains:
        assert f"{train}  [done]" in train_panel
    assert train_panel.count("loss ") == 4 and train_panel.count("step 3: ") == 4
    assert "measured points  6/6" in train_panel
    for seed, rate in zip(results["seeds"], results["before"]):
        assert re.search(rf"listen\[base,seed={seed}\] +{rate:.3f} ", train_panel)
    for row in results["points"]:
        for seed, rate in zip(results["seeds"], row["after"]):
            assert re.search(rf"listen\[n={row['n']},seed={seed}\] +{rate:.3f} ", train_panel)

    # the same log up to the first training's end, the build still holding its store
    events = (out / "events.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(events)
               if '"type": "task_end"' in line and '"task": "train:' in line)
    live = tmp_path / "live"
    (live / ".store").mkdir(parents=True)
    (live / ".store" / "lock").write_text(f"{os.getpid()}\n")  # as a running build leaves it
    (live / "events.jsonl").write_text("".join(events[:cut + 1]))
    so_far = [json.loads(line) for line in events[:cut + 1]]
    finished = sum(e["type"] == "task_end" for e in so_far)
    measured = sum(e["type"] == "experiment.point" for e in so_far)
    status, labels, _, train_panel = dashboard_view(live)
    head, *running = status.split(" | ")  # then what each running task is doing
    assert head == f"testbed.behavior · running · {finished}/{len(ids)} tasks"
    assert all(": " in part for part in running)
    assert sum(label.startswith("✓") for label in labels.values()) == finished
    assert sum(label.startswith("·") for label in labels.values()) > 0  # points still to come
    assert f"measured points  {measured}/6" in train_panel
    first_train = json.loads(events[cut])["task"]
    assert f"{first_train}  [done]" in train_panel and train_panel.count("step 3: ") >= 1


def test_points_run_one_at_a_time_give_the_same_numbers_as_run_side_by_side(spec, tmp_path):
    if "sample-efficiency" not in FIRST_RUNS:
        pytest.skip("compares with test_sample_efficiency's run: run the module")
    # seed 0's points only (the same tasks as there): the base model, and N=5 trained
    serial = run("sample-efficiency", spec, tmp_path, "--grid", "5", *REDUCED, "--seeds", "1")
    report = json.loads((tmp_path / "report.json").read_text())
    assert {t["status"] for t in report["tasks"]} == {"done"}  # computed again, here
    side_by_side = FIRST_RUNS["sample-efficiency"]
    assert serial["before"] == side_by_side["before"][:1]
    for field in ("after", "margin_after"):
        assert serial["points"][0][field] == side_by_side["points"][0][field][:1]


def test_lr_sweep(spec, out):
    results = run("lr-sweep", spec, out, "--lrs", "1e-4,1e-3", *REDUCED)
    assert [row["lr"] for row in results["points"]] == [1e-4, 1e-3]
    for row in results["points"]:
        assert {"gain", "nll_cost", "within_cost"} <= set(row)
    assert results["best_lr"] in (None, 1e-4, 1e-3)
    assert results["best_at_edge"] in (None, "low", "high")


def test_backward_transfer(spec, out):
    results = run("backward-transfer", spec, out, "--mix", "0.25", *REDUCED)
    assert results["metrics"] == ["general_nll", "rate", "arithmetic_accuracy"]
    assert [arm["arm"] for arm in results["arms"]] == ["no mix", "mix 0.25"]
    # the mixed arm draws the train's `mix general` texts, the NLL reads the eval's: another
    # draw of the testbed's dialogues, which shares some texts with the first
    mixed, measured = ({json.loads(line)["text"] for line in (SPECS / "data" / name).open()}
                       for name in ("testbed_general.jsonl", "testbed_general_eval.jsonl"))
    assert results["measured_texts_mixed"] == len(mixed & measured) < len(measured)
    accuracy = results["arms"][0]["arithmetic_accuracy"]
    assert all(0.6 < v <= 1 for v in accuracy["before"])  # the testbed knows its sums


def test_gdn_state(spec, out):
    results = run("gdn-state", spec, out, "--probes", "4", "--seeds", "1", "--steps", "3", "--jobs", "1")
    assert results["layers"] == [1, 2]  # the GDN layers after the steering layer 0
    for row in results["points"]:
        assert len(row["alignment_values"]) == 4 and len(row["control_values"]) == 4
        assert -1 <= row["alignment"]["mean"] <= 1
        assert row["state_change_norm"] > 0 and row["steer_change_norm"] > 0
        assert row["direction_shaped"] == (row["alignment"]["low"] > 0 and row["above_control"])
    assert results["direction_shaped"] == any(r["direction_shaped"] for r in results["points"])


def test_steer_complexity(spec, out):
    results = run("steer-complexity", spec, out, "--strengths", "0,4", "--seeds", "1", "--samples", "1",
                  "--prompts", "16", "--jobs", "1")
    assert [b["behavior"] for b in results["behaviors"]] == ["concise", "listen"]
    # one nonzero strength: the summary says that is too little to conclude from
    assert "**The data cannot support a conclusion:** one nonzero strength (4)" in (out / "summary.md").read_text()
    for entry in results["behaviors"]:
        assert [p["strength"] for p in entry["points"]] == [0.0, 4.0]
        assert entry["points"][0]["nll_cost"] == 0
        assert {"margin", "rate", "rate_change"} <= set(entry["points"][1])


def test_a_finished_experiment_reruns_from_the_store(spec, out):
    again = run("sample-efficiency", spec, out, "--grid", "5,20", *REDUCED)
    report = json.loads((out / "report.json").read_text())
    assert {t["status"] for t in report["tasks"]} == {"cached"}
    if "sample-efficiency" in FIRST_RUNS:
        assert again["points"] == FIRST_RUNS["sample-efficiency"]["points"]


@pytest.mark.parametrize("options, message", [
    (["sample-efficiency", "--grid", ""], "--grid is empty"),
    (["sample-efficiency", "--grid", "10,x"], "whole numbers"),
    (["sample-efficiency", "--grid", "100000"], "has 500"),
    (["lr-sweep", "--lrs", "0,1e-4"], "greater than 0"),
    (["lr-sweep", "--lr-min", "0"], "greater than 0"),
    (["lr-sweep", "--points", "0"], "at least 1"),
    (["backward-transfer", "--mix", "1.5"], "between 0 and 1"),
    (["sample-efficiency", "--behavior", "lisen"], "did you mean `listen`"),
    (["sample-efficiency", "--behavior", "concise"], "has no train section"),
    (["steer-complexity", "--simple", "listen"], "both name"),
    (["sample-efficiency", "--seeds", "0"], "--seeds must be at least 1"),
    (["sample-efficiency", "--score", "none", "--seeds", "1"], "the margin is computed, not sampled"),
    (["lr-sweep", "--seeds", "1"], "it needs --seeds 2 or more, not 1"),
    (["sample-efficiency", "--jobs", "0"], "--jobs must be at least 1"),
    (["sample-efficiency", "--jobs", "many"], "or `auto`, not `many`"),
])
def test_bad_options_are_clear_errors(spec, tmp_path, capsys, options, message):
    name, *rest = options
    assert main(["experiment", name, str(spec), "--out", str(tmp_path / "x"), *rest]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "results.json").exists()


def _margin_only_results(strengths: list[float]) -> dict:
    """steer-complexity's results as a model without a reply scorer gives them."""
    def entry(role: str, name: str) -> dict:
        points = [{"strength": s, "margin": -0.3 + 0.2 * s, "general_nll": 3.0 + 0.1 * s, "nll_cost": 0.1 * s}
                  for s in strengths]
        return {"spec": "s.behavior", "behavior": name, "model": "smollm2-135m", "measure": "margin",
                "score": None, "held_out_prompts": 0, "eval_pairs": 6, "role": role, "points": points,
                "best_strength": strengths[-1]}
    return {"experiment": "steer-complexity", "spec": "s.behavior", "model": "smollm2-135m",
            "strengths": strengths, "seeds": [0, 1], "max_nll_cost": 0.5, "notes": ["nothing is sampled"],
            "behaviors": [entry("simple", "concise"), entry("complex", "listen")]}


def test_steer_complexity_on_margins_alone_draws_no_empty_plot_and_one_strength_concludes_nothing(
        tmp_path, recwarn):
    from behaviorc.lab import steer_complexity
    from behaviorc.lab.common import write_results

    one = _margin_only_results([0.0, 2.0])
    text = steer_complexity.summary(one)
    assert "**The data cannot support a conclusion:** one nonzero strength (2)" in text
    assert "**Answer:**" not in text and "- note: nothing is sampled" in text
    assert "**Answer:** steering works for both" in steer_complexity.summary(_margin_only_results([0.0, 1.0, 2.0]))

    plots = steer_complexity.plots(one)
    assert [name for name, _ in plots] == ["steer_margin.png", "steer_nll_cost.png"]  # no rate was measured
    write_results(tmp_path, one, text, plots)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
