"""The plan's task-vector tasks, run by the real executor on tiny-gdn."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.core import ir
from behaviorc.core.diagnostics import Location
from behaviorc.pipeline.kinds import (
    ComposeBehaviors, ExtractSteering, ExtractTaskVector, ImportModel, ImportTaskVector,
    ResolveModel)
from behaviorc.pipeline.executor import Executor
from behaviorc.formats.steering import load_steering
from behaviorc.core.files import sha256_file
from behaviorc.compose.taskvector import extract_task_vector
from test_compose_models import perturbed_copy

PAIRS = (ir.Pair(prompt="I will use", positive=" the existing parser.", negative=" a new parser."),
         ir.Pair(prompt="We should", positive=" keep the old code.", negative=" change the plan."))


def at(spec, line: int) -> Location:
    return Location(file=str(spec), line=line, column=3, end_line=line, end_column=20)


SPEC_SHA256 = "5bec" * 16

@pytest.fixture
def plan(tmp_path, tiny_gdn):
    spec = tmp_path / "persona.behavior"
    spec.write_text("model base = \"tiny-gdn\"\n# behaviors a and b\n" + "\n" * 8)
    tuned_a = perturbed_copy(tiny_gdn, tmp_path / "tuned_a", seed=1)
    tuned_b = perturbed_copy(tiny_gdn, tmp_path / "tuned_b", seed=2,
                             touch=lambda name: "linear_attn" in name)
    extract_task_vector(tiny_gdn, tuned_b, tmp_path / "b.safetensors")
    model = ResolveModel(name="base", decl=ir.ModelDecl(name="base", source="tiny-gdn",
                                                       kind="builtin"))
    imported = ImportModel(name="a", external=ir.External(
        kind="model", path=str(tuned_a), fingerprint="a1", loc=at(spec, 3)))
    vector_a = ExtractTaskVector(name="a", model=model, finetuned=imported)
    vector_b = ImportTaskVector(name="b", model=model, external=ir.External(
        kind="task_vector", path=str(tmp_path / "b.safetensors"), loc=at(spec, 5)))
    steering_a = ExtractSteering(name="a", model=model, layers=(1, 2), method="mean_diff",
                                 read="mean", pairs=PAIRS)
    composition = ir.Compose(
        name="persona", model="base", expression="a - b * 0.5",
        terms=(ir.Term(behavior="a", weight=1.0), ir.Term(behavior="b", weight=-0.5)),
        merge=ir.Merge(method="ties", density=0.5, groups=("gdn.proj", "gdn.gates", "mlp")),
        loc=at(spec, 7))
    composed = ComposeBehaviors(name="persona", model=model, compose=composition,
                                vectors=(vector_a, vector_b), steering=(steering_a,),
                                steering_strengths=(4.0,))
    return spec, composed


def test_a_composition_builds_with_provenance_and_steering(plan, tmp_path):
    spec, composed = plan
    outcome = Executor(tmp_path / "out", spec_sha256=SPEC_SHA256).run([composed])
    assert outcome.ok, [r.error for r in outcome.records]
    vector_a, vector_b = composed.vectors
    extracted = outcome.record(vector_a.id).result
    assert extracted.data["sha256"] == sha256_file(extracted.path("task_vector"))
    assert outcome.record(vector_b.id).result.path("task_vector") == tmp_path / "b.safetensors"

    result = outcome.record(composed.id).result
    folder = result.path("model")
    provenance = json.loads((folder / "behaviorc.json").read_text())
    assert provenance == result.data["provenance"]
    assert provenance["spec"] == {"path": str(spec), "sha256": SPEC_SHA256}
    assert provenance["expression"] == "a - b * 0.5"
    assert [(t["behavior"], t["weight"], t["sha256"]) for t in provenance["terms"]] == [
        ("a", 1.0, extracted.data["sha256"]), ("b", -0.5, sha256_file(tmp_path / "b.safetensors"))]
    assert provenance["merge"]["groups"] == ["gdn.proj", "gdn.gates", "mlp"]
    # Attention and embeddings are outside the groups: they stay the base's.
    base = load_file(outcome.record(composed.model.id).result.data["path"] + "/model.safetensors")
    merged = load_file(folder / "model.safetensors")
    assert torch.equal(merged["model.layers.3.self_attn.q_proj.weight"],
                       base["model.layers.3.self_attn.q_proj.weight"])
    assert not torch.equal(merged["model.layers.0.linear_attn.in_proj_qkvz.weight"],
                           base["model.layers.0.linear_attn.in_proj_qkvz.weight"])

    # Only `a` steers, so the composed steering is its weight (1.0) times its strength
    # (4.0) times a's vector.
    steering = load_steering(result.path("steering"))
    original = load_steering(outcome.record(composed.steering[0].id).result.path("vectors"))
    assert steering.layers == original.layers == (1, 2)
    for layer in steering.layers:
        assert torch.equal(steering.directions[layer], 4.0 * original.directions[layer])

    again = Executor(tmp_path / "out").run([composed])
    assert {r.status for r in again.records} == {"cached"}


def test_a_vector_that_does_not_fit_fails_at_its_spec_line(plan, tmp_path):
    spec, composed = plan
    tensors = load_file(tmp_path / "b.safetensors")
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3)
    save_file(tensors, tmp_path / "b.safetensors")
    outcome = Executor(tmp_path / "out").run([composed])
    failed = outcome.record(composed.vectors[1].id)
    assert failed.status == "failed" and not failed.internal
    assert failed.loc == at(spec, 5)
    assert f"`{name}` has shape [3]" in failed.error
    assert outcome.record(composed.id).status == "skipped"


def test_an_imported_folder_that_is_not_a_model_fails_at_its_spec_line(plan, tmp_path):
    spec, composed = plan
    (tmp_path / "tuned_a" / "tokenizer.json").unlink()
    (tmp_path / "tuned_a" / "tokenizer_config.json").unlink()
    outcome = Executor(tmp_path / "out").run([composed.vectors[0]])
    failed = outcome.record(composed.vectors[0].finetuned.id)
    assert failed.status == "failed" and failed.loc == at(spec, 3)
    assert "has no tokenizer" in failed.error
