"""The one reader of spec and data text, and the limits that keep hostile input cheap.

Every `.behavior` file and every JSONL data file goes through `read_text_file`, so they
agree on what text is: UTF-8 (a leading byte-order mark is accepted and dropped), lines
ending in `\\n`, `\\r\\n` or `\\r` and nothing else (U+2028 and friends are characters
inside a line, as JSON has them), returned with every line end as `\\n`. Only regular
files are read (a FIFO would hang, `/dev/zero` never ends), and never more than the
limit's bytes, so memory is bounded before anything is parsed.

Limits are set by environment variables (bytes); the message of a refused file names the
variable to raise.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from behaviorc.core.diagnostics import BehaviorError

BOM = "\ufeff"
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# name -> (environment variable, default bytes, what it bounds)
LIMITS = {
    "spec": ("BEHAVIORC_MAX_SPEC_BYTES", 16 << 20, "a spec file"),
    "string": ("BEHAVIORC_MAX_STRING_BYTES", 1 << 20, "a string literal"),
    "data": ("BEHAVIORC_MAX_DATA_BYTES", 256 << 20, "a data file"),
    "line": ("BEHAVIORC_MAX_LINE_BYTES", 1 << 20, "a line of a data file"),
}


def limit(name: str) -> int:
    """The limit in bytes, from its environment variable when set."""
    variable, default, _ = LIMITS[name]
    given = os.environ.get(variable)
    if given is None or not given.strip():
        return default
    try:
        value = int(given.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise BehaviorError(f"{variable}={given!r} is not a positive number of bytes",
                            hint=f"unset it for the default, {default} bytes")
    return value


def over_limit(name: str, size: int, what: str | None = None) -> str:
    """The message for `size` bytes over limit `name`."""
    variable, _, bounded = LIMITS[name]
    return (f"{what or bounded} of {size_text(size)} is over the limit of {size_text(limit(name))} "
            f"for {bounded} (raise it with {variable}=BYTES)")


def size_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n % size else f"{n // size} {unit}"
    return f"{n} bytes"


class TextFileError(Exception):
    """A file that is not acceptable text; `line` and `column` (1-based) say where in it
    when the problem is at a place, such as a byte that is not UTF-8."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message, self.line, self.column, self.hint = message, line, column, hint


@dataclass(frozen=True)
class TextFile:
    raw: bytes  # the bytes as stored (content keys hash these)
    text: str  # decoded, without a BOM, every line end a `\n`


def read_text_file(path: str, limit_name: str) -> TextFile:
    """The text of the regular file at `path`, at most `limit(limit_name)` bytes."""
    raw = read_bytes(path, limit_name)
    return TextFile(raw, decode(raw))


def read_bytes(path: str, limit_name: str) -> bytes:
    """The bytes of a regular file, refused past the limit (without reading further).
    OSError (FileNotFoundError, IsADirectoryError, ...) passes through."""
    most = limit(limit_name)
    with _open_regular(path, limit_name) as handle:
        raw = handle.read(most + 1)  # a file that grew since fstat stops here too
    if len(raw) > most:
        raise TextFileError(over_limit(limit_name, len(raw)))
    return raw


class TextLines:
    """The lines of a regular text file (as `read_text_file` reads text), read a chunk
    at a time so that memory holds at most one line: a line over the `line` limit is
    yielded as its size alone, and the file is refused past `limit_name`'s bytes.
    `sha256` is the stored bytes' hash once every line has been read."""

    CHUNK = 1 << 20

    def __init__(self, path: str, limit_name: str) -> None:
        self.path, self.limit_name = path, limit_name
        self._hash = hashlib.sha256()
        self._handle = _open_regular(path, limit_name)  # refuses at once what it must

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __iter__(self) -> Iterator[tuple[int, str | int]]:
        """(line number, its text, or its size in bytes when over the line limit)."""
        most, longest = limit(self.limit_name), limit("line")
        line, size, number, total, carried = bytearray(), 0, 1, 0, b""
        with self._handle as handle:
            while chunk := handle.read(self.CHUNK):
                total += len(chunk)
                if total > most:
                    raise TextFileError(over_limit(self.limit_name, total))
                self._hash.update(chunk)
                # a `\r` that ends a chunk may begin a `\r\n`: wait for the next byte
                chunk, carried = (carried + chunk).replace(b"\r\n", b"\n"), b""
                if chunk.endswith(b"\r"):
                    chunk, carried = chunk[:-1], b"\r"
                *ended, rest = chunk.replace(b"\r", b"\n").split(b"\n")
                for piece in ended:
                    size += len(piece)
                    if size <= longest:
                        line += piece
                        text, line = self._text(line, number), bytearray()  # one copy held
                        yield number, text
                    else:
                        yield number, size
                    line, size, number = bytearray(), 0, number + 1
                size += len(rest)
                if size <= longest:
                    line += rest
                else:
                    line.clear()  # over the limit: only its size is kept
            if carried or size:  # the last line, ended by a lone `\r` or by the file's end
                yield number, self._text(line, number) if size <= longest else size

    @staticmethod
    def _text(raw: bytearray, number: int) -> str:
        try:
            return decode(raw) if number == 1 else raw.decode("utf-8")
        except UnicodeDecodeError as err:
            column = len(raw[:err.start].decode("utf-8")) + 1
            raise TextFileError(f"not UTF-8 text: byte 0x{raw[err.start]:02x} cannot start or "
                                f"continue a character", number, column,
                                hint="save the file as UTF-8") from None
        except TextFileError as err:
            raise TextFileError(err.message, number, err.column, err.hint) from None


def _open_regular(path: str, limit_name: str) -> BinaryIO:
    """A regular file opened for reading, refused at once when it is over the limit
    or is not a regular file. OSError passes through."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just after.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory", path)
        if not stat.S_ISREG(info.st_mode):
            raise TextFileError(f"not a regular file (a {_file_kind(info.st_mode)})",
                                hint="name a file on disk")
        if info.st_size > limit(limit_name):
            raise TextFileError(over_limit(limit_name, info.st_size))
        os.set_blocking(fd, True)
        return os.fdopen(os.dup(fd), "rb")
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def decode(raw: bytes | bytearray) -> str:
    """UTF-8 text with a leading BOM dropped and `\\r\\n`, `\\r` made `\\n`; a
    TextFileError at the line and column of the first byte that is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        before = raw[:err.start]
        # the prefix before the first bad byte is valid UTF-8
        prefix = before.decode("utf-8").removeprefix(BOM)
        prefix = prefix.replace("\r\n", "\n").replace("\r", "\n")
        line_start = prefix.rfind("\n") + 1
        raise TextFileError(
            f"not UTF-8 text: byte 0x{raw[err.start]:02x} cannot start or continue a "
            f"character", prefix.count("\n") + 1, len(prefix) - line_start + 1,
            hint="save the file as UTF-8") from None
    return normalize(text)


def normalize(text: str) -> str:
    """Text with a leading BOM dropped and every line end a `\\n`."""
    text = text.removeprefix(BOM)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def control_character(text: str) -> tuple[int, str] | None:
    """The index and the escape of the first raw control character in `text` other
    than tab and newline, or None."""
    found = _CONTROL.search(text)
    if found is None:
        return None
    char = found.group()
    return found.start(), {"\0": "\\0", "\r": "\\r"}.get(char, f"\\u{ord(char):04x}")


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate (from a `\\uD800` escape), which no encoder
    accepts: it would fail later, in a file name, a hash or a tokenizer."""
    return _SURROGATE.search(text) is not None
