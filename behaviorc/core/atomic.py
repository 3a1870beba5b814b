"""Artifacts appear whole or not at all (shared by every area that writes files or folders).

Everything is built in a temporary sibling of the target (same file system, so the final
rename is atomic) and renamed into place only when complete; on any failure the
temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from behaviorc.core.diagnostics import BehaviorError


@contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty folder that becomes `target` when the block finishes."""
    target = Path(target)
    _refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    with _owned_stem(target) as stem:
        staging = stem.with_name(stem.name + ".tmp")
        staging.mkdir()
        try:
            yield staging
            if target.exists():
                retired = stem.with_name(stem.name + ".old")
                retired.mkdir()
                os.replace(target, retired / target.name)
                os.replace(staging, target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned(target: Path) -> None:
    """Remove the staging and retired folders that writers of `target` (or of a sibling
    whose name extends it) left when killed: those whose lock no process holds. A live
    writer holds its lock until it is done, so its folders are never touched; folders
    with no lock (from before locks) are left alone, their owner unknown."""
    target = Path(target)
    for lock in target.parent.glob(f".{glob.escape(target.name)}.*{_LOCK}"):
        try:
            handle = os.open(lock, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or another user's
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)
            continue  # its writer is alive
        try:
            stem = str(lock)[:-len(_LOCK)]
            for leftover in (stem + ".tmp", stem + ".old"):
                shutil.rmtree(leftover, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(handle)


_LOCK = ".lock"


@contextmanager
def _owned_stem(target: Path) -> Iterator[Path]:
    """A unique name beside `target` whose `.lock` file this process holds locked while
    the block runs; the kernel drops the lock when the process dies, however it dies,
    which is how `remove_abandoned` knows a writer is gone."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_LOCK, dir=target.parent)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield Path(name[:-len(_LOCK)])
    finally:
        Path(name).unlink(missing_ok=True)
        os.close(handle)


@contextmanager
def atomic_file(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path that replaces `target` when the block finishes."""
    target = Path(target)
    _refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600: an artifact is read like any file
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str, *, sync: bool = False, mode: int | None = None) -> None:
    """Replace `target` with `text` (UTF-8): readers see the old file or the new one, never
    a part. `sync` makes the new content durable before it takes the name (the store's
    records); `mode` sets its permission bits (a reformatted spec keeps its own)."""
    with atomic_file(target, overwrite=True) as staging:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(staging, mode)


def write_json_atomic(target: Path, data: Any) -> None:
    """JSON, durably, that readers see whole or not at all."""
    write_text_atomic(target, json.dumps(data, indent=1), sync=True)


def _umask() -> int:
    """The process's umask, read where Linux shows it: os.umask can only read it by
    setting it, and a file another thread made meanwhile would get no mask at all."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise BehaviorError(f"{target} already exists", hint="choose another path, or overwrite it")
