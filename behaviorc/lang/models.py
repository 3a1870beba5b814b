"""Where a model or an externally trained behavior comes from, and its fingerprint.

A fingerprint is a string that changes when the model's files do, so cache keys follow
it; computing one never loads weights (a built-in's is its builder version, a folder's
is its `stat_fingerprint`, a hub id's the id).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from behaviorc.core.vocabulary import ModelSourceKind
from behaviorc.core.diagnostics import DiagnosticSink, did_you_mean
from behaviorc.lang import ast
from behaviorc.lang.data import resolve_path
from behaviorc.core.catalog import BUILDER_VERSION, BUILTIN_MODELS as BUILTINS, is_hub_id
from behaviorc.core.textfiles import TextFileError, read_bytes


@dataclass(frozen=True)
class ModelSource:
    source: str
    kind: ModelSourceKind
    num_layers: int | None
    fingerprint: str


def check_model_source(name: ast.Str, base_dir: str, sink: DiagnosticSink) -> ModelSource | None:
    """What a spec's model names, at check time (nothing is built, read from the hub or
    loaded): a built-in name, an existing folder (relative to the spec), else a hub id;
    None after reporting an error to `sink`."""
    source = name.value
    if source in BUILTINS:
        layers = BUILTINS[source].num_layers
        return ModelSource(source, "builtin", layers, f"builtin:{source}:v{BUILDER_VERSION}")
    path = resolve_path(source, base_dir) if source.strip() else ""
    if path and os.path.exists(path):
        folder = read_model_folder(name, path, sink)
        if folder is None:
            return None
        layers, fingerprint = folder
        return ModelSource(os.path.abspath(path), "folder", layers, fingerprint)
    if is_hub_id(source):
        return ModelSource(source, "hub", None, f"hub:{source}")
    if "/" in source or source.startswith((".", "~")) or not source.strip():
        sink.error(f"model folder `{source}` not found", name.loc,
                   f"paths are relative to the spec's folder, `{base_dir or '.'}`")
    else:
        sink.error(f"unknown model `{source}`", name.loc,
                   did_you_mean(source, BUILTINS) or
                   f"use a built-in ({', '.join(BUILTINS)}), a model folder, or a hub id "
                   "like `Qwen/Qwen3-0.6B`")
    return None


def read_model_folder(name: ast.Str, path: str, sink: DiagnosticSink) -> tuple[int | None, str] | None:
    """(layer count, fingerprint) of a Hugging Face model folder, or None after an error."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        sink.error(f"`{name.value}` is a file; a model is a folder with config.json", name.loc)
        return None
    try:
        raw = read_bytes(config_path, "data")
        config = json.loads(raw)
    except FileNotFoundError:
        sink.error(f"`{name.value}` is not a Hugging Face model folder: it has no config.json",
                   name.loc)
        return None
    except (OSError, ValueError) as err:
        sink.error(f"cannot read {name.value}/config.json: {err}", name.loc)
        return None
    except TextFileError as err:
        sink.error(f"{name.value}/config.json: {err.message}", name.loc, err.hint)
        return None
    if not isinstance(config, dict):
        sink.error(f"{name.value}/config.json is not a JSON object", name.loc)
        return None
    layers = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers")
                        if isinstance(config.get("text_config"), dict) else None)
    return (layers if isinstance(layers, int) else None), stat_fingerprint(path, raw)


def stat_fingerprint(path: str, config: bytes) -> str:
    """A folder's config (its content) and its files' names, sizes and modification
    times: cheap to compute for a folder of gigabytes, and changed by any rewrite."""
    digest = hashlib.sha256(config)
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            stat = entry.stat()
            digest.update(f"\0{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return "folder:" + digest.hexdigest()
