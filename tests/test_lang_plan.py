"""Lowering: the tasks of each example, verification splits, cache keys."""

from __future__ import annotations

import json
from pathlib import Path

from behaviorc.lang import check_text, load_spec
from behaviorc.pipeline.lower import lower
from behaviorc.pipeline.kinds import (ComposeBehaviors, DeployModel, ExtractTaskVector, ImportModel,
                                  ImportTaskVector, ResolveModel)

SPECS = Path(__file__).resolve().parent.parent / "specs"
# Tiny-model copies of the example specs (the examples in specs/ run on smollm2-135m).
TINY_SPECS = Path(__file__).resolve().parent / "data" / "specs"


def pairs(n: int) -> str:
    return "\n".join(f'pair "p{i}" {{ positive " yes {i}"  negative " no {i}" }}' for i in range(n))


def plan_of(text: str, folder: Path):
    spec, diagnostics = check_text(text, str(folder / "s.behavior"))
    assert spec is not None, "\n".join(d.render(text) for d in diagnostics)
    return lower(spec)


def by_id(plan) -> dict:
    return {t.id: t for t in plan.tasks}


def test_listen_plan() -> None:
    plan = lower(load_spec(str(TINY_SPECS / "listen.behavior")))
    assert [t.id for t in plan.tasks] == ["model:base", "steer.extract:listen", "steer.base:listen",
                                          "steer.verify:listen", "train:listen", "task_vector:listen"]
    tasks = by_id(plan)
    extract, verify, train = tasks["steer.extract:listen"], tasks["steer.verify:listen"], tasks["train:listen"]
    spec = plan.spec
    # eval pairs verify; every steer pair extracts
    assert extract.pairs == spec.behavior("listen").steer.pairs
    assert verify.base.pairs == spec.behavior("listen").eval.pairs and verify.vectors is extract
    assert verify.base.general == spec.behavior("listen").train.mix.texts
    assert train.eval_pairs == spec.behavior("listen").eval.pairs and train.steering is None
    assert tasks["task_vector:listen"].finetuned is train
    assert extract.loc.line == 10 and train.loc.line == 22  # tasks point back at the spec
    assert [(e.task_id, e.expect.metric) for e in plan.expectations] == [("train:listen", "margin_after")]


def test_every_task_is_listed_after_its_dependencies() -> None:
    for name in ("listen", "persona", "deploy"):
        plan = lower(load_spec(str(TINY_SPECS / f"{name}.behavior")))
        seen: set[str] = set()
        for task in plan.tasks:
            assert all(dep.key in seen for dep in task.arguments().values()), task.id
            seen.add(task.key)
        assert len({t.id for t in plan.tasks}) == len(plan.tasks)


def test_persona_plan_composes_aligned_vectors() -> None:
    plan = lower(load_spec(str(TINY_SPECS / "persona.behavior")))
    compose = by_id(plan)["compose:persona"]
    assert isinstance(compose, ComposeBehaviors)
    assert [v.name for v in compose.vectors] == [t.behavior for t in compose.compose.terms]
    assert all(isinstance(v, ExtractTaskVector) for v in compose.vectors)
    assert [s.name for s in compose.steering] == ["concise", "sycophancy"]  # listen does not steer
    assert any("listen" in note and "no pairs" in note for note in plan.notes)


def test_deploy_plan_distills_and_serves_steering() -> None:
    plan = lower(load_spec(str(TINY_SPECS / "deploy.behavior")))
    tasks = by_id(plan)
    train = tasks["train:listen"]
    assert train.steering is tasks["steer.extract:listen"] and train.strength == 4.0
    # The hand-off deploys it live while it trains: one owner of the server, no DeployModel.
    assert train.handoff.urls == "auto" and train.handoff.push_every == 10
    assert not any(isinstance(t, DeployModel) for t in plan.tasks)
    assert any("deployed live by its training" in note for note in plan.notes)


def test_a_hand_off_without_distillation_still_owns_the_deploy(tmp_path: Path) -> None:
    plan = plan_of(f'model m = "tiny-gdn"\nbehavior a {{ steer {{ strength 3  {pairs(6)} }}\n'
                   '  train { example "x" { response " y" } } }\n'
                   'deploy a to vllm auto { steering on  handoff on  push_every 5 }\n', tmp_path)
    tasks = by_id(plan)
    train = tasks["train:a"]
    assert train.train.distill is None
    assert train.steering is tasks["steer.extract:a"] and train.strength == 3.0
    assert train.handoff.push_every == 5
    assert not any(isinstance(t, DeployModel) for t in plan.tasks)


def test_verification_holds_out_every_fifth_pair(tmp_path: Path) -> None:
    plan = plan_of(f'model m = "tiny-gdn"\nbehavior a {{ steer {{ {pairs(12)} }} }}\n', tmp_path)
    tasks = by_id(plan)
    extract, verify = tasks["steer.extract:a"], tasks["steer.verify:a"]
    assert [p.prompt for p in verify.base.pairs] == ["p4", "p9"]
    assert [p.prompt for p in extract.pairs] == [f"p{i}" for i in range(12) if i not in (4, 9)]
    assert verify.base.general and "held out" in plan.notes[0]


