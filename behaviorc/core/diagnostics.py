"""Source locations and diagnostics shared by every stage.

A diagnostic is rendered the same way wherever it comes from (parser, checker, a task at
run time that fails on data the spec named):

    specs/listen.behavior:7:14: error: unknown setting `strenght`
       7 |     strenght 4.0
         |     ^^^^^^^^
      hint: did you mean `strength`?
"""

from __future__ import annotations

import difflib
import os
import stat
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["error", "warning"]
SHOWN_LINE = 120  # characters of a source line shown under a diagnostic


class Location(BaseModel):
    """A span in a source file; lines and columns are 1-based, end is exclusive."""

    model_config = ConfigDict(frozen=True)

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    message: str
    loc: Location | None = None
    hint: str | None = None

    def render(self, source: str | None = None) -> str:
        """The whole diagnostic: header, the source line and a caret underline, the hint."""
        where = f"{self.loc}: " if self.loc else ""
        lines = [f"{where}{self.severity}: {self.message}"]
        if self.loc is not None:
            text = source if source is not None else _read_source(self.loc.file)
            if text is not None:
                lines.extend(_underline(text, self.loc))
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


SOURCE_SHOWN_BYTES = 16 << 20  # a source line is shown from files up to this size


def _read_source(path: str) -> str | None:
    """A file's text for showing a line of it, best effort: bad bytes are replaced, line
    ends read as the lexer reads them, and only a regular file of bounded size is read
    (the file may be what the diagnostic is about: a FIFO, /dev/zero)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as handle:
            raw = handle.read(SOURCE_SHOWN_BYTES)
    except (OSError, ValueError):
        return None
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _underline(source: str, loc: Location) -> list[str]:
    src_lines = source.split("\n")  # lines as the lexer counts them
    if not 1 <= loc.line <= len(src_lines):
        return []
    text = _SECRET.sub(_masked, src_lines[loc.line - 1]).expandtabs(1)
    start = max(loc.column - 1, 0)
    end = loc.end_column - 1 if loc.end_line == loc.line else len(text)
    if len(text) > SHOWN_LINE:  # a window around the place, not megabytes of one line
        left = max(0, min(start - SHOWN_LINE // 4, len(text) - SHOWN_LINE))
        text = text[left:left + SHOWN_LINE]
        start, end = start - left, min(end - left, SHOWN_LINE)
    width = max(1, min(end, len(text)) - start)
    gutter = f"{loc.line:>4} | "
    return [gutter + text, " " * (len(gutter) - 2) + "| " + " " * start + "^" * width]


# A deploy's `api_key "..."`: shown lines go to terminals, reports and event logs.
_SECRET = re.compile(r"""(\bapi_key\s+)("[^"]*"?|'[^']*'?)""")


def _masked(found: re.Match) -> str:
    """The key's characters as `*`, so columns after it stay where they are."""
    key = found.group(2)
    return found.group(1) + key[0] + "*" * max(len(key) - 2, 0) + key[-1:] * (len(key) > 1)


@dataclass
class DiagnosticSink:
    """Collects every diagnostic of a run, so all errors in a file are reported at once."""

    items: list[Diagnostic] = field(default_factory=list)

    def error(self, message: str, loc: Location | None = None, hint: str | None = None) -> None:
        self.items.append(Diagnostic("error", message, loc, hint))

    def warning(self, message: str, loc: Location | None = None, hint: str | None = None) -> None:
        self.items.append(Diagnostic("warning", message, loc, hint))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    def render(self) -> str:
        return "\n".join(d.render() for d in self.items)


class BehaviorError(Exception):
    """An error a user can act on, with the diagnostics that say where and why.

    Raised at any stage (a bad model folder, a server that refuses a push, a data file
    that changed under a build). The CLI prints the diagnostics and exits 1; nothing
    else in behaviorc turns exceptions into text.
    """

    def __init__(self, message: str, loc: Location | None = None, hint: str | None = None,
                 diagnostics: Iterable[Diagnostic] = ()):
        self.diagnostics = list(diagnostics) or [Diagnostic("error", message, loc, hint)]
        super().__init__(message)

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)

    def with_parent_location(self, loc: Location | None) -> "BehaviorError":
        """This error seen from `loc`, the place that named what failed (a spec line, a
        config field): its diagnostics that do not say where now say `loc`; those that
        do keep their own place. The one way an error moves to a new location."""
        if loc is None or all(d.loc is not None for d in self.diagnostics):
            return self
        return BehaviorError(str(self), diagnostics=[
            d if d.loc is not None else replace(d, loc=loc) for d in self.diagnostics])


@contextmanager
def located_at(loc: Location | None) -> Iterator[None]:
    """Errors raised in the block without a place of their own are placed at `loc`."""
    try:
        yield
    except BehaviorError as err:
        moved = err.with_parent_location(loc)
        if moved is err:
            raise
        raise moved from None


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest known word, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None
