"""What behaviorc needs to know about a model's architecture, in one place.

The adapter answers: which modules are the decoder layers (the residual-stream hook
points, one per layer), which of them are Gated DeltaNet ("gdn") and which full
attention, and which parameters belong to each named group a spec may target
(`ir.PARAMETER_GROUPS`). Group membership is decided by parameter *name* alone, so the
same function classifies in-memory names (`model.layers.0.mlp.experts.gate_up_proj`)
and checkpoint names (`model.layers.0.mlp.experts.3.gate_proj.weight`), including the
`model.language_model.` prefix real Qwen3.5 checkpoints use.

Supported: Qwen3-Next (fused `in_proj_qkvz`/`in_proj_ba`), Qwen3.5 (split
`in_proj_qkv`/`in_proj_z`/`in_proj_b`/`in_proj_a`), Qwen3 / Qwen3-MoE, and the Llama
family (Llama, Mistral, Qwen2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from behaviorc.core.diagnostics import BehaviorError, Location, did_you_mean
from behaviorc.core.ir import PARAMETER_GROUPS

LayerKind = Literal["gdn", "attention"]
# `layer_types` values, by the kind of layer each is (transformers' names)
LAYER_TYPES: dict[str, LayerKind] = {"linear_attention": "gdn", "full_attention": "attention",
                                     "sliding_attention": "attention"}
# vision-language checkpoints whose text model is configured in `text_config`
_WRAPPED_TEXT = ("qwen3_5", "qwen3_5_moe")

# model_type -> the family name shown to users. Text configs of multimodal checkpoints
# (qwen3_5 -> text_config) are unwrapped before this lookup.
FAMILIES: dict[str, str] = {
    "qwen3_next": "Qwen3-Next",
    "qwen3_5_text": "Qwen3.5",
    "qwen3_5_moe_text": "Qwen3.5-MoE",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "qwen2": "Qwen2",
    "llama": "Llama",
    "mistral": "Mistral",
}

# Decoder-layer parameters, by what follows `layers.{i}.`; first match wins.
_LAYER_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), group) for pattern, group in (
        (r"linear_attn\.(A_log|dt_bias)$", "gdn.gates"),
        (r"linear_attn\.in_proj_\w+\.", "gdn.proj"),
        (r"linear_attn\.conv1d\.", "gdn.conv"),
        (r"linear_attn\.out_proj\.", "gdn.out"),
        (r"linear_attn\.norm\.", "gdn.norm"),
        (r"self_attn\.q_proj\.", "attn.q"),
        (r"self_attn\.[kv]_proj\.", "attn.kv"),
        (r"self_attn\.o_proj\.", "attn.o"),
        (r"self_attn\.[qk]_norm\.", "attn.norm"),
        (r"mlp\.", "mlp"),
        (r"\w*layernorm\.", "norm"),
    )
)
_PREFIX = r"^(?:model\.)?(?:language_model\.)?"
_LAYER_NAME = re.compile(_PREFIX + r"layers\.(\d+)\.(.+)$")
_TOP_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(_PREFIX + r"embed_tokens\.weight$"), "embed"),
    (re.compile(_PREFIX + r"norm\.weight$"), "norm"),
    (re.compile(r"^lm_head\.weight$"), "head"),
)


def group_of(param_name: str) -> str | None:
    """The parameter group a (in-memory or checkpoint) parameter name belongs to, or
    None for parameters outside every group (vision towers, MTP heads, buffers)."""
    layer = _LAYER_NAME.match(param_name)
    if layer:
        rest = layer.group(2)
        for pattern, group in _LAYER_RULES:
            if pattern.match(rest):
                return group
        return None
    for pattern, group in _TOP_RULES:
        if pattern.match(param_name):
            return group
    return None


def layer_of(param_name: str) -> int | None:
    """The decoder-layer index a parameter name lives in, or None outside the layers."""
    layer = _LAYER_NAME.match(param_name)
    return int(layer.group(1)) if layer else None


def check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """The groups, each validated against `ir.PARAMETER_GROUPS`."""
    checked = tuple(groups)
    for group in checked:
        if group not in PARAMETER_GROUPS:
            raise BehaviorError(
                f"unknown parameter group `{group}`",
                hint=did_you_mean(group, PARAMETER_GROUPS)
                or f"known groups: {', '.join(PARAMETER_GROUPS)}")
    return checked


@dataclass(frozen=True)
class ArchitectureAdapter:
    family: str  # e.g. "Qwen3-Next"
    architecture: str  # e.g. "Qwen3NextForCausalLM"
    model_type: str  # of the text config
    num_layers: int
    hidden_size: int
    layer_kinds: tuple[LayerKind, ...]

    group_of = staticmethod(group_of)
    layer_of = staticmethod(layer_of)

    @classmethod
    def for_config(cls, config: Any, field_at: Callable[[str], Location | None] = lambda field: None
                   ) -> "ArchitectureAdapter":
        """The adapter for a transformers config (or a config.json dict); `field_at`
        places an error at the config field it is about."""
        fields = config if isinstance(config, dict) else config.to_dict()
        architectures = fields.get("architectures") or []
        architecture = architectures[0] if architectures else "(none listed)"
        if fields.get("model_type") in _WRAPPED_TEXT and "ForConditionalGeneration" in architecture:
            if not isinstance(fields.get("text_config"), dict):
                raise BehaviorError(
                    f"config.json of this `{architecture}` has no `text_config` object: the "
                    "text model's layers and sizes are configured there", field_at("model_type"),
                    hint="copy config.json from the checkpoint the weights came from")
        text = fields.get("text_config") or fields
        model_type = text.get("model_type") or fields.get("model_type")
        if model_type in _WRAPPED_TEXT:  # a text config saved without text_config
            model_type += "_text"
        family = FAMILIES.get(model_type or "")
        if family is None:
            known = ", ".join(sorted(set(FAMILIES.values())))
            raise BehaviorError(
                f"unknown architecture `{architecture}` (model_type `{model_type}`): "
                "behaviorc cannot find its decoder layers and parameter groups",
                hint=f"supported families: {known}")
        missing = [k for k in ("num_hidden_layers", "hidden_size") if not isinstance(text.get(k), int)]
        if missing:
            raise BehaviorError(
                f"the {family} config has no {' or '.join(f'`{k}`' for k in missing)}: "
                "cannot tell how many decoder layers the model has", field_at(missing[0]))
        num_layers = text["num_hidden_layers"]
        layer_types = text.get("layer_types") or ["full_attention"] * num_layers
        if not isinstance(layer_types, list) or len(layer_types) < num_layers:
            raise BehaviorError(
                f"the {family} config's `layer_types` must list one type for each of its "
                f"{num_layers} layers", field_at("layer_types"))
        unknown = sorted({str(t) for t in layer_types if t not in LAYER_TYPES})
        if unknown:
            raise BehaviorError(
                f"the {family} config's `layer_types` holds unknown "
                f"{'types' if len(unknown) > 1 else 'type'} {', '.join(f'`{t}`' for t in unknown)}",
                field_at("layer_types"), hint=did_you_mean(unknown[0], LAYER_TYPES)
                or f"each is one of {', '.join(LAYER_TYPES)}")
        kinds = tuple(LAYER_TYPES[t] for t in layer_types[:num_layers])
        return cls(family=family, architecture=architecture, model_type=model_type,
                   num_layers=num_layers, hidden_size=text["hidden_size"], layer_kinds=kinds)

    @classmethod
    def for_model(cls, model: Any) -> "ArchitectureAdapter":
        """The adapter for a loaded model; checks that its layers are where expected."""
        adapter = cls.for_config(model.config)
        layers = adapter.decoder_layers(model)
        for index, (layer, kind) in enumerate(zip(layers, adapter.layer_kinds)):
            mixer = "linear_attn" if kind == "gdn" else "self_attn"
            if not hasattr(layer, mixer):
                raise BehaviorError(
                    f"{adapter.family} decoder layer {index} has no `{mixer}` module, "
                    f"although the config says it is a {kind} layer")
        return adapter

    def decoder_layers(self, model: Any) -> list[Any]:
        """The decoder layers, in order: their outputs are the residual-stream hook points."""
        import torch.nn as nn

        for path in ("model.layers", "model.language_model.layers", "layers"):
            module: Any = model
            for part in path.split("."):
                module = getattr(module, part, None)
                if module is None:
                    break
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return list(module)
        raise BehaviorError(
            f"could not find the {self.num_layers} decoder layers of this {self.family} "
            f"model (`{type(model).__name__}`): looked for `model.layers` and "
            "`model.language_model.layers`")

    def parameters(self, model: Any, groups: Iterable[str]) -> dict[str, Any]:
        """The model's parameters in any of `groups`, by in-memory name. Groups this
        architecture lacks (gdn.* on a dense model) contribute nothing; asking only
        for absent groups is an error."""
        wanted = set(check_groups(groups))
        found = {name: param for name, param in model.named_parameters()
                 if group_of(name) in wanted}
        if not found:
            present = sorted({g for n, _ in model.named_parameters() if (g := group_of(n))})
            raise BehaviorError(
                f"this {self.family} model has no parameters in "
                f"{', '.join(f'`{g}`' for g in sorted(wanted))}",
                hint=f"its groups are: {', '.join(present)}")
        return found

    def checkpoint_tensors(self, model: Any) -> dict[str, Any]:
        """The model's parameters under their checkpoint names, as views sharing storage
        with the model: writing into a view writes the weight. transformers keeps MoE
        experts fused in memory (`experts.gate_up_proj` [E, 2I, H], gate rows first;
        `experts.down_proj` [E, H, I]); checkpoints store one matrix per expert. Tied
        weights appear under each of their names."""
        views: dict[str, Any] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            data = param.data
            if name.endswith("experts.gate_up_proj") and data.dim() == 3:
                prefix = name[: -len("gate_up_proj")]
                half = data.shape[1] // 2
                for expert in range(data.shape[0]):
                    views[f"{prefix}{expert}.gate_proj.weight"] = data[expert, :half]
                    views[f"{prefix}{expert}.up_proj.weight"] = data[expert, half:]
            elif name.endswith("experts.down_proj") and data.dim() == 3:
                prefix = name[: -len("down_proj")]
                for expert in range(data.shape[0]):
                    views[f"{prefix}{expert}.down_proj.weight"] = data[expert]
            else:
                views[name] = data
        return views
