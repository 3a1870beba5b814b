"""How a worker checks and reads a push before loading it (no vLLM: `ServedWeights` is
the worker's bookkeeping, run here on tiny-gdn's real checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.engine.vllm.inside.weights import ServedWeights, all_finite, layer_group


@pytest.fixture
def served(tiny_gdn, tmp_path) -> ServedWeights:
    model_dir = tmp_path / "served"
    shutil.copytree(tiny_gdn, model_dir)
    return ServedWeights.of_folder(model_dir)


def push_folder(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "push") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_finds_nan_and_infinity_and_survives_overflowing_sums(dtype):
    ones = torch.ones(64, dtype=dtype)
    assert all_finite(ones)
    assert all_finite(torch.full((64,), torch.finfo(dtype).max, dtype=dtype))  # sum overflows
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = ones.clone()
        broken[7] = bad
        assert not all_finite(broken)


def test_a_partial_push_carries_the_rest_of_its_layers_in_memory(served, tmp_path):
    name = "model.layers.1.linear_attn.A_log"
    new = torch.full(served.manifest[name].shape, 0.5)
    assert served.stage("t", push_folder(tmp_path, {name: new}), complete=False,
                        transient=True) == []
    staged = served.staged
    layer_one = {n for n in served.manifest if layer_group(n) == "model.layers.1"}
    assert set(staged.tensors) == layer_one and staged.pushed == 1
    assert torch.equal(staged.tensors[name], new)
    original = load_file(served.manifest[name].file)
    other = "model.layers.1.mlp.gate.weight"
    assert torch.equal(staged.tensors[other], original[other])
    # The client deletes a state dict's file after the push: the value lives in memory.
    assert torch.equal(staged.sources[name], new) and set(staged.sources) == {name}


def test_a_whole_model_push_rebuilds_only_the_layers_that_changed(served, tiny_gdn, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_gdn, folder)
    assert served.stage("same", folder, complete=True, transient=False) == []
    assert served.staged.tensors == {}  # nothing differs: nothing to rebuild

    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.2.mlp.experts.1.up_proj.weight"] *= 1.5
    save_file(weights, str(folder / "model.safetensors"))
    assert served.stage("one layer", folder, complete=True, transient=False) == []
    assert set(served.staged.tensors) == {
        name for name in served.manifest if name.startswith("model.layers.2.")}
    assert served.staged.pushed == len(served.manifest)
    # A folder that stays is read again from its files, not kept in memory.
    assert set(served.staged.sources.values()) == {str(folder / "model.safetensors")}


def test_every_problem_is_named_before_anything_is_read(served, tmp_path):
    tensors = {"model.layers.0.mlp.gate.weight": torch.zeros(3, 3),
               "model.layers.0.mlp.gaet.weight": torch.zeros(4, 128),
               "model.norm.weight": torch.ones(128, dtype=torch.int64)}
    problems = served.stage("t", push_folder(tmp_path, tensors), complete=True, transient=True)
    text = "\n".join(problems)
    assert "`model.layers.0.mlp.gate.weight` has shape [3, 3], the served model has [4, 128]" \
        in text
    assert "did you mean `model.layers.0.mlp.gate.weight`?" in text
    assert "`model.norm.weight` has dtype I64, weights must be floating point" in text
    assert "served tensor(s) missing" in text
    assert served.staged is None


def test_non_finite_values_and_unreadable_files_are_refused(served, tmp_path):
    name = "model.layers.0.linear_attn.dt_bias"
    bad = torch.full(served.manifest[name].shape, float("nan"))
    assert served.stage("t", push_folder(tmp_path, {name: bad}), complete=False, transient=True) \
        == [f"tensor `{name}` holds NaN or infinite values"]
    truncated = push_folder(tmp_path, {name: torch.ones(served.manifest[name].shape)}, "cut")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert served.stage("t", truncated, complete=False, transient=True)[0].startswith(
        f"cannot read the weights in {truncated}")
    assert served.stage("t", tmp_path / "nowhere", complete=True, transient=False) == [
        f"{tmp_path / 'nowhere'} is not a folder"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert served.stage("t", empty, complete=True, transient=False) == [
        f"`{empty}` has no weights (*.safetensors)"]
    assert served.staged is None
