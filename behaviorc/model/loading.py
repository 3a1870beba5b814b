"""Checking and loading model folders (`behaviorc.model.resolve` finds the folder a
model source names).

Everything here works offline: nothing is ever downloaded. A model folder is checked
before transformers sees it, so a missing config, a truncated safetensors file or an
unknown dtype is a BehaviorError naming the file, never a traceback from deep inside a
loader.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from behaviorc.formats.safetensors_io import SafetensorsFile
from behaviorc.core.diagnostics import BehaviorError, Location, located_at
from behaviorc.core.context import TOO_LONG_HINT, over_context, positions_in
from behaviorc.core.vocabulary import DTYPES
from behaviorc.model.adapter import ArchitectureAdapter

# Set before transformers / huggingface_hub are first imported, so nothing is fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# What config.json may say about the stored dtype (both spellings transformers writes).
_CONFIG_DTYPES = {"float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "auto"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def validate_model_folder(path: Path, loc: Location | None = None) -> ArchitectureAdapter:
    """Check a Hugging Face folder without loading it; the adapter for its config."""
    path = Path(path)
    if not path.is_dir():
        raise BehaviorError(f"model folder `{path}` is not a folder", loc)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BehaviorError(
            f"`{path}` has no config.json, so it is not a Hugging Face model folder", loc,
            hint="a model folder holds config.json, *.safetensors and tokenizer files")
    config = _read_config(config_path)
    _check_config_dtype(config_path, config)
    with located_at(_field_location(config_path, "model_type")):
        adapter = ArchitectureAdapter.for_config(config, lambda key: _field_location(config_path, key))
    for weights in weight_files(path, loc):
        check_safetensors_file(weights)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise BehaviorError(
            f"`{path}` has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})", loc)
    return adapter


def _read_config(config_path: Path) -> dict[str, Any]:
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BehaviorError(f"cannot read `{config_path}`: {err}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        where = Location(file=str(config_path), line=err.lineno, column=err.colno,
                         end_line=err.lineno, end_column=err.colno + 1)
        raise BehaviorError(f"config.json is not valid JSON: {err.msg}", where) from None
    if not isinstance(config, dict):
        raise BehaviorError(f"`{config_path}` must hold a JSON object")
    return config


def _check_config_dtype(config_path: Path, config: dict[str, Any]) -> None:
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and value not in _CONFIG_DTYPES:
            raise BehaviorError(
                f"unknown dtype `{value}` in config.json `{key}`",
                _field_location(config_path, key),
                hint=f"one of {', '.join(sorted(_CONFIG_DTYPES - {'auto'}))}")


def _field_location(config_path: Path, key: str) -> Location:
    """Where `"key"` appears in a JSON file (its first line if it does not)."""
    needle = f'"{key}"'
    for number, line in enumerate(config_path.read_text(encoding="utf-8").splitlines(), 1):
        column = line.find(needle)
        if column >= 0:
            return Location(file=str(config_path), line=number, column=column + 1,
                            end_line=number, end_column=column + 1 + len(needle))
    return Location(file=str(config_path), line=1, column=1, end_line=1, end_column=2)


def weight_files(path: Path, loc: Location | None = None) -> list[Path]:
    """The safetensors files of a model folder, as loaders read them: the shards its
    index names, else every `*.safetensors`; a BehaviorError when there are none."""
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise BehaviorError(f"`{index_path}` is not a valid safetensors index") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise BehaviorError(f"`{index_path}` lists shards that are missing: "
                                f"{', '.join(missing)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise BehaviorError(
            f"`{path}` has only pickle weights (.bin/.pt); behaviorc loads safetensors only",
            loc, hint="convert the weights to safetensors with transformers' save_pretrained")
    raise BehaviorError(f"`{path}` has no weights (*.safetensors)", loc)


def check_safetensors_file(file: Path) -> None:
    """Check a safetensors file's header against its size (no tensor is read)."""
    SafetensorsFile(file).close()


