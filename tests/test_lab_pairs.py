"""`behaviorc pairs "TRAIT"`: pairs written by a chat model, filtered on the model they
will steer, in the file a spec's `pairs` reads. The tiny models write noise, so these
tests hold the mechanics (what is written, filtered and then steered with), not quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from behaviorc.cli import main

QUESTIONS = ["How was your weekend?", "What should I cook tonight?", "Can you describe the sea?",
             "How do I learn to juggle?", "What is a good name for a cat?", "Tell me about Mondays."]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_from_a_builtin_are_filtered_and_a_build_steers_with_them(tmp_path, tiny_dense, capsys):
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "cheerful and upbeat", "--model", "tiny-dense", "--questions-file", str(questions),
                 "--out", str(out), "--prompts-out", str(tmp_path / "prompts.jsonl"), "--drop", "0.25"]) == 0
    said = capsys.readouterr().out
    pairs = read_jsonl(out)
    assert 2 <= len(pairs) < len(QUESTIONS)  # the weakest quarter at least is dropped
    assert all(set(p) == {"prompt", "positive", "negative"} and p["prompt"] in QUESTIONS for p in pairs)
    assert all(p["positive"] != p["negative"] for p in pairs)
    assert f"wrote {len(pairs)} pairs to {out}" in said and "separate best at layer" in said
    assert [p["prompt"] for p in read_jsonl(tmp_path / "prompts.jsonl")] == QUESTIONS

    spec = tmp_path / "cheerful.behavior"
    spec.write_text('model base = "tiny-dense"\nbehavior cheerful {\n  steer { layers 1  pairs "pairs.jsonl" }\n}\n')
    assert main(["build", str(spec), "--out", str(tmp_path / "out"), "--only", "steer.extract:cheerful"]) == 0
    assert (tmp_path / "out" / "cheerful" / "vectors.safetensors").is_file()


@pytest.mark.vllm
def test_pairs_written_by_a_server_are_filtered_on_the_model_named_for(vllm_server, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    code = main(["pairs", "upbeat", "--model", vllm_server.url, "--for", str(vllm_server.model_dir),
                 "--questions", "6", "--drop", "0", "--out", str(out)])
    said = capsys.readouterr()
    assert code == 0, said.err
    pairs = read_jsonl(out)
    assert len(pairs) >= 2 and all(p["positive"] != p["negative"] for p in pairs)
    assert f"on {vllm_server.model_dir} they separate best" in said.out


def test_a_server_without_a_model_to_filter_on_is_refused_before_any_request(capsys):
    assert main(["pairs", "upbeat", "--model", "http://127.0.0.1:9", "--out", "x.jsonl"]) == 1
    assert "name the model the pairs will steer with --for" in capsys.readouterr().err
