"""Behavior claims on a real chat model, smollm2-135m: `make demo`'s spec, built up to
its distillation (the reply table after it is `make demo`'s to show).

One build (minutes of CPU) checks what the issue promises a user: steering by the
spec's pairs raises the held-out margin clearly, and distilling the steered model into
the weights keeps at least half of that gain with the steering removed while the general
NLL rises by less than 10%; the build shows what each model says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from behaviorc.cli import main

DEMO = Path(__file__).resolve().parents[1] / "specs" / "demo.behavior"


@pytest.mark.slow
def test_demo_steers_distils_and_keeps_the_behavior_without_steering(smollm2, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["build", str(DEMO), "--out", str(out), "--only", "train:cheerful"]) == 0
    printed = capsys.readouterr().out
    tasks = {t["id"]: t for t in json.loads((out / "report.json").read_text())["tasks"]}

    train = tasks["train:cheerful"]
    metrics = train["metrics"]
    gain = metrics["margin_steered"] - metrics["margin_before"]
    assert gain > 0.3
    assert metrics["margin_after"] - metrics["margin_before"] >= 0.5 * gain
    assert metrics["steered_share"] >= 0.5
    assert metrics["general_nll_after"] < 1.10 * metrics["general_nll_before"]

    replies = train["data"]["replies"]
    assert len(replies) == 3
    for row in replies:
        assert all(row[model].strip() for model in ("base", "steered", "trained"))
        assert f"prompt: {row['prompt']}" in printed
    assert any(row["steered"] != row["base"] for row in replies)
    assert any(row["trained"] != row["base"] for row in replies)
