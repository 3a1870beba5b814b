"""The built-in models: made here on first use, with no download, into a cache folder
that transformers and vLLM load like any model (`behaviorc.core.catalog` names them): the
tiny models (`behaviorc.model.tiny`), the testbed (`behaviorc.model.testbed`) and
SmolLM2-135M-Instruct, converted from the GGUF file an installed package ships
(`behaviorc.model.smollm2`).

Bump `catalog.BUILDER_VERSION` whenever anything here changes what is written.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from behaviorc.core.atomic import atomic_folder, remove_abandoned
from behaviorc.core.catalog import BUILDER_VERSION, BUILTIN_MODELS, BuiltinInfo, builtin_path
from behaviorc.model import qwen35, smollm2, testbed, tiny

BuildProgress = Callable[[int, int, float], None]  # (step, steps, loss) of a trained built-in


@dataclass(frozen=True)
class BuiltinModel:
    info: BuiltinInfo
    # vocab size -> config.json fields, initialized over the shared tokenizer; None for
    # a model whose `write` makes the whole folder
    config: Callable[[int], dict[str, Any]] | None
    # Writes the whole folder itself (a model that is trained, or laid out as published),
    # reporting (step, steps, loss) if trained; None: initialize `config`.
    write: Callable[[Path, BuildProgress | None], None] | None = None

    @property
    def description(self) -> str:
        return self.info.description

    @property
    def architecture(self) -> str:
        return self.info.architecture


_MAKERS: dict[str, tuple[Callable[[int], dict[str, Any]] | None, Callable[[Path, BuildProgress | None], None] | None]] = {
    "tiny-gdn": (tiny.tiny_gdn_config, None),
    "tiny-dense": (tiny.tiny_dense_config, None),
    qwen35.NAME: (None, lambda folder, progress: qwen35.write_tiny_qwen35(folder, BUILDER_VERSION)),
    "tiny-gdn-testbed": (tiny.tiny_gdn_config, testbed.write_testbed),
    "smollm2-135m": (smollm2.config_fields, lambda folder, progress: smollm2.write_smollm2(folder)),
}
BUILTINS: dict[str, BuiltinModel] = {
    name: BuiltinModel(info, *_MAKERS[name]) for name, info in BUILTIN_MODELS.items()}


def ensure_builtin(name: str, progress: BuildProgress | None = None) -> Path:
    """The folder of a built-in model, building it on first use (seconds; minutes for
    one that is trained, which reports `progress`)."""
    if name not in BUILTINS:
        raise KeyError(name)
    path = builtin_path(name)
    remove_abandoned(path)  # what a build of it killed midway left in the cache
    if (path / "model.safetensors").is_file():
        return path
    # One process makes it; others asking meanwhile wait and then find it made (the
    # testbed trains for minutes, and replacing a folder another process reads from
    # would pull files from under it). The locks live beside the models' folder, which
    # holds models only.
    locks = path.parent.with_name("locks")
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").is_file():
            with atomic_folder(path, overwrite=True) as staging:
                write_builtin(name, staging, progress)
    return path


def write_builtin(name: str, folder: Path, progress: BuildProgress | None = None) -> None:
    """Write a built-in model's folder: config, weights, tokenizer. Deterministic."""
    spec = BUILTINS[name]
    if spec.write is not None:
        spec.write(folder, progress)
    else:
        assert spec.config is not None
        tiny.write_tiny(folder, spec.config, BUILDER_VERSION, name)
