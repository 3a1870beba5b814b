"""Verification, the plan's steering tasks run by the real executor, and spec errors."""

from __future__ import annotations

import json

import pytest
import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
from behaviorc.measure.margin import behavior_margin
from behaviorc.pipeline.kinds import ExtractSteering, MeasureBase, ResolveModel, TrainBehavior, VerifySteering
from behaviorc.steer.extract import extract
from behaviorc.formats.steering import load_steering, read_gguf
from behaviorc.steering_vectors import SteeringVectors
from behaviorc.steer.verify import check_fits, verify
from test_steer_extract import engine, planted_pairs, tied_gdn  # noqa: F401 (fixtures)

GENERAL = DEFAULT_GENERAL_TEXTS[:2]
LOC = Location(file="listen.behavior", line=6, column=5, end_line=6, end_column=14)


def test_verify_measures_off_on_and_a_sweep_and_clears_steering(engine):
    train, held = planted_pairs(8), planted_pairs(4, offset=3)
    vectors = extract(engine, train, [2]).vectors
    seen = []
    result = verify(engine, vectors, 4.0, held, GENERAL, sweep=(4.0, -4.0, 0.0),
                    on_point=lambda point, done, total: seen.append((point.strength, done, total)))
    assert result.before.strength == 0.0 and result.steered.strength == 4.0
    assert result.steered.margin > result.before.margin + 0.1
    assert [p.strength for p in result.sweep] == [-4.0, 0.0, 4.0]
    margins = [p.margin for p in result.sweep]
    assert margins == sorted(margins)  # the margin rises with the strength
    assert result.sweep[1] == result.before and result.sweep[2] == result.steered
    assert all(p.general_nll > 0 for p in result.sweep)
    # each strength measured once: 0, 4 and -4
    assert seen == [(0.0, 1, 3), (4.0, 2, 3), (-4.0, 3, 3)]
    assert behavior_margin(engine, held) == pytest.approx(result.before.margin, abs=1e-6)


def test_vectors_that_do_not_fit_the_model_are_refused(engine):
    wide = SteeringVectors({1: torch.ones(64)}, method="mean_diff", model="other")
    with pytest.raises(BehaviorError, match="hidden size 64") as caught:
        check_fits(engine, wide, LOC)
    assert caught.value.diagnostics[0].loc == LOC
    deep = SteeringVectors({9: torch.ones(engine.info.hidden_size)}, method="mean_diff", model="m")
    with pytest.raises(BehaviorError, match="layer 9"):
        verify(engine, deep, 4.0, planted_pairs(2), GENERAL)


def _plan(folder, layers, held_out=4, strength=4.0):
    decl = ir.ModelDecl(name="base", source=str(folder), kind="folder")
    model = ResolveModel(name="base", decl=decl)
    extraction = ExtractSteering(name="yes", model=model, layers=layers, method="mean_diff",
                                 read="mean", pairs=tuple(planted_pairs(8)), loc=LOC)
    base = MeasureBase(name="yes", model=model, pairs=tuple(planted_pairs(held_out, offset=3)),
                       general=tuple(GENERAL), loc=LOC)
    verification = VerifySteering(name="yes", model=model, vectors=extraction, base=base,
                                  strength=strength, sweep=(0.0, 2.0, 4.0), loc=LOC)
    return extraction, verification


def test_tasks_under_the_executor_write_artifacts_and_report_metrics(tied_gdn, tmp_path):
    from behaviorc.pipeline.executor import Executor

    extraction, verification = _plan(tied_gdn, "auto")
    outcome = Executor(tmp_path / "out").run([verification])
    assert outcome.ok, [r.error for r in outcome.records]
    extracted = outcome.record(extraction.id).result
    chosen = extracted.data["chosen"]
    assert extracted.data["layers"] == [chosen] and chosen > 0
    assert extracted.metrics["layer"] == chosen  # on the task's terminal line
    assert [s["layer"] for s in extracted.data["scores"]] == [0, 1, 2, 3]
    vectors = load_steering(extracted.path("vectors"))
    assert vectors.layers == (chosen,) and vectors.extra["task_key"] == extraction.key
    assert extracted.data["norms"][str(chosen)] == pytest.approx(vectors.norms[chosen])
    assert extracted.data["relative_norms"][str(chosen)] > 0
    control = read_gguf(extracted.path("control_vector"))
    assert torch.equal(control.directions[chosen], vectors.directions[chosen])

    verified = outcome.record(verification.id).result
    metrics = verified.metrics
    assert metrics["margin_steered"] > metrics["margin_before"] + 0.1
    # nothing is "after" a steering: only training reports margin_after
    assert "margin_after" not in metrics
    measured = outcome.record(verification.base.id).result
    assert verified.data["before"]["margins"] == measured.data["point"]["margins"]
    assert metrics["margin_before"] == measured.metrics["margin_before"]
    # the capability probe runs with steering off and at the strength used only
    assert [p["capability"] is not None for p in verified.data["sweep"]] == [True, False, True]
    assert {"general_nll_before", "general_nll_steered"} <= set(metrics)
    assert [p["strength"] for p in verified.data["sweep"]] == [0.0, 2.0, 4.0]
    report = json.loads(outcome.report_path.read_text())
    assert report["ok"] is True
    events = [json.loads(line) for line in outcome.events_path.read_text().splitlines()]
    assert sum(e["type"] == "steer.point" for e in events) == 3

    # a rebuild runs nothing again
    again = Executor(tmp_path / "out").run([verification])
    assert {r.status for r in again.records} == {"cached"}
    # another strength reruns the verification alone: the base model is not measured again
    _, weaker = _plan(tied_gdn, "auto", strength=2.0)
    rerun = Executor(tmp_path / "out").run([weaker])
    assert {r.task.id: r.status for r in rerun.records} == {
        "model:base": "cached", extraction.id: "cached", verification.base.id: "cached",
        verification.id: "done"}
    assert rerun.record(verification.id).result.metrics["margin_before"] == metrics["margin_before"]


