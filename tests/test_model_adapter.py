"""The architecture adapter on real (tiny) models of each supported family."""

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.ir import PARAMETER_GROUPS
from behaviorc.model.adapter import ArchitectureAdapter, group_of

# Parameter names of the real Qwen/Qwen3-Next-80B-A3B-Instruct checkpoint (its
# model.safetensors.index.json), with layer and expert numbers templated.
REAL_QWEN3_NEXT_NAMES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "head",
    "model.layers.{L}.input_layernorm.weight": "norm",
    "model.layers.{L}.post_attention_layernorm.weight": "norm",
    "model.layers.{L}.linear_attn.A_log": "gdn.gates",
    "model.layers.{L}.linear_attn.dt_bias": "gdn.gates",
    "model.layers.{L}.linear_attn.in_proj_qkvz.weight": "gdn.proj",
    "model.layers.{L}.linear_attn.in_proj_ba.weight": "gdn.proj",
    "model.layers.{L}.linear_attn.conv1d.weight": "gdn.conv",
    "model.layers.{L}.linear_attn.norm.weight": "gdn.norm",
    "model.layers.{L}.linear_attn.out_proj.weight": "gdn.out",
    "model.layers.{L}.self_attn.q_proj.weight": "attn.q",
    "model.layers.{L}.self_attn.k_proj.weight": "attn.kv",
    "model.layers.{L}.self_attn.v_proj.weight": "attn.kv",
    "model.layers.{L}.self_attn.o_proj.weight": "attn.o",
    "model.layers.{L}.self_attn.q_norm.weight": "attn.norm",
    "model.layers.{L}.self_attn.k_norm.weight": "attn.norm",
    "model.layers.{L}.mlp.gate.weight": "mlp",
    "model.layers.{L}.mlp.experts.{E}.gate_proj.weight": "mlp",
    "model.layers.{L}.mlp.experts.{E}.up_proj.weight": "mlp",
    "model.layers.{L}.mlp.experts.{E}.down_proj.weight": "mlp",
    "model.layers.{L}.mlp.shared_expert.gate_proj.weight": "mlp",
    "model.layers.{L}.mlp.shared_expert.up_proj.weight": "mlp",
    "model.layers.{L}.mlp.shared_expert.down_proj.weight": "mlp",
    "model.layers.{L}.mlp.shared_expert_gate.weight": "mlp",
}


def _template(name: str) -> str:
    name = re.sub(r"\.layers\.\d+\.", ".layers.{L}.", name)
    return re.sub(r"\.experts\.\d+\.", ".experts.{E}.", name)


@pytest.fixture(scope="module")
def gdn_model(tiny_gdn):
    return AutoModelForCausalLM.from_pretrained(tiny_gdn)


def test_tiny_gdn_layers_and_kinds(gdn_model):
    adapter = ArchitectureAdapter.for_model(gdn_model)
    assert adapter.family == "Qwen3-Next"
    assert adapter.layer_kinds == ("gdn", "gdn", "gdn", "attention")
    assert (adapter.num_layers, adapter.hidden_size) == (4, 128)
    layers = adapter.decoder_layers(gdn_model)
    assert [hasattr(layer, "linear_attn") for layer in layers] == [True, True, True, False]


def test_tiny_gdn_checkpoint_uses_real_qwen3_next_names(tiny_gdn):
    names = load_file(str(tiny_gdn / "model.safetensors")).keys()
    templates = {_template(n) for n in names}
    assert templates == set(REAL_QWEN3_NEXT_NAMES)
    for template, group in REAL_QWEN3_NEXT_NAMES.items():
        real = template.replace("{L}", "47").replace("{E}", "511")
        assert group_of(real) == group, real


