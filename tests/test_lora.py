"""Task vectors as LoRA adapters: the export (SVD factors, ranks, what LoRA cannot carry),
PEFT loading them, the checks before a server sees one, and live per-request serving."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from behaviorc.compose.lora import RankChoice, export_lora
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.formats.peft_lora import CONFIG_FILE, WEIGHTS_FILE, check_adapter

Q = "model.layers.1.self_attn.q_proj"
DOWN = "model.layers.2.mlp.down_proj"
NORM = "model.layers.0.input_layernorm.weight"


def tuned_copy(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """`base` with a rank-3 delta on one q_proj and one down_proj, and a changed norm."""
    shutil.copytree(base, out)
    weights = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(seed)
    for module in (Q, DOWN):
        rows, cols = weights[f"{module}.weight"].shape
        low_rank = rng.standard_normal((rows, 3)) @ rng.standard_normal((3, cols))
        weights[f"{module}.weight"] = (weights[f"{module}.weight"]
                                       + scale * low_rank / np.sqrt(cols)).astype(np.float32)
    weights[NORM] = (weights[NORM] + 0.01).astype(np.float32)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tuned(tiny_dense, tmp_path_factory):
    return tuned_copy(tiny_dense, tmp_path_factory.mktemp("lora") / "tuned", seed=0)


def test_export_factors_the_delta_and_peft_loads_it(tiny_dense, tuned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = export_lora(tuned, tiny_dense, tmp_path / "adapter", RankChoice(rank=16))
    # rank 16 is capped by each delta's own rank (3); the norm cannot be carried
    assert exported.ranks == {Q: 3, DOWN: 3}
    assert set(exported.uncarried) == {NORM}
    norm_energy = 128 * 0.01 ** 2
    assert exported.uncarried[NORM] == pytest.approx(norm_energy / exported.energy_total, rel=1e-3)
    assert exported.energy_kept_share == pytest.approx(1 - exported.uncarried[NORM], rel=1e-5)
    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["rank_pattern"] == {Q: 3, DOWN: 3} and config["alpha_pattern"] == {Q: 3, DOWN: 3}

    base = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    target = load_file(str(tuned / "model.safetensors"))
    state = merged.state_dict()
    for module in (Q, DOWN):
        np.testing.assert_allclose(state[f"{module}.weight"].numpy(), target[f"{module}.weight"],
                                   atol=2e-6)
    untouched = load_file(str(tiny_dense / "model.safetensors"))
    np.testing.assert_array_equal(state[NORM].numpy(), untouched[NORM])


def test_energy_choice_keeps_the_fewest_singular_values(tiny_dense, tuned, tmp_path):
    full = export_lora(tuned, tiny_dense, tmp_path / "full", RankChoice(rank=64))
    for energy in (0.5, 0.999999):
        part = export_lora(tuned, tiny_dense, tmp_path / f"e{energy}", RankChoice(energy=energy))
        for module, rank in part.ranks.items():
            weights = load_file(str(tmp_path / "full" / WEIGHTS_FILE))
            a = weights[f"base_model.model.{module}.lora_A.weight"]
            squared = np.square(np.linalg.norm(a, axis=1)) ** 2  # s_i^2, A's rows are s_i^1/2 v_i
            kept = np.cumsum(squared) / squared.sum()
            assert kept[rank - 1] >= energy * (1 - 1e-6)
            assert rank == 1 or kept[rank - 2] < energy
    assert full.ranks == {Q: 3, DOWN: 3}


def test_bad_adapters_are_refused(tiny_dense, tiny_gdn, tuned, tmp_path):
    good = tmp_path / "good"
    export_lora(tuned, tiny_dense, good, RankChoice(rank=2))
    assert check_adapter(good, tiny_dense).ranks == {Q: 2, DOWN: 2}
    with pytest.raises(BehaviorError, match="not a linear layer|maps"):
        check_adapter(good, tiny_gdn)  # another model
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(BehaviorError, match="pickle"):
        check_adapter(pickled, tiny_dense)
    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(good, wrong_shape)
    factors = load_file(str(good / WEIGHTS_FILE))
    factors[f"base_model.model.{Q}.lora_A.weight"] = np.zeros((2, 64), np.float32)
    save_file(factors, str(wrong_shape / WEIGHTS_FILE))
    with pytest.raises(BehaviorError, match="maps 64"):
        check_adapter(wrong_shape, tiny_dense)
    other_base = tmp_path / "other_base"
    shutil.copytree(tiny_dense, other_base)
    (other_base / "config.json").write_text(
        (tiny_dense / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(BehaviorError, match="made for another base"):
        check_adapter(good, other_base)