def test_layer_zero_stays_in_the_safetensors_and_out_of_the_gguf(tied_gdn, tmp_path):
    from behaviorc.pipeline.executor import Executor

    extraction, _ = _plan(tied_gdn, (0, 2))
    outcome = Executor(tmp_path / "out").run([extraction])
    result = outcome.record(extraction.id).result
    assert load_steering(result.path("vectors")).layers == (0, 2)
    assert result.data["control_vector_layers"] == [2]
    assert read_gguf(result.path("control_vector")).layers == (2,)


def test_a_layer_out_of_range_at_run_time_fails_the_task_at_the_spec_line(tied_gdn, tmp_path):
    from behaviorc.pipeline.executor import Executor

    extraction, verification = _plan(tied_gdn, (2, 7))
    outcome = Executor(tmp_path / "out").run([verification])
    failed = outcome.record(extraction.id)
    assert failed.status == "failed" and not failed.internal
    assert failed.loc == LOC
    assert "layer 7 is out of range" in failed.error
    assert outcome.record(verification.id).status == "skipped"


def test_a_spec_with_bad_pairs_gets_located_diagnostics(tmp_path):
    from behaviorc.lang.check import check_text

    (tmp_path / "pairs.jsonl").write_text(
        '{"prompt": "Q?", "positive": " yes", "negative": " no"}\n'
        '{"prompt": "Q?", "positive": " yes"}\n')
    text = """model base = "tiny-gdn"

behavior yes {
  steer {
    layers 1
    pair "Q?" {
      positive " same"
      negative " same"
    }
    pairs "pairs.jsonl"
  }
}
"""
    path = tmp_path / "bad.behavior"
    path.write_text(text)
    spec, diagnostics = check_text(text, str(path))
    assert spec is None
    errors = [d for d in diagnostics if d.severity == "error"]
    assert any("same text" in d.message and d.loc and d.loc.line in (6, 7, 8) for d in errors)
    assert any("pairs.jsonl:2" in d.message and "negative" in d.message and d.loc and d.loc.line == 10
               for d in errors), [d.render() for d in errors]


@pytest.mark.vllm
def test_verify_on_a_live_vllm_server_agrees_with_the_embedded_engine(vllm_server):
    """The same code verifies against a live server: margins off and on match the
    embedded engine on the same weights (both bfloat16), and the server's steering is
    cleared afterwards."""
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.vllm.client import VLLMEngine

    embedded = EmbeddedEngine.load(vllm_server.model_dir, dtype="bfloat16")
    vectors = extract(embedded, planted_pairs(8), [2]).vectors
    # A strength that moves this random model's margin well past bfloat16 rounding.
    strength = 4.0 / vectors.norms[2]
    held = planted_pairs(4, offset=3)
    local = verify(embedded, vectors, strength, held, GENERAL, sweep=(strength,))
    assert abs(local.steered.margin - local.before.margin) > 0.1
    with VLLMEngine(vllm_server.url) as live:
        served = verify(live, vectors, strength, held, GENERAL, sweep=(strength,))
        assert served.before.margin == pytest.approx(local.before.margin, abs=0.03)
        assert served.steered.margin == pytest.approx(local.steered.margin, abs=0.03)
        assert served.steered.general_nll == pytest.approx(local.steered.general_nll, abs=0.03)
        assert behavior_margin(live, held) == pytest.approx(served.before.margin, abs=1e-6)


def test_distilling_with_strength_auto_trains_at_the_strength_verification_chose(tied_gdn, tmp_path):
    """`strength auto` beside `distill steering`: the verification chooses inside the
    budget, the training reads that choice from its result and measures its steered
    margin there (the same held-out pairs, so the same margin)."""
    from behaviorc.pipeline.executor import Executor
    from test_train_distill import HELD_OUT, TRAIN, distill_spec

    decl = ir.ModelDecl(name="base", source=str(tied_gdn), kind="folder")
    model = ResolveModel(name="base", decl=decl)
    extraction = ExtractSteering(name="yes", model=model, layers=(2,), method="mean_diff",
                                 read="mean", pairs=tuple(planted_pairs(8)), loc=LOC)
    base = MeasureBase(name="yes", model=model, pairs=HELD_OUT, general=tuple(GENERAL), loc=LOC)
    verification = VerifySteering(name="yes", model=model, vectors=extraction, base=base,
                                  strength="auto", sweep=(1.0, 4.0), loc=LOC)
    train = TrainBehavior(name="yes", model=model, eval_pairs=HELD_OUT, general=tuple(GENERAL),
                          train=TRAIN.model_copy(update={"distill": distill_spec(samples=1), "steps": 1}),
                          steering=extraction, strength_from=verification, loc=LOC)
    outcome = Executor(tmp_path / "out").run([train])
    assert outcome.ok, [r.error for r in outcome.records]
    verified = outcome.record(verification.id).result
    chosen = verified.data["strength"]
    assert chosen in (1.0, 4.0) and verified.data["choice"].startswith(f"strength {chosen:g}")
    margins = {p["strength"]: p["margin"] for p in verified.data["sweep"]}
    assert margins[1.0] != pytest.approx(margins[4.0], abs=1e-3)
    trained = outcome.record(train.id).result.metrics
    assert trained["margin_steered"] == pytest.approx(margins[chosen], abs=1e-5)
