"""File helpers every stage shares: where behaviorc keeps its cache, content hashes."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from pathlib import Path

from behaviorc.core.atomic import write_text_atomic

HASH_WINDOW = 16 * 1024 * 1024
# In a model folder behaviorc made: what made it (a built-in, a composition, a build task)
PROVENANCE_FILE = "behaviorc.json"
BUILT_PROVENANCE = "built"  # its kind when a build task made it (build.results)


def cache_root() -> Path:
    """Where behaviorc keeps what it makes once (built models, remembered hashes):
    $BEHAVIORC_HOME, else ~/.cache/behaviorc."""
    home = os.environ.get("BEHAVIORC_HOME")
    return Path(home) if home else Path.home() / ".cache" / "behaviorc"


def sha256_file(path: Path | str, window: int = HASH_WINDOW) -> str:
    """The sha256 of a file's bytes, hex."""
    # The hash reads the file's cached pages through a memory map, a window at a time:
    # no copy into a buffer (a fifth of the time), and no more resident than a window.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for start in range(0, size, window):
            with mmap.mmap(handle.fileno(), min(window, size - start), prot=mmap.PROT_READ,
                           offset=start) as mapped:
                digest.update(mapped)
    return digest.hexdigest()


def remembered_sha256(path: Path | str) -> str:
    """The file's sha256, remembered (in the behaviorc home's file-hashes.json) by the
    file's identity and state: device, inode, size and modification time in ns. A model
    merged again, by another method say, is not hashed again; a file rewritten gets a new
    inode or modification time and is."""
    status = os.stat(path)
    key = f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"
    remembered = _FILE_HASHES.get(key)
    if remembered is None:
        remembered = sha256_file(path)
        _FILE_HASHES.remember(key, remembered)
    return remembered


class _RememberedHashes:
    """File hashes by file state, shared by the processes of one user; loaded on first
    use and written back whole (atomically) after each new hash. An unreadable or
    unwritable store only costs hashing again."""

    _KEPT = 4096  # entries; the oldest go first

    def __init__(self) -> None:
        self._hashes: dict[str, str] | None = None
        self._lock = threading.Lock()

    def _path(self) -> Path:
        return cache_root() / "file-hashes.json"

    def get(self, key: str) -> str | None:
        with self._lock:
            if self._hashes is None:
                try:
                    loaded = json.loads(self._path().read_text())
                    self._hashes = {str(k): str(v) for k, v in loaded.items()}
                except (OSError, ValueError, AttributeError):
                    self._hashes = {}
            return self._hashes.get(key)

    def remember(self, key: str, digest: str) -> None:
        with self._lock:
            hashes = self._hashes if self._hashes is not None else {}
            hashes[key] = digest
            while len(hashes) > self._KEPT:
                del hashes[next(iter(hashes))]
            self._hashes = hashes
            try:
                self._path().parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self._path(), json.dumps(hashes))
            except OSError:
                pass


_FILE_HASHES = _RememberedHashes()
