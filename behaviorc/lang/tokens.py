"""The lexer: one regular expression built from the grammar's own terminals.

Lark's lexers are general and, for large generated specs, slower than the parse itself;
this one does only what the language needs. It is contextual the cheap way: a word is
a keyword only where the parser can take that keyword (or cannot take a name), so
`distill steering` and `mix general` read `steering` and `general` as names.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from typing import Callable, Container, Iterator

from lark import Lark
from lark.lexer import PatternStr

from behaviorc.lang import ast

class Tok:
    """A token; what lark's parser reads (`type`) and what the AST builder reads."""

    __slots__ = ("type", "value", "start_pos", "line", "column", "end_line", "end_column")

    def __init__(self, type: str, value: str, start_pos: int, line: int, column: int,
                 end_line: int, end_column: int) -> None:
        self.type, self.value, self.start_pos = type, value, start_pos
        self.line, self.column, self.end_line, self.end_column = line, column, end_line, end_column

    def retyped(self, type: str) -> "Tok":
        return Tok(type, self.value, self.start_pos, self.line, self.column, self.end_line,
                   self.end_column)

    def __repr__(self) -> str:
        return f"Tok({self.type}, {self.value!r}, {self.line}:{self.column})"


class BadCharacter:
    """Where no token starts; lexing goes on after it."""

    __slots__ = ("pos", "line", "column")

    def __init__(self, pos: int, line: int, column: int) -> None:
        self.pos, self.line, self.column = pos, line, column


class Lexer:
    def __init__(self, parser: Lark) -> None:
        self.keywords: dict[str, str] = {}  # word -> terminal
        self.punctuation: dict[str, str] = {}  # `{` -> LBRACE
        by_name = {t.name: t for t in parser.terminals}
        name_re = by_name["NAME"].pattern.to_regexp()
        groups = []
        for terminal in sorted(parser.terminals, key=lambda t: -t.priority):
            if terminal.name == "WS":
                continue
            if not isinstance(terminal.pattern, PatternStr):
                groups.append(f"(?P<{terminal.name}>{terminal.pattern.to_regexp()})")
            elif re.fullmatch(name_re, terminal.pattern.value):
                self.keywords[terminal.pattern.value] = terminal.name
            else:
                self.punctuation[terminal.pattern.value] = terminal.name
        longest_first = sorted(self.punctuation, key=len, reverse=True)
        groups.append("(?P<PUNCT>" + "|".join(re.escape(p) for p in longest_first) + ")")
        # Blanks before a token are part of its match; a character that starts no token
        # is matched alone as BAD, so the scan never skips text silently.
        blank = by_name["WS"].pattern.to_regexp()
        self.token_re = re.compile(f"(?:{blank})?(?:" + "|".join(groups) + r"|\Z|(?P<BAD>(?s:.)))")

    def tokens(self, text: str, path: str, accepts: Callable[[], Container[str]],
               comments: list[ast.Comment]) -> Iterator[Tok | BadCharacter]:
        """Tokens of `text`. `accepts()` is the set of terminals the parser can take
        now (read when a word could be a keyword). Comments go to `comments`."""
        newlines = [m.start() for m in re.finditer("\n", text)]
        keywords, punctuation = self.keywords, self.punctuation

        def position(pos: int) -> tuple[int, int]:
            line = bisect_right(newlines, pos - 1)  # newlines before `pos`
            return line + 1, pos - (newlines[line - 1] if line else -1)

        for match in self.token_re.finditer(text):
            kind = match.lastgroup
            if kind is None:  # only blanks up to the end of the text
                continue
            start = match.start(kind)
            value = match.group(kind)
            line, column = position(start)
            if kind == "BAD":
                yield BadCharacter(start, line, column)
                continue
            if kind == "LONG_STRING" and "\n" in value:
                end_line, end_column = position(start + len(value))
            else:
                end_line, end_column = line, column + len(value)
            if kind == "COMMENT":
                comments.append(ast.Comment(value.rstrip(), (path, line, column, line, end_column)))
                continue
            if kind == "PUNCT":
                kind = punctuation[value]
            elif kind == "NAME" and value in keywords:
                acceptable = accepts()
                if keywords[value] in acceptable or "NAME" not in acceptable:
                    kind = keywords[value]
            yield Tok(kind, value, start, line, column, end_line, end_column)
