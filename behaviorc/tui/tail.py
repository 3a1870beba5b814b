"""Following `events.jsonl` from a worker thread.

`EventTail` reads whatever complete lines were appended since the last call and notices
when a new build replaced the file (another inode). The app's worker calls it in a loop
and posts `EventsRead` messages; widgets are only touched on the app's own thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from textual.message import Message


@dataclass
class EventsRead(Message):
    """A batch of new events; `restarted` means a new build began (drop what you had)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    restarted: bool = False


class EventTail:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._inode: int | None = None
        self._partial = ""

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """(new complete events, whether the log was replaced since the last read)."""
        restarted = self._reopen_if_replaced()
        if self._file is None:
            return [], restarted
        chunk = self._file.read()
        if not chunk:
            return [], restarted
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # a line still being written
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed build
        return events, restarted

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _reopen_if_replaced(self) -> bool:
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return False  # between a build unlinking the old log and creating the new one
        if inode == self._inode:
            return False
        had_file = self._file is not None
        self.close()
        self._file = open(self.path, encoding="utf-8")
        self._inode = inode
        self._partial = ""
        return had_file
