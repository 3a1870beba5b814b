"""Resolving and checking model folders: good ones load, bad ones say where and why."""

import json
import shutil

import pytest
import torch

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.model.loading import load_model, validate_model_folder
from behaviorc.model.resolve import resolve_model_folder


@pytest.fixture
def gdn_copy(tiny_gdn, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_gdn, folder)
    return folder


@pytest.mark.parametrize("name", ["tiny-gdn", "tiny-dense"])
def test_builtins_load_in_transformers(name):
    folder = resolve_model_folder(name)
    model, tokenizer = load_model(folder, dtype="float32", device="cpu")
    ids = tokenizer(["Use the existing parser."], return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert next(model.parameters()).dtype == torch.float32


def test_bfloat16_load(tiny_dense):
    model, _ = load_model(tiny_dense, dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def _error(folder) -> str:
    with pytest.raises(BehaviorError) as err:
        validate_model_folder(folder)
    return err.value.render()


def test_no_config(gdn_copy):
    (gdn_copy / "config.json").unlink()
    assert "has no config.json" in _error(gdn_copy)


def test_config_not_json(gdn_copy):
    (gdn_copy / "config.json").write_text('{"model_type": "qwen3_next",\n  oops}')
    message = _error(gdn_copy)
    assert "config.json:2:" in message and "not valid JSON" in message


def test_truncated_safetensors(gdn_copy):
    weights = gdn_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _error(gdn_copy)
    assert "model.safetensors` is truncated" in message
    # Loading goes through the same check: no traceback from safetensors.
    with pytest.raises(BehaviorError, match="truncated"):
        load_model(gdn_copy, device="cpu")


def test_corrupt_safetensors_header(gdn_copy):
    (gdn_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "model.safetensors" in _error(gdn_copy)


def test_unknown_dtype(gdn_copy, tiny_gdn):
    config = json.loads((gdn_copy / "config.json").read_text())
    config["dtype"] = "float13"
    (gdn_copy / "config.json").write_text(json.dumps(config, indent=2))
    message = _error(gdn_copy)
    assert "unknown dtype `float13`" in message and "config.json:" in message
    with pytest.raises(BehaviorError, match="unknown dtype `int4`"):
        load_model(tiny_gdn, dtype="int4")


def test_unknown_architecture(gdn_copy):
    config = json.loads((gdn_copy / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (gdn_copy / "config.json").write_text(json.dumps(config, indent=2))
    assert "unknown architecture `MambaForCausalLM`" in _error(gdn_copy)


def test_pickle_weights_refused(gdn_copy):
    (gdn_copy / "model.safetensors").rename(gdn_copy / "pytorch_model.bin")
    assert "safetensors only" in _error(gdn_copy)


def test_missing_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(BehaviorError, match="no model folder"):
        resolve_model_folder(str(tmp_path / "nowhere"))
    with pytest.raises(BehaviorError) as err:
        resolve_model_folder("some-org/not-cached-model")
    message = err.value.render()
    assert "offline" in message and "`some-org/not-cached-model`" in message
    assert "local folder" in message


def test_bad_folder_via_cli(gdn_copy, capsys):
    from behaviorc.cli import main

    (gdn_copy / "model.safetensors").write_bytes(b"12345")
    assert main(["models", "show", str(gdn_copy)]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err


def test_cached_hub_id_resolves_offline(tiny_dense, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The local Hugging Face cache layout: models--org--name/{refs/main, snapshots/REV/}.
    repo = tmp_path / "hub" / "models--some-org--tiny-dense"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dense, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_folder("some-org/tiny-dense") == snapshot
