"""JSONL data files named by a spec: read, validated record by record, hashed.

Errors point at the string in the spec that names the file; the message names the file
and line inside it (`data/listen_pairs.jsonl:3: field `negative` is missing`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from behaviorc.core import ir
from behaviorc.core.diagnostics import DiagnosticSink
from behaviorc.lang import ast
from behaviorc.core.textfiles import TextFileError, TextLines, has_surrogate, over_limit
from behaviorc.core.vocabulary import CHAT_ROLES

MAX_ERRORS_PER_FILE = 5


class RecordError(ValueError):
    """One bad record; the message names the field."""


@dataclass(frozen=True)
class Loaded:
    source: ir.DataFile
    records: tuple[Any, ...]


def resolve_path(name: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(name)))


def read_pair(record: dict) -> ir.Pair:
    prompt, positive, negative = (_text(record, f) for f in ("prompt", "positive", "negative"))
    problem = pair_problem(prompt, positive, negative)
    if problem:
        raise RecordError(problem)
    return ir.Pair(prompt=prompt, positive=positive, negative=negative)


def pair_problem(prompt: str, positive: str, negative: str) -> str | None:
    """What is wrong with a contrast pair, or None."""
    for field, value in (("prompt", prompt), ("positive", positive), ("negative", negative)):
        if not value.strip():
            return f"`{field}` is empty"
    if positive == negative:
        return "`positive` and `negative` are the same text: the pair contrasts nothing"
    return None


def read_example(record: dict) -> ir.Example:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError("field `messages` must be a non-empty list of {role, content}")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise RecordError(f"`messages[{i}]` must be an object with `role` and `content`")
            role = _text(message, "role", f"messages[{i}].")
            if role not in CHAT_ROLES:
                raise RecordError(f"`messages[{i}].role` is `{role}`; expected one of "
                                  f"{', '.join(CHAT_ROLES)}")
            turns.append(ir.ChatMessage(role=role, content=_text(message, "content", f"messages[{i}].")))
        if turns[-1].role != "assistant":
            raise RecordError("the last message must be the assistant's (it is the response trained on)")
        return ir.Example(messages=tuple(turns))
    context, response = _text(record, "context"), _text(record, "response")
    if not response.strip():
        raise RecordError("`response` is empty")
    return ir.Example(context=context, response=response)


def read_text(record: dict) -> str:
    text = _text(record, "text")
    if not text.strip():
        raise RecordError("`text` is empty")
    return text


def read_prompt(record: dict) -> str:
    prompt = _text(record, "prompt")
    if not prompt.strip():
        raise RecordError("`prompt` is empty")
    return prompt


def _text(record: dict, field: str, prefix: str = "") -> str:
    if field not in record:
        raise RecordError(f"field `{prefix}{field}` is missing")
    value = record[field]
    if not isinstance(value, str):
        raise RecordError(f"field `{prefix}{field}` must be a string, not {_json_kind(value)}")
    if has_surrogate(value):
        raise RecordError(f"field `{prefix}{field}` holds a lone surrogate escape (like "
                          f"`\\ud800`), which is not a character")
    return value


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


class DataFiles:
    """Loads each file once per check, however many settings name it."""

    def __init__(self, sink: DiagnosticSink) -> None:
        self.sink = sink
        self._loaded: dict[tuple[str, Callable], Loaded | None] = {}

    def load(self, name: ast.Str, base_dir: str, read: Callable[[dict], Any],
             what: str) -> Loaded | None:
        """Read `name` (relative to `base_dir`) as JSONL, each line through `read`.
        `what` says what a line holds, for messages (`{"prompt", "positive", "negative"}`)."""
        path = resolve_path(name.value, base_dir)
        key = (path, read)
        if key not in self._loaded:
            self._loaded[key] = self._read(name, path, base_dir, read, what)
        return self._loaded[key]

    def _read(self, name: ast.Str, path: str, base_dir: str, read: Callable[[dict], Any], what: str) -> Loaded | None:
        shown = name.value
        if not name.value.strip():
            self.sink.error("the data file name is empty", name.loc)
            return None
        if "\0" in name.value:
            self.sink.error("a file name cannot contain a NUL character", name.loc)
            return None
        records: list[Any] = []
        errors = 0
        try:
            lines = TextLines(path, "data")
            for number, line in lines:
                problem = self._record(line, read, what, records)
                if problem:
                    errors += 1
                    if errors <= MAX_ERRORS_PER_FILE:
                        self.sink.error(f"{shown}:{number}: {problem}", name.loc,
                                        f"each line holds {what}" if errors == 1 else None)
        except FileNotFoundError:
            self.sink.error(f"data file `{shown}` not found", name.loc,
                            f"paths are relative to the spec's folder, `{base_dir or '.'}`")
            return None
        except IsADirectoryError:
            self.sink.error(f"data file `{shown}` is a folder, not a JSONL file", name.loc)
            return None
        except OSError as err:
            self.sink.error(f"cannot read data file `{shown}`: {err.strerror}", name.loc)
            return None
        except TextFileError as err:
            where = f"{shown}:{err.line}:{err.column}: " if err.line else f"data file `{shown}`: "
            self.sink.error(where + err.message, name.loc, err.hint)
            return None
        if errors > MAX_ERRORS_PER_FILE:
            self.sink.error(f"{shown}: {errors - MAX_ERRORS_PER_FILE} more bad lines", name.loc)
        if errors:
            return None
        if not records:
            self.sink.error(f"data file `{shown}` has no records", name.loc, f"each line holds {what}")
            return None
        source = ir.DataFile(path=os.path.abspath(path), sha256=lines.sha256, loc=name.loc)
        return Loaded(source, tuple(records))

    @staticmethod
    def _record(line: str | int, read: Callable[[dict], Any], what: str,
                records: list[Any]) -> str | None:
        """Append the line's record to `records`, or say what is wrong with it; `line`
        is its size alone when it is over the line limit."""
        if isinstance(line, int):
            return over_limit("line", line, "the line")
        if not line.strip():
            return None
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                return f"each line must be a JSON object {what}, not {_json_kind(record)}"
            records.append(read(record))
        except json.JSONDecodeError as err:
            return f"not valid JSON: {err.msg} (column {err.colno})"
        except RecursionError:
            return "JSON nested too deeply"
        except RecordError as err:
            return str(err)
        return None

