"""Writing a trained model in the layout of the folder it came from.

transformers loads a Qwen3.5 conditional-generation checkpoint for causal LM as the text
model alone: its `save_pretrained` would write a text-only `Qwen3_5ForCausalLM` folder
without the vision tower and the `mtp.*` tensors. A trained folder is instead the source
folder with the trained tensors replaced: every tensor the training left as it was is
copied byte for byte (name, dtype, bytes), every tensor it changed takes the model's
values, and the source's other files (config, tokenizer, chat template, processor
configs) come along as they were. So a trained folder loads as the same class, and a
task vector between it and its source holds only what changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from behaviorc.core.atomic import atomic_folder
from behaviorc.formats.safetensors_io import (
    INDEX_FILE, PlannedTensor, StreamWriter, WeightFolder, computable, row_blocks, write_index)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# What a source folder holds that does not describe the trained model (a built-in's
# marker, a composed folder's provenance).
_NOT_CARRIED = frozenset({INDEX_FILE, "behaviorc.json", "mergekit_config.yml",
                          "pytorch_model.bin.index.json"})


def save_model(model: Any, folder: Path, source: Path) -> None:
    """The trained `model` of the folder `source` as a Hugging Face folder in `source`'s
    layout, written beside and renamed."""
    with atomic_folder(folder, overwrite=True) as staging:
        saved = staging / ".saved"  # transformers' names and dtypes, read back below
        model.save_pretrained(saved, safe_serialization=True)
        write_in_layout(Path(source), saved, staging)
        shutil.rmtree(saved)


def write_in_layout(source: Path, saved: Path, out: Path) -> None:
    """Into `out`: `source`'s files and tensors, a tensor replaced by the one of the
    same name in `saved` where their values differ (tensors `saved` has and `source`
    lacks are added after). Shards as in `source`."""
    with WeightFolder(source) as original, WeightFolder(saved) as trained:
        shards: list[tuple[str, list[PlannedTensor]]] = []
        taken: dict[str, WeightFolder] = {}
        for opened in original.files:
            plan = []
            for info in sorted(opened.tensors.values(), key=lambda i: i.offset):
                changed = info.name in trained.tensors and _differs(info.name, original, trained)
                taken[info.name] = trained if changed else original
                chosen = taken[info.name].tensors[info.name]
                plan.append(PlannedTensor(info.name, chosen.dtype, tuple(chosen.shape)))
            shards.append((opened.path.name, plan))
        added = [PlannedTensor(name, info.dtype, tuple(info.shape))
                 for name, info in trained.tensors.items() if name not in original.tensors]
        for name in (p.name for p in added):
            taken[name] = trained
        if added:
            shards[-1][1].extend(added)
        writer = StreamWriter(out, shards, {"behaviorc": "trained"}, hashed=False)
        try:
            for _, plan in shards:
                for planned in plan:
                    weights = taken[planned.name]
                    writer.write(planned.name, (weights.read(planned.name, rows)
                                                for rows in row_blocks(weights.tensors[planned.name])))
            writer.finish()
        finally:
            writer.close()
        if (source / INDEX_FILE).is_file():
            write_index(out, shards)
    for item in sorted(source.iterdir()):
        if (item.is_file() and item.name not in _NOT_CARRIED
                and not item.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copy2(item, out / item.name)


def _differs(name: str, original: WeightFolder, trained: WeightFolder) -> bool:
    before, after = original.tensors[name], trained.tensors[name]
    if tuple(before.shape) != tuple(after.shape):
        return True
    for rows in row_blocks(before):
        old = computable(original.read(name, rows), before.dtype)
        new = computable(trained.read(name, rows), after.dtype)
        if not np.array_equal(old.astype(np.float64) if before.is_float else old,
                              new.astype(np.float64) if after.is_float else new):
            return True
    return False