def test_groups_resolve_to_in_memory_parameters(gdn_model):
    adapter = ArchitectureAdapter.for_model(gdn_model)
    gates = adapter.parameters(gdn_model, ["gdn.gates"])
    assert sorted(gates) == sorted(
        f"model.layers.{i}.linear_attn.{p}" for i in range(3) for p in ("A_log", "dt_bias"))
    proj = adapter.parameters(gdn_model, ["gdn.proj", "attn.q"])
    assert sorted(proj) == sorted(
        [f"model.layers.{i}.linear_attn.in_proj_{p}.weight" for i in range(3) for p in ("qkvz", "ba")]
        + ["model.layers.3.self_attn.q_proj.weight"])
    mlp = adapter.parameters(gdn_model, ["mlp"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in mlp
    assert all(isinstance(p, torch.nn.Parameter) for p in mlp.values())
    # Every parameter of the model is in exactly one group, and the groups partition it.
    every = adapter.parameters(gdn_model, PARAMETER_GROUPS)
    assert set(every) == {n for n, _ in gdn_model.named_parameters()}


def test_checkpoint_views_match_transformers_own_layout(gdn_model, tiny_gdn):
    adapter = ArchitectureAdapter.for_model(gdn_model)
    views = adapter.checkpoint_tensors(gdn_model)
    on_disk = load_file(str(tiny_gdn / "model.safetensors"))
    assert set(views) == set(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(views[name], tensor), name
    # Views share storage: writing one writes the fused in-memory expert weight.
    views["model.layers.1.mlp.experts.2.up_proj.weight"].fill_(0.5)
    fused = gdn_model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.all(fused[2, fused.shape[1] // 2:] == 0.5)
    assert not torch.all(fused[2, : fused.shape[1] // 2] == 0.5)


def test_qwen3_5_split_projections_map_to_groups():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, architectures=["Qwen3_5ForCausalLM"])
    model = Qwen3_5ForCausalLM(config)
    adapter = ArchitectureAdapter.for_model(model)
    assert adapter.family == "Qwen3.5"
    assert adapter.layer_kinds == ("gdn", "gdn", "gdn", "attention")
    proj = adapter.parameters(model, ["gdn.proj"])
    assert sorted(proj) == sorted(
        f"model.layers.{i}.linear_attn.in_proj_{p}.weight"
        for i in range(3) for p in ("qkv", "z", "b", "a"))
    assert set(adapter.parameters(model, PARAMETER_GROUPS)) == {n for n, _ in model.named_parameters()}
    # Real Qwen3.5 checkpoints nest the text model under model.language_model.
    assert group_of("model.language_model.layers.5.linear_attn.in_proj_z.weight") == "gdn.proj"
    assert group_of("model.language_model.norm.weight") == "norm"
    assert group_of("model.visual.merger.norm.weight") is None
    assert group_of("mtp.layers.0.self_attn.q_proj.weight") is None


def test_dense_and_llama_families(tiny_dense):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_dense)
    adapter = ArchitectureAdapter.for_model(dense)
    assert adapter.layer_kinds == ("attention",) * 4
    assert "model.layers.2.self_attn.k_norm.weight" in adapter.parameters(dense, ["attn.norm"])
    # A spec's default targets include gdn groups; on a dense model they add nothing.
    chosen = adapter.parameters(dense, ["gdn.gates", "gdn.proj", "attn.q"])
    assert sorted(chosen) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)]
    with pytest.raises(BehaviorError, match="no parameters in `gdn.gates`"):
        adapter.parameters(dense, ["gdn.gates"])

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"]))
    adapter = ArchitectureAdapter.for_model(llama)
    assert adapter.family == "Llama"
    assert set(adapter.parameters(llama, PARAMETER_GROUPS)) == {n for n, _ in llama.named_parameters()}


def test_unknown_architecture_and_group_are_named():
    with pytest.raises(BehaviorError, match="unknown architecture `GPT2LMHeadModel`"):
        ArchitectureAdapter.for_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(BehaviorError, match="unknown parameter group `gdn.gate`") as err:
        from behaviorc.model.adapter import check_groups
        check_groups(["gdn.gate"])
    assert "gdn.gates" in err.value.render()
