"""The steering artifact: files, checks, arithmetic. No model needed."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.formats.steering import export_gguf, load_steering, read_gguf, save_steering
from behaviorc.steering_vectors import SteeringVectors


def make(layers=(1, 3), hidden=8, seed=0, **fields) -> SteeringVectors:
    generator = torch.Generator().manual_seed(seed)
    fields = {"method": "mean_diff", "model": "tiny-gdn", "model_type": "qwen3_next", **fields}
    return SteeringVectors({layer: torch.randn(hidden, generator=generator) for layer in layers}, **fields)


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    vectors = make(read="last", spec_hash="abc123", provenance="listen", extra={"behavior": "listen"})
    path = save_steering(vectors, tmp_path / "v.safetensors")
    back = load_steering(path)
    assert back.layers == (1, 3)
    for layer in vectors.layers:
        assert torch.equal(back.directions[layer], vectors.directions[layer])
    assert (back.method, back.model, back.read, back.spec_hash, back.model_type, back.provenance) == \
        ("mean_diff", "tiny-gdn", "last", "abc123", "qwen3_next", "listen")
    assert back.extra == {"behavior": "listen"}
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["layer.1", "layer.3"]
        meta = handle.metadata()
    assert json.loads(meta["layers"]) == [1, 3]
    norms = json.loads(meta["norms"])
    assert norms["3"] == pytest.approx(float(vectors.directions[3].norm()))
    # nothing but the artifact is left in the folder
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_gguf_round_trip_in_the_control_vector_format(tmp_path):
    vectors = make(layers=(1, 2, 3), spec_hash="feed")
    path = export_gguf(vectors, tmp_path / "v.gguf")
    # read with the gguf package directly, as llama.cpp / repeng would see it
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "qwen3_next"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    for layer in vectors.layers:
        assert tensors[f"direction.{layer}"].dtype == np.float32
        assert np.array_equal(tensors[f"direction.{layer}"], vectors.directions[layer].numpy())
    back = read_gguf(path)
    assert back.layers == vectors.layers and back.spec_hash == "feed" and back.method == "mean_diff"
    assert all(torch.equal(back.directions[k], vectors.directions[k]) for k in vectors.layers)


def test_gguf_refuses_layer_zero_which_llama_cpp_cannot_load(tmp_path):
    with pytest.raises(BehaviorError, match="layer 0"):
        export_gguf(make(layers=(0, 1)), tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


def test_read_gguf_of_another_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BehaviorError, match="architecture `llama`"):
        read_gguf(tmp_path / "m.gguf")


def test_arithmetic():
    a, b = make(layers=(1, 2), seed=1), make(layers=(2, 3), seed=2)
    total = a + b
    assert total.layers == (1, 2, 3)
    assert torch.allclose(total.directions[2], a.directions[2] + b.directions[2])
    assert torch.equal(total.directions[1], a.directions[1])
    assert torch.equal(total.directions[3], b.directions[3])
    assert torch.equal((-a).directions[1], -a.directions[1])
    assert torch.allclose((a * 2.5).directions[2], 2.5 * a.directions[2])
    mixed = SteeringVectors.combine([(a, 1.0), (b, 0.5), (a, -0.8)], provenance="a - 0.8 a + 0.5 b")
    assert torch.allclose(mixed.directions[2], 0.2 * a.directions[2] + 0.5 * b.directions[2], atol=1e-6)
    assert mixed.provenance == "a - 0.8 a + 0.5 b"
    assert torch.allclose((a - a).directions[1], torch.zeros(8))
    assert torch.allclose((2 * a).directions[1], (a * 2).directions[1])


def test_combining_vectors_of_different_models_is_refused():
    with pytest.raises(BehaviorError, match="different models"):
        make() + make(model="tiny-dense")
    with pytest.raises(BehaviorError, match="hidden size"):
        make(hidden=8) + make(hidden=4)


def test_load_missing_file_names_the_file_and_location(tmp_path):
    loc = Location(file="spec.behavior", line=3, column=5, end_line=3, end_column=9)
    with pytest.raises(BehaviorError) as caught:
        load_steering(tmp_path / "nope.safetensors", loc)
    assert "does not exist" in str(caught.value)
    assert caught.value.diagnostics[0].loc == loc


@pytest.mark.parametrize("tensors, message", [
    ({"layer.1": torch.ones(4), "bias": torch.ones(4)}, "not named `layer.N`"),
    ({"layer.01": torch.ones(4)}, "not named `layer.N`"),
    ({"layer.1": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, "NaN"),
    ({"layer.1": torch.ones(4), "layer.2": torch.ones(5)}, "5 values"),
    ({"layer.1": torch.ones(2, 2)}, "shape"),
    ({}, "no layers"),
])
def test_load_refuses_bad_files(tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(BehaviorError, match=message):
        load_steering(path)


def test_load_refuses_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01 not a header")
    with pytest.raises(BehaviorError, match="not a readable safetensors"):
        load_steering(path)


def test_load_refuses_metadata_that_disagrees_with_tensors(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({"layer.1": torch.ones(4)}, str(path), metadata={"layers": "[1, 2]"})
    with pytest.raises(BehaviorError, match="lists layers"):
        load_steering(path)


def test_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = save_steering(make(seed=3), tmp_path / "v.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_steering(make(seed=4), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_cli_shows_and_converts_steering_files(tmp_path, capsys):
    from behaviorc.cli import main

    source = save_steering(make(layers=(0, 2, 3)), tmp_path / "v.safetensors")
    assert main(["steer", "show", str(source)]) == 0
    shown = capsys.readouterr().out
    assert "3 layer(s), hidden size 8" in shown and "layer   2  norm" in shown
    # GGUF cannot hold layer 0: the error says so, nothing is written
    assert main(["steer", "convert", str(source), str(tmp_path / "v.gguf")]) == 1
    assert "layer 0" in capsys.readouterr().err and not (tmp_path / "v.gguf").exists()
    assert main(["steer", "convert", str(source), str(tmp_path / "v.gguf"), "--layers", "2,3"]) == 0
    back = read_gguf(tmp_path / "v.gguf")
    assert back.layers == (2, 3)
    assert torch.equal(back.directions[3], load_steering(source).directions[3])
    assert main(["steer", "convert", str(tmp_path / "v.gguf"), str(tmp_path / "w.txt")]) == 1
    assert "expected a .safetensors or .gguf" in capsys.readouterr().err
