"""From a model source to the local folder to load, at run time: a built-in name (made
on first use), a local folder, or a hub id already in the local Hugging Face cache;
a BehaviorError saying what to do otherwise.

Nothing is ever downloaded. The folder found is checked (`validate_model_folder`)
before it is returned. What a spec may name is checked earlier, without torch, by
`behaviorc.lang.models.check_model_source`; both follow `behaviorc.core.catalog`.
"""

from __future__ import annotations

from pathlib import Path

from behaviorc.core.catalog import is_hub_id
from behaviorc.core.diagnostics import BehaviorError, Location, did_you_mean
from behaviorc.model.builtin import BUILTINS, BuildProgress, ensure_builtin
from behaviorc.model.loading import validate_model_folder


def resolve_model_folder(source: str, loc: Location | None = None,
                         progress: BuildProgress | None = None) -> Path:
    """The local folder for a built-in name, a folder path, or a cached hub id."""
    if source in BUILTINS:
        return ensure_builtin(source, progress)
    path = Path(source).expanduser()
    if path.exists():
        validate_model_folder(path, loc)
        return path.resolve()
    if is_hub_id(source):
        folder = _cached_hub_snapshot(source, loc)
        validate_model_folder(folder, loc)
        return folder
    raise BehaviorError(
        f"no model folder `{source}`", loc,
        hint=did_you_mean(source, BUILTINS) or f"use a built-in ({', '.join(BUILTINS)}), a local Hugging Face "
                                                "folder, or a hub id already in the local cache")


def _cached_hub_snapshot(repo_id: str, loc: Location | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise BehaviorError(
            f"this machine is offline; `{repo_id}` is not in the local Hugging Face cache "
            "and cannot be downloaded", loc,
            hint="download it on a connected machine (`huggingface-cli download "
                 f"{repo_id} --local-dir DIR`), copy the folder here and point `model` "
                 "at the local folder") from None
