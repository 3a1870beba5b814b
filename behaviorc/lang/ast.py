"""The syntax tree of a .behavior file, as written: every node carries its Location.

Settings are generic (a key, its values, an optional block of settings): the grammar
fixes where each key may appear and the shape of its values, the checker decides what
the values mean. `fmt` prints this tree back; the checker turns it into `ir.Spec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from behaviorc.diagnostics import Location


@dataclass(frozen=True, slots=True)
class Str:
    value: str
    raw: str  # as written, quotes and escapes included (fmt prints it unchanged)
    loc: Location


@dataclass(frozen=True, slots=True)
class Num:
    """A number as written: `text` keeps the source spelling (fmt prints it unchanged)."""

    text: str
    negative: bool
    percent: bool
    loc: Location

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
class Word:
    """A bare name: a reference (`listen`), a choice (`mean_diff`) or a group (`gdn.gates`)."""

    name: str
    loc: Location


@dataclass(frozen=True, slots=True)
class Span:
    """A layer or a layer range: `2` or `1..3`."""

    start: Num
    end: Num | None
    loc: Location


@dataclass(frozen=True, slots=True)
class Op:
    """A comparison operator in `expect`."""

    text: str
    loc: Location


Value = Union[Str, Num, Word, Span, Op]


@dataclass(frozen=True, slots=True)
class Setting:
    """`key values... [{ settings... }]`, e.g. `strength 4.0` or `pair "p" { ... }`."""

    key: str
    values: tuple[Value, ...]
    block: tuple["Setting", ...] | None
    loc: Location

    @property
    def key_loc(self) -> Location:
        return Location.model_construct(
            file=self.loc.file, line=self.loc.line, column=self.loc.column,
            end_line=self.loc.line, end_column=self.loc.column + len(self.key))


@dataclass(frozen=True, slots=True)
class Import:
    path: Str
    loc: Location


@dataclass(frozen=True, slots=True)
class ModelDecl:
    name: Word
    source: Str
    options: tuple[Setting, ...] | None
    loc: Location


@dataclass(frozen=True, slots=True)
class External:
    """`from model "folder"` or `from task_vector "file.safetensors"`."""

    kind: Word
    path: Str
    loc: Location


@dataclass(frozen=True, slots=True)
class BehaviorDecl:
    name: Word
    model: Word | None  # `on NAME`; None: the spec's only model
    external: External | None
    sections: tuple[Setting, ...] | None  # steer / train / eval
    loc: Location


# Compose expressions, as written; the checker reduces them to (behavior, weight) terms.

@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    loc: Location


@dataclass(frozen=True, slots=True)
class Const:
    number: Num
    loc: Location


@dataclass(frozen=True, slots=True)
class Neg:
    operand: "Expr"
    loc: Location


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # + - * /
    left: "Expr"
    right: "Expr"
    loc: Location


Expr = Union[Ref, Const, Neg, Binary]


@dataclass(frozen=True, slots=True)
class ComposeDecl:
    name: Word
    expr: Expr
    options: tuple[Setting, ...] | None
    loc: Location


@dataclass(frozen=True, slots=True)
class DeployDecl:
    target: Word
    engine: Word  # `vllm`
    urls: tuple[Str, ...] | Word  # Word: `auto`
    options: tuple[Setting, ...] | None
    loc: Location


Item = Union[Import, ModelDecl, BehaviorDecl, ComposeDecl, DeployDecl]


@dataclass(frozen=True, slots=True)
class Comment:
    text: str  # including the leading `#`
    loc: Location


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str
    text: str
    items: tuple[Item, ...]
    comments: tuple[Comment, ...]