def test_few_pairs_verify_on_themselves_and_say_so(tmp_path: Path) -> None:
    plan = plan_of(f'model m = "tiny-gdn"\nbehavior a {{ steer {{ {pairs(3)} }} }}\n', tmp_path)
    tasks = by_id(plan)
    assert tasks["steer.verify:a"].base.pairs == tasks["steer.extract:a"].pairs
    assert "verified on the pairs it was extracted from" in plan.notes[0]


def test_external_behaviors_lower_to_imports(tmp_path: Path) -> None:
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "config.json").write_text("{}")
    (tmp_path / "tau.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    plan = plan_of('model m = "tiny-gdn"\nbehavior t from model "tuned"\n'
                   'behavior v from task_vector "tau.safetensors"\n'
                   "compose c = t + v * 0.5\ndeploy t to vllm auto\n", tmp_path)
    tasks = by_id(plan)
    assert isinstance(tasks["import.model:t"], ImportModel)
    assert tasks["task_vector:t"].finetuned is tasks["import.model:t"]
    assert isinstance(tasks["import.task_vector:v"], ImportTaskVector)
    assert [type(v) for v in tasks["compose:c"].vectors] == [ExtractTaskVector, ImportTaskVector]
    assert tasks["deploy:t"].source is tasks["import.model:t"]


def test_one_model_task_per_model(tmp_path: Path) -> None:
    plan = plan_of('model m = "tiny-gdn"\nmodel d = "tiny-dense"\nmodel unused = "tiny-gdn"\n'
                   f'behavior a on m {{ steer {{ {pairs(2)} }} }}\n'
                   f'behavior b on d {{ steer {{ {pairs(2)} }} }}\n', tmp_path)
    models = [t for t in plan.tasks if isinstance(t, ResolveModel)]
    assert [t.id for t in models] == ["model:m", "model:d"]


def keys(text: str, folder: Path) -> dict[str, str]:
    return {t.id: t.key for t in plan_of(text, folder).tasks}


def test_changing_strength_reruns_only_what_reads_it(tmp_path: Path) -> None:
    spec = ('model m = "tiny-gdn"\nbehavior a {{ steer {{ strength {s}  {p} }}\n'
            '  train {{ example "x" {{ response " y" }} }} }}\n'
            'compose c = a * 0.5\n')
    before = keys(spec.format(s=4, p=pairs(6)), tmp_path)
    after = keys(spec.format(s=8, p=pairs(6)), tmp_path)
    changed = {task for task in before if before[task] != after[task]}
    # Extraction and training do not read the strength; the composed steering vector
    # (weight * strength * vector) does.
    assert changed == {"steer.verify:a", "compose:c"}


def test_strength_reaches_training_when_it_distills(tmp_path: Path) -> None:
    spec = ('model m = "tiny-gdn"\nbehavior a {{ steer {{ strength {s}  {p} }}\n'
            '  train {{ distill steering {{ prompt "go" }} }} }}\n')
    before = keys(spec.format(s=4, p=pairs(6)), tmp_path)
    after = keys(spec.format(s=8, p=pairs(6)), tmp_path)
    changed = {task for task in before if before[task] != after[task]}
    assert changed == {"steer.verify:a", "train:a", "task_vector:a"}


def test_the_base_model_is_measured_once_for_every_strength_layer_and_method(tmp_path: Path) -> None:
    spec = ('model m = "tiny-gdn"\nbehavior a {{ steer {{ strength {s}  layers {l}  method {m}  {p} }}\n'
            '  train {{ distill steering {{ prompt "go" }} }}\n'
            '  eval {{ pair "q" {{ positive " {e}"  negative " no" }} }} }}\n')
    first = keys(spec.format(s=4, l=1, m="mean_diff", p=pairs(6), e="yes"), tmp_path)
    for change in ({"s": 2}, {"s": "auto"}, {"l": "2..3"}, {"l": "auto"}, {"m": "pca"}):
        varied = keys(spec.format(**{"s": 4, "l": 1, "m": "mean_diff", "p": pairs(6), "e": "yes",
                                     **change}), tmp_path)
        assert varied["steer.base:a"] == first["steer.base:a"], change
        assert varied["steer.verify:a"] != first["steer.verify:a"], change
    # the extraction pairs are not measured on the base model; the held-out ones are
    assert keys(spec.format(s=4, l=1, m="mean_diff", p=pairs(7), e="yes"), tmp_path)["steer.base:a"] \
        == first["steer.base:a"]
    assert keys(spec.format(s=4, l=1, m="mean_diff", p=pairs(6), e="yes!"), tmp_path)["steer.base:a"] \
        != first["steer.base:a"]


