"""The checker: example specs to IR, model sources and fingerprints, imports, data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.lang import check_file, check_text, load_spec
from behaviorc.lang.parse import parse_text
from behaviorc.model.builtin import BUILDER_VERSION

SPECS = Path(__file__).resolve().parent.parent / "specs"
# Tiny-model copies of the example specs (the examples in specs/ run on smollm2-135m).
TINY_SPECS = Path(__file__).resolve().parent / "data" / "specs"
EXAMPLES = sorted(SPECS.glob("*.behavior"))
PAIR = 'pair "Use the old parser." { positive " Yes, the old one."  negative " A new one." }'


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def errors_of(text: str, folder: Path, name: str = "spec.behavior") -> list[str]:
    spec, diagnostics = check_file(write(folder, name, text))
    return [d.message for d in diagnostics if d.severity == "error"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_specs_check_clean(path: Path) -> None:
    spec, diagnostics = check_file(str(path))
    assert spec is not None, "\n".join(d.render() for d in diagnostics)
    assert diagnostics == []


def test_listen_spec_to_ir() -> None:
    spec = load_spec(str(TINY_SPECS / "listen.behavior"))
    listen = spec.behavior("listen")
    assert spec.model("base").kind == "builtin" and spec.model("base").num_layers == 4
    assert listen.steer.layers == (1, 2) and listen.steer.method == "mean_diff"
    assert listen.steer.strength == 4.0 and listen.steer.read == "mean"
    # one inline pair, then the file's
    assert listen.steer.pairs[0].prompt == "Use the existing parser."
    assert len(listen.steer.pairs) == 1 + 12 and len(listen.steer.sources) == 1
    train = listen.train
    assert train.lr == 1e-4 and train.steps == 30 and train.batch == 4 and train.context == "frozen"
    assert train.targets == ("gdn.gates", "gdn.proj", "attn.q")
    assert train.optimizer == ir.Optimizer(name="apollo", rank=256, refresh=200, limiter=1.01, scale=None)
    assert train.mix.ratio == 0.25 and len(train.mix.texts) == 30
    chat = [e for e in train.examples if e.messages]
    assert len(chat) == 2 and chat[0].messages[-1].role == "assistant"
    assert [e.model_dump() for e in listen.eval.expect] == \
        [{"metric": "margin_after", "op": ">", "value": 0.0}]
    assert spec.path == str(TINY_SPECS / "listen.behavior")


def test_persona_spec_composes_linear_terms() -> None:
    spec = load_spec(str(TINY_SPECS / "persona.behavior"))
    persona, focused = spec.compositions
    assert [(t.behavior, t.weight) for t in persona.terms] == \
        [("listen", 1.0), ("concise", 0.5), ("sycophancy", -0.8)]
    assert persona.expression == "listen * 1.0 + concise * 0.5 - sycophancy * 0.8"
    assert persona.merge.method == "ties" and persona.merge.density == 0.2
    assert persona.merge.groups == ("gdn.gates", "gdn.proj", "attn.q")
    assert [(t.behavior, t.weight) for t in focused.terms] == [("listen", 0.5), ("concise", 0.5)]
    assert focused.merge.method == "dare_linear" and focused.merge.density == 0.5
    concise = spec.behavior("concise")
    assert concise.steer.layers == "auto" and concise.steer.sweep == (0, 2, 4, 8)
    # inline examples first (a triple-quoted one spans lines), then the file's
    assert concise.train.examples[1].context.startswith("Q: Summarize this in one word:\nthe meeting")
    assert concise.train.examples[1].response == " Rescheduled."
    assert spec.behavior("sycophancy").train.optimizer.betas == (0.9, 0.999)


def test_compose_expressions_reduce_to_terms(tmp_path: Path) -> None:
    trained = "\n".join(f'behavior {n} {{ train {{ example "a" {{ response " b" }} }} }}'
                        for n in ("a", "b", "c"))
    spec, diagnostics = check_text(
        f'model m = "tiny-gdn"\n{trained}\n'
        "compose x = -(a - 2 * b) / 4 + c * 50% + a\n", str(tmp_path / "s.behavior"))
    assert spec is not None, diagnostics
    assert [(t.behavior, t.weight) for t in spec.compositions[0].terms] == \
        [("a", 0.75), ("b", 0.5), ("c", 0.5)]


def test_all_errors_of_a_file_in_one_run(tmp_path: Path) -> None:
    messages = errors_of(
        'model base = "tiny-gdn"\n'
        f"behavior a {{ steer {{ strength 0  {PAIR} }} }}\n"
        'behavior b { train { examples "missing.jsonl"  lr 5 } }\n'
        "compose c = a + zz\n"
        'deploy c to vllm "localhost:8000"\n', tmp_path)
    assert messages == [
        "`strength` must be in (0, 1000], not 0",
        "data file `missing.jsonl` not found",
        "`lr` must be in (0, 1], not 5",
        "`a` has no weights to compose",
        "unknown behavior `zz`",
        "`localhost:8000` is not an http(s) URL",
    ]


def test_typo_and_semantic_error_reported_together(tmp_path: Path) -> None:
    messages = errors_of(f'model base = "tiny-gdn"\nbehavior a {{ steer {{ strenght 4  {PAIR}\n'
                         '  pairs "nope.jsonl" } }\n', tmp_path)
    assert messages == ["unknown setting `strenght` in `steer`", "data file `nope.jsonl` not found"]


def test_builtin_folder_and_hub_models(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "mine"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (folder / "model.safetensors").write_bytes(b"x")
    spec, diagnostics = check_text(
        'model a = "tiny-gdn"\nmodel b = "models/mine" { dtype bfloat16  device cpu }\n'
        'model c = "Qwen/Qwen3-0.6B"\n', str(tmp_path / "s.behavior"))
    assert spec is not None, diagnostics
    a, b, c = spec.models
    assert (a.kind, a.fingerprint) == ("builtin", f"builtin:tiny-gdn:v{BUILDER_VERSION}")
    assert (b.kind, b.source, b.num_layers, b.dtype, b.device) == \
        ("folder", str(folder), 2, "bfloat16", "cpu")
    assert (c.kind, c.source, c.num_layers) == ("hub", "Qwen/Qwen3-0.6B", None)
    # a folder's fingerprint follows its files
    before = b.fingerprint
    (folder / "model.safetensors").write_bytes(b"xy")
    again, _ = check_text('model b = "models/mine"\n', str(tmp_path / "s.behavior"))
    assert again.models[0].fingerprint != before


def test_layers_checked_against_a_folder_model(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 2}}))
    messages = errors_of(f'model m = "small"\nbehavior a {{ steer {{ layers 0, 2  {PAIR} }} }}\n',
                         tmp_path)
    assert messages == ["layer 2 does not exist: `m` has 2 layers (0..1)"]


def test_merge_settings_and_per_term_settings_reach_the_ir(tmp_path: Path) -> None:
    from behaviorc.compose.merge import MergeOptions

    trained = "\n".join(f'behavior {n} {{ train {{ example "a" {{ response " b" }} }} }}'
                        for n in ("a", "b"))
    spec, diagnostics = check_text(
        f'model m = "tiny-gdn"\n{trained}\n'
        "compose t = a + b * 0.5 { merge ties { density 0.2  rescale on  term b { density 0 } } }\n"
        "compose n = a + b { merge nuslerp { flatten off  row_wise on } }\n"
        "compose s = a { merge slerp { t 0.25 } }\n", str(tmp_path / "s.behavior"))
    assert spec is not None, diagnostics
    ties, nuslerp, slerp = spec.compositions
    assert ties.merge.rescale is True and [t.density for t in ties.terms] == [None, 0.0]
    options = MergeOptions.from_ir(ties.merge, ties.terms)
    assert [options.density_of(i) for i in range(2)] == [0.2, 0.0]
    assert (nuslerp.merge.flatten, nuslerp.merge.row_wise) == (False, True)
    assert MergeOptions.from_ir(slerp.merge, slerp.terms).t == 0.25


def test_external_behaviors(tmp_path: Path) -> None:
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "tau.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    spec, diagnostics = check_text(
        'model m = "tiny-gdn"\nbehavior t from model "tuned"\n'
        'behavior v from task_vector "tau.safetensors"\ncompose c = t - v\n',
        str(tmp_path / "s.behavior"))
    assert spec is not None, diagnostics
    t, v = spec.behaviors
    assert t.external.kind == "model" and t.external.path == str(folder)
    assert t.external.fingerprint.startswith("folder:")
    assert v.external.fingerprint.startswith("sha256:")


def test_imports_share_declarations_and_hash(tmp_path: Path) -> None:
    write(tmp_path, "shared/model.behavior", 'model base = "tiny-gdn"\n')
    write(tmp_path, "shared/both.behavior", 'import "model.behavior"\n')
    main = write(tmp_path, "main.behavior",
                 'import "shared/model.behavior"\nimport "shared/both.behavior"\n'
                 f"behavior a {{ steer {{ {PAIR} }} }}\n")
    first = load_spec(main)
    assert first.behavior("a").model == "base" and len(first.models) == 1
    write(tmp_path, "shared/model.behavior", 'model base = "tiny-dense"\n')
    assert load_spec(main).sha256 != first.sha256  # imported text is part of the hash


def test_load_spec_raises_with_every_diagnostic(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.behavior", 'model a = "nope"\nmodel a = "tiny-gdn"\n')
    with pytest.raises(BehaviorError) as caught:
        load_spec(path)
    assert [d.message for d in caught.value.diagnostics] == \
        ["unknown model `nope`", "model `a` is defined twice"]


def test_data_file_records_are_checked_line_by_line(tmp_path: Path) -> None:
    (tmp_path / "ex.jsonl").write_text(
        '{"context": "a", "response": "b"}\n\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
        '{"messages": [{"role": "robot", "content": "hi"}]}\n'
        '{"context": "a", "response": 3}\n')
    messages = errors_of('model m = "tiny-gdn"\nbehavior a { train { examples "ex.jsonl" } }\n',
                         tmp_path)
    assert messages == [
        "ex.jsonl:3: the last message must be the assistant's (it is the response trained on)",
        "ex.jsonl:4: `messages[0].role` is `robot`; expected one of system, user, assistant, tool",
        "ex.jsonl:5: field `response` must be a string, not a number",
    ]


def test_strings_quotes_and_escapes(tmp_path: Path) -> None:
    result = parse_text("import 'a\\tb\\u00e9\\\\'\nimport \"\"\"x\n\"y\" \\\"\"\"\"\n", "s.behavior")
    assert not result.diagnostics
    first, second = result.file.items
    assert first.path.value == "a\tb\u00e9\\" and second.path.value == 'x\n"y" "'


def test_syntax_error_spec_gives_no_ir(tmp_path: Path) -> None:
    spec, diagnostics = check_text('model m = "tiny-gdn"\nbehavior {\n', str(tmp_path / "s.behavior"))
    assert spec is None and diagnostics[0].message == "expected a name, found `{`"


def test_paths_in_ir_are_absolute(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "d")
    (tmp_path / "d" / "p.jsonl").write_text('{"prompt": "a", "positive": "b", "negative": "c"}\n')
    spec, _ = check_text('model m = "tiny-gdn"\nbehavior a { steer { pairs "d/p.jsonl" } }\n',
                         str(tmp_path / "s.behavior"))
    assert spec.behavior("a").steer.sources[0].path == str(tmp_path / "d" / "p.jsonl")


def test_readme_tour_parses_and_is_formatted() -> None:
    import re

    from behaviorc.lang.fmt import format_text

    readme = (SPECS.parent / "README.md").read_text()
    tour = readme[readme.index("## A tour of the language"):]
    example = re.findall(r"```\n(.*?)```", tour, re.S)[0]
    result = parse_text(example, "tour.behavior")
    assert result.diagnostics == [] and len(result.file.items) == 9
    assert format_text(example, "tour.behavior")[1] == []


@pytest.mark.parametrize("expr", ["- " * 3000 + "a", " + ".join(["a"] * 3000)])
def test_absurdly_deep_expressions_are_errors_not_crashes(expr: str, tmp_path: Path) -> None:
    from behaviorc.lang.fmt import format_text

    text = (f'model m = "tiny-gdn"\nbehavior a {{ train {{ example "x" {{ response "y" }} }} }}\n'
            f"compose c = {expr}\ndeploy c to vllm auto\n")
    spec, diagnostics = check_text(text, str(tmp_path / "s.behavior"))
    assert spec is None and [d.message for d in diagnostics] == \
        ["expression nested more than 500 levels deep"]
    assert diagnostics[0].loc.line == 3
    assert format_text(text, "s.behavior")[0] is None


def test_deeply_nested_json_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    messages = errors_of('model m = "tiny-gdn"\nbehavior a { steer { pairs "p.jsonl" } }\n', tmp_path)
    assert messages == ["p.jsonl:1: JSON nested too deeply"]


def test_a_skipped_typo_does_not_also_report_what_it_left_missing(tmp_path: Path) -> None:
    messages = errors_of('model m = "tiny-gdn"\nbehavior a {\n  steer { pairz "x.jsonl" }\n'
                         '  train { exmples "y.jsonl" }\n}\nbehavior b { train { steps 3 } }\n',
                         tmp_path)
    assert messages == ["unknown setting `pairz` in `steer`", "unknown setting `exmples` in `train`",
                        "train has no examples"]  # b has no typo: its omission is reported
