"""The content-addressed artifact store of one build directory.

Layout, all under `<out>/.store/` (inside the build's `--out` folder, so `behaviorc clean
DIR` removes everything a build made and two specs never share half of a cache):

    <key>/                 a finished task: its artifacts, and `result.json` holding the
                           TaskResult (artifact names relative to this folder) and a
                           manifest with the sha256 of every artifact file
    <key>.tmp-<pid>/       the staging folder a running task writes into (`ctx.out`);
                           renamed to `<key>/` only once everything in it is on disk
    <key>.scratch/         a task's stable scratch folder (`ctx.scratch`): it survives a
                           killed build so long work (training checkpoints) can resume,
                           and is removed once the task's result is stored

A folder is a finished entry exactly when its name is a bare key; staging folders are
never read. A build holds `<out>/.store/lock` (an flock, released by the kernel even on
kill -9) for its whole run, so any staging folder found while holding it belongs to a
dead build and is removed. Reading an entry re-hashes every file its manifest lists: a
missing, changed or unreadable file makes the entry invalid, and the executor reruns the
task.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behaviorc.diagnostics import BehaviorError
from behaviorc.plan.task import Task, TaskResult

RESULT_FILE = "result.json"
STORE_FORMAT = 1
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredResult:
    """A verified store entry: the task's result with artifact paths made absolute."""

    key: str
    path: Path
    result: TaskResult
    seconds: float


class InvalidEntry(Exception):
    """A store entry that must not be read (missing file, wrong hash, bad JSON)."""


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_fd: int | None = None

    # --- the build lock -------------------------------------------------------------

    def acquire(self) -> None:
        """Take the store for this process; clean what dead builds left half-written."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BehaviorError(
                f"another build is running in {self.root.parent}",
                hint="wait for it to finish, or cancel it (`behaviorc dash DIR`, key c)") from None
        self._lock_fd = fd
        self._remove_staging()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _remove_staging(self) -> None:
        """Remove staging folders of dead builds, and scratch folders of tasks whose
        result was stored (a kill can land between storing and removing the scratch)."""
        for entry in self.root.iterdir():
            finished_scratch = entry.name.endswith(".scratch") and self.entry(entry.name[:-8]).is_dir()
            if ".tmp-" in entry.name or ".old-" in entry.name or finished_scratch:
                shutil.rmtree(entry, ignore_errors=True)

    # --- paths ------------------------------------------------------------------------

    def entry(self, key: str) -> Path:
        return self.root / key

    def staging(self, key: str) -> Path:
        """A fresh, empty staging folder for `key`, owned by this process."""
        path = self.root / f"{key}.tmp-{os.getpid()}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def scratch(self, key: str) -> Path:
        path = self.root / f"{key}.scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- reading ----------------------------------------------------------------------

    def lookup(self, key: str) -> StoredResult | None:
        """The verified entry for `key`, None when there is none. Raises InvalidEntry
        when an entry exists but cannot be trusted."""
        folder = self.entry(key)
        if not folder.is_dir():
            return None
        try:
            record = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
            if record.get("format") != STORE_FORMAT or record.get("key") != key:
                raise InvalidEntry(f"{RESULT_FILE} is not an entry for {key}")
            manifest: dict[str, str] = record["manifest"]
            for name, digest in manifest.items():
                actual = _sha256(folder / name)
                if actual != digest:
                    raise InvalidEntry(f"{name} changed on disk (sha256 {actual[:12]}, "
                                       f"expected {digest[:12]})")
            result = TaskResult.model_validate(record["result"])
        except FileNotFoundError as err:
            raise InvalidEntry(f"missing file {Path(err.filename).name}") from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InvalidEntry(f"unreadable entry: {err}") from err
        return StoredResult(key, folder, _absolute(result, folder), float(record.get("seconds", 0.0)))

    def discard(self, key: str) -> None:
        """Remove an entry (corrupt, or forced to rebuild)."""
        folder = self.entry(key)
        if folder.exists():
            doomed = self.root / f"{key}.old-{os.getpid()}"
            folder.rename(doomed)  # the bare name disappears in one step
            shutil.rmtree(doomed, ignore_errors=True)

    # --- writing ----------------------------------------------------------------------

    def commit(self, task: Task, staging: Path, result: TaskResult, seconds: float) -> StoredResult:
        """Seal a staging folder as the entry for `task.key`: hash and fsync every file,
        write result.json last, then rename the folder into place."""
        _check_artifacts(task, staging, result)
        manifest = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            manifest[path.relative_to(staging).as_posix()] = _sha256(path, fsync=True)
        record: dict[str, Any] = {
            "format": STORE_FORMAT,
            "key": task.key,
            "task": task.id,
            "kind": task.kind,
            "version": task.version,
            "seconds": seconds,
            "result": result.model_dump(mode="json"),
            "manifest": manifest,
        }
        _write_synced(staging / RESULT_FILE, json.dumps(record, indent=1, sort_keys=True))
        _fsync_tree(staging)
        self.discard(task.key)
        staging.rename(self.entry(task.key))
        _fsync_dir(self.root)
        shutil.rmtree(self.root / f"{task.key}.scratch", ignore_errors=True)
        return StoredResult(task.key, self.entry(task.key), _absolute(result, self.entry(task.key)), seconds)


def _check_artifacts(task: Task, staging: Path, result: TaskResult) -> None:
    """Every artifact a task names must exist, inside its folder or (for imported
    models) as an absolute path outside the store."""
    for name, value in result.artifacts.items():
        path = Path(value)
        if path.is_absolute():
            if staging in path.parents or path == staging:
                raise ValueError(f"task {task.id} named artifact {name!r} by its staging path; "
                                 "name artifacts relative to ctx.out")
            if not path.exists():
                raise ValueError(f"task {task.id}: artifact {name!r} does not exist: {path}")
        elif not (staging / path).exists():
            raise ValueError(f"task {task.id} returned artifact {name!r} = {value!r} "
                             f"but wrote no such file in ctx.out")
        elif ".." in path.parts:
            raise ValueError(f"task {task.id}: artifact {name!r} points outside ctx.out")


def _absolute(result: TaskResult, folder: Path) -> TaskResult:
    artifacts = {name: str(folder / value) if not Path(value).is_absolute() else value
                 for name, value in result.artifacts.items()}
    return result.model_copy(update={"artifacts": artifacts})


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(folder: Path) -> None:
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_synced(tmp, json.dumps(data, indent=1))
    os.replace(tmp, path)
