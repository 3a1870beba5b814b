"""`tiny-qwen3.5`: a random Qwen3.5 in the layout of the published checkpoints.

Published Qwen3.5 models are `Qwen3_5ForConditionalGeneration` folders: a vision tower
(`model.visual.*`), the text model under `model.language_model.*` with Gated DeltaNet and
full-attention layers 3:1 (`layer_types`, full attention every 4th layer), one
multi-token-prediction layer (`mtp.*`, which transformers does not build and vLLM loads
only for speculative decoding) and a chat template whose thinking mode is on unless
`enable_thinking` is false. This one has all of that at sizes vLLM's CPU kernels take
(head_dim 64, GDN key/value head dims 64), over the shared tokenizer with Qwen's special
tokens. Deterministic: weights from a fixed seed, the tokenizer trained here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from behaviorc.model.tiny import SEED, build_tokenizer

NAME = "tiny-qwen3.5"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
THINK_TOKENS = ("<think>", "</think>")  # plain added tokens: decoded replies keep them
EOS_TOKEN = "<|im_end|>"

# Renders turns as the published Qwen3.5 template does (written here, not copied): the
# generation prompt opens a thinking block (`<think>\n`) unless `enable_thinking` is
# false, which gives an empty one; an earlier assistant turn shows only its answer, the
# one after the last user turn its reasoning too; image and video parts become the
# vision placeholders.
CHAT_TEMPLATE = """\
{%- macro render(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}
{%- if part.type == 'image' or 'image' in part -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'video' or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in part -%}{{ part.text }}
{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- set content = render(m.content) -%}
{%- if m.role == 'assistant' -%}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] -%}
{%- endif -%}
{%- if loop.index0 > ns.last_user -%}
{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}
{%- else -%}
{{ '<|im_start|>assistant\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}
{%- endif -%}
{%- else -%}
{{ '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}
{%- else -%}{{ '<think>\\n' }}{%- endif -%}
{%- endif -%}
"""

HIDDEN = 128
LAYERS = 4  # three Gated DeltaNet layers, then full attention: the published 3:1


def text_config(vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    head_dim = 64
    rotary_half = int(head_dim * 0.25) // 2
    return {
        "model_type": "qwen3_5_text",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 256,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "layer_types": [("full_attention" if (i + 1) % 4 == 0 else "linear_attention")
                        for i in range(LAYERS)],
        "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "attention_bias": False,
        # interleaved multimodal rotary positions over a quarter of each head, as published
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0,
                            "partial_rotary_factor": 0.25, "mrope_interleaved": True,
                            "mrope_section": [rotary_half - 2 * (rotary_half // 3),
                                              rotary_half // 3, rotary_half // 3]},
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": token_ids[EOS_TOKEN],
        "pad_token_id": token_ids["<|endoftext|>"],
        "initializer_range": 0.02,
    }


def config_fields(vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """config.json of the conditional-generation checkpoint."""
    return {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": text_config(vocab_size, token_ids),
        "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": HIDDEN,
                          "intermediate_size": 256, "num_heads": 2, "in_channels": 3,
                          "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "out_hidden_size": HIDDEN, "num_position_embeddings": 64,
                          "hidden_act": "gelu_pytorch_tanh"},
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def tokenizer():
    return build_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, EOS_TOKEN, THINK_TOKENS)


def write_tiny_qwen35(folder: Path, builder_version: int) -> None:
    """Write the folder: tokenizer, config, weights with a vision tower and `mtp.*`."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    tok.save_pretrained(folder)
    token_ids = {t: tok.convert_tokens_to_ids(t) for t in [*SPECIAL_TOKENS, *THINK_TOKENS]}
    config = Qwen3_5Config(**config_fields(len(tok), token_ids))
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16)
        mtp = mtp_tensors(config.text_config)
    model.save_pretrained(folder, safe_serialization=True)
    # transformers has no MTP module; published checkpoints carry one beside the model
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file
    tensors = load_file(weights)
    save_file({**tensors, **mtp}, weights, metadata={"format": "pt"})
    (folder / "behaviorc.json").write_text(json.dumps(
        {"builtin": NAME, "builder_version": builder_version, "seed": SEED}, indent=2) + "\n")


def mtp_tensors(text: Any) -> dict[str, Any]:
    """One multi-token-prediction layer as published checkpoints name it: a
    full-attention decoder layer, the norms of its two inputs and the projection that
    joins them, and its own final norm (bfloat16, random)."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer

    attention_layer = text.layer_types.index("full_attention")
    layer = Qwen3_5DecoderLayer(text, attention_layer)
    hidden = text.hidden_size
    tensors = {f"mtp.layers.0.{name}": value for name, value in layer.state_dict().items()}
    tensors["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden) * text.initializer_range
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        tensors[f"mtp.{norm}.weight"] = torch.zeros(hidden)  # (1 + w) norms start at zero
    return {name: value.to(torch.bfloat16).contiguous() for name, value in sorted(tensors.items())}
