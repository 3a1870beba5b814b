"""Each `behaviorc experiment` runs end to end on the testbed with a reduced grid, and its
results.json reads back with the fields its plots and summary use; bad options are
located errors. All experiments share one result folder, so the base model's points are
measured once and reused (which also exercises the executor's cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from behaviorc.cli import main

SPECS = Path(__file__).resolve().parent.parent / "specs"


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    """specs/testbed_listen.behavior with its data paths made absolute."""
    from behaviorc.model.builtin import ensure_builtin

    ensure_builtin("tiny-gdn-testbed")
    text = (SPECS / "testbed_listen.behavior").read_text().replace('"data/', f'"{SPECS}/data/')
    path = tmp_path_factory.mktemp("spec") / "testbed.behavior"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


REDUCED = ["--seeds", "2", "--samples", "1", "--prompts", "16", "--steps", "3"]


def run(name: str, spec: Path, out: Path, *options: str) -> dict:
    assert main(["experiment", name, str(spec), "--out", str(out), *options]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name
    for plot in results["plots"]:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert "**Answer:**" in (out / "summary.md").read_text()
    return results


FIRST_RUNS: dict[str, dict] = {}


def test_sample_efficiency(spec, out):
    results = run("sample-efficiency", spec, out, "--grid", "5,20", *REDUCED)
    FIRST_RUNS["sample-efficiency"] = results
    assert results["measure"] == "rate" and results["grid"] == [5, 20]
    for row in results["points"]:
        assert len(row["after"]) == 2
        change = row["change"]
        assert change["low"] <= change["mean"] <= change["high"]
        assert row["distinguishable"] == (change["low"] > 0 or change["high"] < 0)
    assert results["smallest_n"] in (None, 5, 20)


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
    accuracy = results["arms"][0]["arithmetic_accuracy"]
    assert all(0.6 < v <= 1 for v in accuracy["before"])  # the testbed knows its sums


def test_gdn_state(spec, out):
    results = run("gdn-state", spec, out, "--probes", "4", "--seeds", "1", "--steps", "3")
    assert results["layers"] == [1, 2]  # the GDN layers after the steering layer 0
    for row in results["points"]:
        assert len(row["alignment_values"]) == 4 and len(row["control_values"]) == 4
        assert -1 <= row["alignment"]["mean"] <= 1
        assert row["state_change_norm"] > 0 and row["steer_change_norm"] > 0
        assert row["direction_shaped"] == (row["alignment"]["low"] > 0 and row["above_control"])
    assert results["direction_shaped"] == any(r["direction_shaped"] for r in results["points"])


def test_steer_complexity(spec, out):
    results = run("steer-complexity", spec, out, "--strengths", "0,4", "--seeds", "1", "--samples", "1",
                  "--prompts", "16")
    assert [b["behavior"] for b in results["behaviors"]] == ["concise", "listen"]
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
])
def test_bad_options_are_clear_errors(spec, tmp_path, capsys, options, message):
    name, *rest = options
    assert main(["experiment", name, str(spec), "--out", str(tmp_path / "x"), *rest]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "results.json").exists()