def check_tensor_shapes(path: Path, loc: Location | None = None) -> None:
    """A BehaviorError naming every tensor whose stored shape is not the one the folder's
    config gives it. The model is built on the meta device (no memory, no weights read)
    as the class config.json names, so a vision tower is checked too; tensors that class
    does not hold (multi-token-prediction layers) are not."""
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        named = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        with torch.device("meta"):
            model = (named._from_config(config) if isinstance(named, type)
                     else AutoModelForCausalLM.from_config(config))
            expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    except Exception:  # a config transformers cannot build: its own error says more
        return
    wrong = []
    for file in weight_files(path, loc):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                stored = list(handle.get_slice(name).get_shape())
                if name in expected and stored != expected[name]:
                    wrong.append(f"tensor `{name}` in {file.name} has shape {stored}, the "
                                 f"config makes it {expected[name]}")
    if wrong:
        more = f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
        raise BehaviorError(f"`{path}` does not match its config.json: "
                            + "; ".join(wrong[:10]) + more, loc,
                            hint="the weights come from another model, or config.json was "
                                 "edited; put the matching config.json beside them")


def has_vision_tower(folder: Path) -> bool:
    """Whether a (checked) model folder is a vision-language checkpoint."""
    return "vision_config" in _read_config(Path(folder) / "config.json")


def context_positions(config: Any) -> int | None:
    """How many token positions the model takes (None when its config does not say)."""
    return positions_in(config.to_dict())


def refuse_over_context(tokens: int, positions: int | None, what: str,
                        loc: Location | None = None) -> None:
    """A BehaviorError when `tokens` do not fit the model's positions, raised before any
    forward pass: past them a model reads nonsense, slowly."""
    reason = over_context(tokens, positions)
    if reason:
        raise BehaviorError(f"{what} {reason}", loc, hint=TOO_LONG_HINT)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BehaviorError("device `cuda` was asked for, but this machine has no CUDA GPU",
                            hint="use `device cpu` or `device auto`")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BehaviorError(f"unknown device `{device}`", hint="one of cpu, cuda, auto")
    return device


def torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise BehaviorError(f"unknown dtype `{dtype}`", hint=f"one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_model(path: Path | str, dtype: str = "float32", device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from a checked local folder, in eval mode on `device`."""
    torch_type = torch_dtype(dtype)
    target = resolve_device(device)
    path = Path(path)
    validate_model_folder(path)
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_type, local_files_only=True)
    except Exception as err:  # the folder passed our checks; transformers still refused it
        check_tensor_shapes(path)  # its report of a wrong shape goes to the log, not `err`
        raise BehaviorError(f"transformers could not load `{path}`: {err}") from None
    return model.to(target).eval(), load_tokenizer(path)


def load_empty_model(path: Path | str, dtype: str = "float32") -> Any:
    """The model of a checked local folder without its weights: parameters on the meta
    device (no memory), tied as the config says; buffers computed (rotary frequencies
    are not in the files). For a process that will fill only its part of each tensor."""
    from accelerate import init_empty_weights

    torch_type = torch_dtype(dtype)
    validate_model_folder(Path(path))
    quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_type)
    except Exception as err:
        raise BehaviorError(f"transformers could not build the model of `{path}`: {err}") from None
    model.tie_weights()
    return model.eval()


def load_tokenizer(path: Path | str) -> Any:
    """The folder's tokenizer, padding with EOS when it names no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise BehaviorError(f"transformers could not load the tokenizer of `{path}`: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _DropKernelFallbackNotice(logging.Filter):
    """transformers warns on every run that GDN layers use the reference PyTorch kernels
    when `fla` / `causal_conv1d` are absent; on CPU that is expected, so say nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "falling back to its reference PyTorch implementation" not in record.getMessage()


@cache
def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and kernel-fallback notices, once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("transformers.integrations.hub_kernels").addFilter(_DropKernelFallbackNotice())