def test_strength_auto_reaches_training_through_the_verification(tmp_path: Path) -> None:
    plan = plan_of(f'model m = "tiny-gdn"\nbehavior a {{ steer {{ strength auto  {pairs(6)} }}\n'
                   '  train { distill steering { prompt "go" } } }\n', tmp_path)
    tasks = by_id(plan)
    train = tasks["train:a"]
    assert train.strength_from is tasks["steer.verify:a"] and train.steering is tasks["steer.extract:a"]
    assert "strength_from" in train.arguments()  # the verification runs first
    fixed = by_id(plan_of(f'model m = "tiny-gdn"\nbehavior a {{ steer {{ strength 2  {pairs(6)} }}\n'
                          '  train { distill steering { prompt "go" } } }\n', tmp_path))["train:a"]
    assert fixed.strength_from is None and fixed.strength == 2.0


def test_changing_a_weight_reruns_only_the_composition(tmp_path: Path) -> None:
    spec = ('model m = "tiny-gdn"\nbehavior a { train { example "x" { response " y" } } }\n'
            'compose c = a * WEIGHT\ndeploy c to vllm auto\n')
    before = keys(spec.replace("WEIGHT", "0.5"), tmp_path)
    after = keys(spec.replace("WEIGHT", "0.7"), tmp_path)
    assert {t for t in before if before[t] != after[t]} == {"compose:c", "deploy:c"}


def test_data_file_content_changes_keys(tmp_path: Path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a", "positive": "b", "negative": "c"}\n')
    spec = 'model m = "tiny-gdn"\nbehavior a { steer { pairs "p.jsonl" } }\n'
    before = keys(spec, tmp_path)
    data.write_text('{"prompt": "a", "positive": "b", "negative": "d"}\n')
    after = keys(spec, tmp_path)
    assert before["steer.extract:a"] != after["steer.extract:a"]
    assert before["model:m"] == after["model:m"]


def test_render_tree_and_json() -> None:
    plan = lower(load_spec(str(TINY_SPECS / "persona.behavior")))
    tree = plan.render_tree()
    lines = tree.splitlines()
    assert lines[0] == f"{TINY_SPECS / 'persona.behavior'}: 15 tasks"
    for task in plan.tasks:  # each task once in full: id, key prefix, spec line
        full = [line for line in lines if task.key[:8] in line]
        assert len(full) == 1 and task.id in full[0] and f"{task.loc.file}:{task.loc.line}" in full[0]
    assert any(line.startswith("compose:persona ") for line in lines)  # nothing depends on it
    assert "    └── model:base (above)" in lines
    data = json.loads(plan.to_json())
    assert [t["id"] for t in data["tasks"]] == [t.id for t in plan.tasks]
    assert [t["key"] for t in data["tasks"]] == [t.key for t in plan.tasks]
    compose = next(t for t in data["tasks"] if t["id"] == "compose:persona")
    assert compose["deps"] == ["model:base", "task_vector:listen", "task_vector:concise",
                               "task_vector:sycophancy", "steer.extract:concise",
                               "steer.extract:sycophancy"]
    assert compose["fields"]["compose"]["expression"] == \
        "listen * 1.0 + concise * 0.5 - sycophancy * 0.8"
    assert compose["loc"] == f"{TINY_SPECS / 'persona.behavior'}:61:9"


def test_moving_a_project_keeps_every_task_key(tmp_path: Path) -> None:
    """Keys follow the data's contents, not where the project lies: a project moved
    (or checked out elsewhere) reuses its trained model instead of training again."""
    import shutil

    keys = []
    for place in ("here", "moved/elsewhere"):
        folder = tmp_path / place
        shutil.copytree(TINY_SPECS, folder)
        keys.append({t.id: t.key for t in lower(load_spec(str(folder / "distill.behavior"))).tasks})
    assert keys[0] == keys[1]
    assert "train:listen" in keys[0]


def test_the_tiny_copies_plan_the_tasks_of_the_example_specs() -> None:
    """tests/data/specs keeps tiny-model copies of specs/ with settings a tiny model
    needs (a fixed layer and strength, fewer steps): they must still run the pipeline
    the examples run, task for task, or the fast tests stop covering what users build."""
    copies = sorted(TINY_SPECS.glob("*.behavior"))
    compared = 0
    for copy in copies:
        example = SPECS / copy.name
        if not example.is_file() or "behavior " not in copy.read_text():
            continue  # qwen35.behavior has no example; common.behavior only declares the model
        real, tiny = lower(load_spec(str(example))), lower(load_spec(str(copy)))
        assert [t.id for t in tiny.tasks] == [t.id for t in real.tasks], copy.name
        assert [type(t).__name__ for t in tiny.tasks] == [type(t).__name__ for t in real.tasks], copy.name
        compared += 1
    assert compared >= 4
