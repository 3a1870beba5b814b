"""The content-addressed artifact store of one build directory.

Layout, all under `<out>/.store/` (inside the build's `--out` folder, so `behaviorc clean
DIR` removes everything a build made and two specs never share half of a cache):

    <key>/                 a finished task: its artifacts, and `result.json` holding the
                           TaskResult (artifact names relative to this folder), the
                           events the task emitted (replayed when it is reused, so the
                           dashboard of a cached build still shows its curves), a
                           manifest with the sha256 of every artifact file, and the
                           sha256 of the record itself
    <key>.tmp-<pid>/       the staging folder a running task writes into (`ctx.out`);
                           renamed to `<key>/` only once everything in it is on disk
    <key>.scratch/         a task's stable scratch folder (`ctx.scratch`): it survives a
                           killed build so long work (training checkpoints) can resume,
                           and is removed once the task's result is stored

A folder is a finished entry exactly when its name is a bare key; staging folders are
never read. The rename is what makes an entry visible, so a kill at any point leaves
either no entry or a whole one.

Durability against a power loss or an OS crash comes from fsync, done for each stored
entry (its files, its folder, the store folder) by a few background threads while the
build goes on; `release` waits for them, so a build that returned is on disk. Syncing
after the rename instead of before is safe because nothing is read unverified: an entry
a crash left incomplete fails its hashes and the task reruns. It keeps the disk's
latency off the per-task path (a loaded disk takes ~10 ms per fsync; concurrent fsyncs
share the journal's commits).

A build holds `<out>/.store/lock` (an flock, released by the kernel even on
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behaviorc.core.events import process_alive
from behaviorc.core.files import sha256_file
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.task import Task, TaskResult

RESULT_FILE = "result.json"
STORE_FORMAT = 2
_SYNC_THREADS = 8
SCRATCH_SUFFIX = ".scratch"
_PASSING_MARKS = (".tmp-", ".old-")  # staging of a result, or a result being removed


@dataclass(frozen=True)
class StoredResult:
    """A verified store entry: the task's result with artifact paths made absolute."""

    key: str
    path: Path
    result: TaskResult
    seconds: float
    events: list[dict[str, Any]]  # what the task emitted while it ran: {"type", ...fields}


