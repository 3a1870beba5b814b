"""The experiments on the real model, SmolLM2-135M-Instruct: no exact scorer reads its
replies, so a point is measured by its margin, and summary.md says so. The smallest
sample-efficiency grid that still answers something: one N, two seeds (a margin's
interval needs two), two training steps. And gdn-state refuses this model, which has
no GDN layers, before it trains anything."""

from __future__ import annotations

import json
from pathlib import Path

from behaviorc.cli import main

SPEC = Path(__file__).resolve().parent.parent / "specs" / "real_experiments.behavior"


def test_sample_efficiency_measures_margins_on_the_real_model(smollm2, tmp_path):
    out = tmp_path / "se"
    assert main(["experiment", "sample-efficiency", str(SPEC), "--grid", "2", "--seeds", "2", "--steps", "2",
                 "--jobs", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["model"], results["measure"], results["score"]) == ("smollm2-135m", "margin", "")
    assert results["held_out_prompts"] == 0 and results["eval_pairs"] == 5
    report = json.loads((out / "report.json").read_text())
    trained = {t["id"]: t["metrics"] for t in report["tasks"] if t["id"].startswith("train:")}
    measured = [t for t in report["tasks"] if t["id"].startswith("experiment.measure:")]
    assert len(trained) == 2 and len(measured) == 3  # the base model measured once, for both seeds
    (row,) = results["points"]
    for seed, after in zip(results["seeds"], row["after"]):
        # the point's margin is the trained model's own, as its training measured it
        assert abs(after - trained[f"train:listen[n=2,seed={seed}]"]["margin_after"]) < 1e-4
        assert trained[f"train:listen[n=2,seed={seed}]"]["margin_before"] == results["before"][seed]
    # two listen examples, two steps: the listen margin rises under both seeds
    assert min(row["after"]) > results["before"][0], (row["after"], results["before"])
    change = row["change"]
    assert change["low"] <= change["mean"] <= change["high"] and change["low"] < change["high"]
    summary = (out / "summary.md").read_text()
    assert "**Measure:** the margin, not a generation rate" in summary
    assert "over 5 eval pairs" in summary and "smollm2-135m has no exact scorer" in summary


def test_gdn_state_refuses_a_model_without_gdn_layers_before_training(smollm2, tmp_path, capsys):
    out = tmp_path / "gdn"
    assert main(["experiment", "gdn-state", str(SPEC), "--jobs", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    # located where the model is declared, in the file real_experiments.behavior imports
    assert "specs/listen.behavior:6:7: error: model `base` (smollm2-135m, Llama, 30 attention layers) has no " \
        "Gated DeltaNet layers" in err
    assert "Traceback" not in err
    report = json.loads((out / "report.json").read_text())
    assert [t["id"] for t in report["tasks"]] == ["model:base"]
    assert not (out / "results.json").exists()
