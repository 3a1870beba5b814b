"""The syntax tree of a .behavior file, as written: every node carries its Location.

Settings are generic (a key, its values, an optional block of settings): the grammar
fixes where each key may appear and the shape of its values, the checker decides what
the values mean. `fmt` prints this tree back; the checker turns it into `ir.Spec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from behaviorc.core.diagnostics import Location

# (file, line, column, end line, end column): a Location not yet built. Parsing makes
# one per token; building pydantic Locations for all of them would cost more than the
# parse, and only the few a diagnostic or the IR needs are ever read.
Span = tuple[str, int, int, int, int]

_LOCATION_FIELDS = frozenset(Location.model_fields)


def make_location(file: str, line: int, column: int, end_line: int, end_column: int) -> Location:
    """A Location from trusted parser positions, skipping validation (as model_construct)."""
    loc = object.__new__(Location)
    object.__setattr__(loc, "__dict__", {"file": file, "line": line, "column": column,
                                         "end_line": end_line, "end_column": end_column})
    object.__setattr__(loc, "__pydantic_fields_set__", _LOCATION_FIELDS)
    object.__setattr__(loc, "__pydantic_extra__", None)
    object.__setattr__(loc, "__pydantic_private__", None)
    return loc


class Located:
    """Every node: `span` as parsed, `loc` as a Location when asked for."""

    __slots__ = ()
    span: Span

    @property
    def loc(self) -> Location:
        return make_location(*self.span)

    @property
    def line(self) -> int:
        return self.span[1]

    @property
    def end_line(self) -> int:
        return self.span[3]

    def encloses(self, loc: Location) -> bool:
        """Whether `loc` starts inside this node."""
        file, line, column, end_line, end_column = self.span
        return loc.file == file and (line, column) <= (loc.line, loc.column) < (end_line, end_column)


@dataclass(frozen=True, slots=True)
class Str(Located):
    value: str
    raw: str  # as written, quotes and escapes included (fmt prints it unchanged)
    span: Span


@dataclass(frozen=True, slots=True)
class Num(Located):
    """A number as written: `text` keeps the source spelling (fmt prints it unchanged)."""

    text: str
    negative: bool
    percent: bool
    span: Span

    @property
    def value(self) -> float:
        """The value, a percentage as a fraction (25% -> 0.25)."""
        number = float(self.text)
        number = -number if self.negative else number
        return number / 100 if self.percent else number

    @property
    def source(self) -> str:
        return ("-" if self.negative else "") + self.text + ("%" if self.percent else "")


@dataclass(frozen=True, slots=True)
class Word(Located):
    """A bare name: a reference (`listen`), a choice (`mean_diff`) or a group (`gdn.gates`)."""

    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class LayerRange(Located):
    """A layer or a layer range: `2` or `1..3`."""

    start: Num
    end: Num | None
    span: Span


@dataclass(frozen=True, slots=True)
class Op(Located):
    """A comparison operator in `expect`."""

    text: str
    span: Span


Value = Union[Str, Num, Word, LayerRange, Op]


@dataclass(frozen=True, slots=True)
class Setting(Located):
    """`key values... [{ settings... }]`, e.g. `strength 4.0` or `pair "p" { ... }`."""

    key: str
    values: tuple[Value, ...]
    block: tuple["Setting", ...] | None
    span: Span

    @property
    def key_loc(self) -> Location:
        file, line, column, _, _ = self.span
        return make_location(file, line, column, line, column + len(self.key))


@dataclass(frozen=True, slots=True)
class Import(Located):
    path: Str
    span: Span


@dataclass(frozen=True, slots=True)
class ModelDecl(Located):
    name: Word
    source: Str
    options: tuple[Setting, ...] | None
    span: Span


@dataclass(frozen=True, slots=True)
class External(Located):
    """`from model "folder"` or `from task_vector "file.safetensors"`."""

    kind: Word
    path: Str
    span: Span


@dataclass(frozen=True, slots=True)
class BehaviorDecl(Located):
    name: Word
    model: Word | None  # `on NAME`; None: the spec's only model
    external: External | None
    sections: tuple[Setting, ...] | None  # steer / train / eval
    span: Span


# Compose expressions, as written; the checker reduces them to (behavior, weight) terms.

@dataclass(frozen=True, slots=True)
class Ref(Located):
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Const(Located):
    number: Num
    span: Span


@dataclass(frozen=True, slots=True)
class Neg(Located):
    operand: "Expr"
    span: Span


@dataclass(frozen=True, slots=True)
class Binary(Located):
    op: str  # + - * /
    left: "Expr"
    right: "Expr"
    span: Span


Expr = Union[Ref, Const, Neg, Binary]


@dataclass(frozen=True, slots=True)
class ComposeDecl(Located):
    name: Word
    expr: Expr
    options: tuple[Setting, ...] | None
    span: Span


@dataclass(frozen=True, slots=True)
class DeployDecl(Located):
    target: Word
    engine: Word  # `vllm`
    urls: tuple[Str, ...] | Word  # Word: `auto`
    options: tuple[Setting, ...] | None
    span: Span


Item = Union[Import, ModelDecl, BehaviorDecl, ComposeDecl, DeployDecl]


@dataclass(frozen=True, slots=True)
class Comment(Located):
    text: str  # including the leading `#`
    span: Span


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str
    text: str
    items: tuple[Item, ...]
    comments: tuple[Comment, ...]