class InvalidEntry(Exception):
    """A store entry that must not be read (missing file, wrong hash, bad JSON)."""


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_fd: int | None = None
        self._sync_pool: ThreadPoolExecutor | None = None
        self._syncing: list[Future] = []

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
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for `holder`: is a build still running?
        self._remove_staging()

    def holder(self) -> int | None:
        """The pid of the build using this store, None when no build is running.
        Reads what `acquire` wrote; a pid that is gone (a killed build) is None."""
        try:
            pid = int((self.root / "lock").read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def release(self) -> list[str]:
        """Wait until every entry this build stored is on disk, then let the store go.
        Returns the entries that could not be synced (they are verified when read)."""
        failures = self.wait_durable()
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
        return failures

    def wait_durable(self) -> list[str]:
        failures = []
        for future in self._syncing:
            error = future.exception()
            if error is not None:
                failures.append(str(error))
        self._syncing.clear()
        if self._sync_pool is not None:
            self._sync_pool.shutdown()
            self._sync_pool = None
        return failures

    def _remove_staging(self) -> None:
        """Remove staging folders of dead builds, and scratch folders of tasks whose
        result was stored (a kill can land between storing and removing the scratch)."""
        for entry in self.root.iterdir():
            scratch_of = _scratch_key(entry.name)
            if _is_passing(entry.name) or (scratch_of is not None and self.entry(scratch_of).is_dir()):
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
        path = self.root / f"{key}{SCRATCH_SUFFIX}"
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
            if record.pop("sha256", None) != _record_hash(record):
                raise InvalidEntry(f"{RESULT_FILE} changed on disk")
            manifest: dict[str, str] = record["manifest"]
            for name, digest in manifest.items():
                actual = sha256_file(folder / name)
                if actual != digest:
                    raise InvalidEntry(f"{name} changed on disk (sha256 {actual[:12]}, "
                                       f"expected {digest[:12]})")
            result = TaskResult.model_validate(record["result"])
        except FileNotFoundError as err:
            raise InvalidEntry(f"missing file {Path(err.filename).name}") from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InvalidEntry(f"unreadable entry: {err}") from err
        return StoredResult(key, folder, _absolute(result, folder), float(record["seconds"]),
                            list(record["events"]))

    def keys(self) -> list[str]:
        """The keys of the stored results (not staging, scratch or the lock)."""
        return sorted(entry.name for entry in self.root.iterdir() if entry.is_dir()
                      and _scratch_key(entry.name) is None and not _is_passing(entry.name))

    def remove_unused(self, used: set[str]) -> tuple[int, int]:
        """Remove the results, and the scratch of unfinished tasks, whose keys are not in
        `used`. Returns how many results went and the bytes freed (scratch included)."""
        unused = [self.entry(key) for key in self.keys() if key not in used]
        unused_scratch = [entry for entry in self.root.glob(f"*{SCRATCH_SUFFIX}")
                          if _scratch_key(entry.name) not in used]
        freed = sum(f.stat().st_size for folder in unused + unused_scratch
                    for f in folder.rglob("*") if f.is_file())
        for folder in unused:
            self.discard(folder.name)
        for folder in unused_scratch:
            shutil.rmtree(folder, ignore_errors=True)
        return len(unused), freed

    def discard(self, key: str) -> None:
        """Remove an entry (corrupt, or forced to rebuild)."""
        folder = self.entry(key)
        if folder.exists():
            doomed = self.root / f"{key}.old-{os.getpid()}"
            folder.rename(doomed)  # the bare name disappears in one step
            shutil.rmtree(doomed, ignore_errors=True)

    # --- writing ----------------------------------------------------------------------

    def commit(self, task: Task, staging: Path, result: TaskResult, seconds: float,
               events: list[dict[str, Any]]) -> StoredResult:
        """Seal a staging folder as the entry for `task.key`: hash every file, write
        result.json last, rename the folder into place, and have it synced."""
        _check_artifacts(task, staging, result)
        manifest = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            manifest[path.relative_to(staging).as_posix()] = sha256_file(path)
        record: dict[str, Any] = {
            "format": STORE_FORMAT,
            "key": task.key,
            "task": task.id,
            "kind": task.kind,
            "version": task.version,
            "seconds": seconds,
            "result": result.model_dump(mode="json"),
            "events": events,
            "manifest": manifest,
        }
        record["sha256"] = _record_hash(record)
        (staging / RESULT_FILE).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
        self.discard(task.key)
        entry = self.entry(task.key)
        staging.rename(entry)
        shutil.rmtree(self.root / f"{task.key}{SCRATCH_SUFFIX}", ignore_errors=True)
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="store-sync")
        self._syncing.append(self._sync_pool.submit(_sync_entry, entry, self.root))
        return StoredResult(task.key, entry, _absolute(result, entry), seconds, events)


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


def _record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _sync_entry(entry: Path, root: Path) -> None:
    """fsync an entry's files, its folders, then the store folder holding its name."""
    try:
        paths = list(entry.rglob("*"))
        for path in paths:
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        for folder in [entry, *(p for p in paths if p.is_dir())]:
            _fsync_dir(folder)
    except FileNotFoundError:
        return  # replaced meanwhile (a forced rebuild): nothing of it to keep
    _fsync_dir(root)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scratch_key(name: str) -> str | None:
    """The key whose scratch folder `name` is; None for any other entry."""
    return name[:-len(SCRATCH_SUFFIX)] if name.endswith(SCRATCH_SUFFIX) else None


def _is_passing(name: str) -> bool:
    """A staging folder or a result on its way out: never a stored result."""
    return any(mark in name for mark in _PASSING_MARKS)
