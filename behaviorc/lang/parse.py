"""Text -> syntax tree, with every syntax error of a file reported as a located diagnostic.

Lark's LALR tables parse; tokens come from `tokens.Lexer` and the tree is built by
`build.AstBuilder` callbacks as rules reduce, with no intermediate lark Tree (several
times faster than lark's general machinery, which matters for large generated specs).

A syntax error does not end the parse: the bad token is reported, then tokens are
skipped (a `{ ... }` block as a whole) until one the parser accepts, or until a
declaration keyword at the start of a line, where the half-parsed declaration is
dropped. Errors while skipping are not reported, so one mistake gives one message.
Lark's exceptions never leave this module.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from functools import lru_cache

from lark import Lark

from behaviorc.core.diagnostics import Diagnostic
from behaviorc.lang import ast
from behaviorc.lang.ast_builder import AstBuilder
from behaviorc.lang.lalr import Machine, Rejected, Tables
from behaviorc.lang.syntax_errors import SyntaxMessages
from behaviorc.lang.tokens import BadCharacter, Lexer, Tok

MAX_SYNTAX_ERRORS = 20


@dataclass
class ParseResult:
    file: ast.SourceFile | None  # None when the text could not be parsed to the end
    diagnostics: list[Diagnostic]
    # True when every syntax error was a whole unknown setting or declaration that
    # recovery skipped cleanly, so the rest of the tree is what the author wrote.
    recovered_cleanly: bool


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return (importlib.resources.files("behaviorc.grammar") / "behavior.lark").read_text()


def parse_text(text: str, path: str) -> ParseResult:
    """Parse one file. Not thread-safe: the shared builder holds the current path."""
    language = _language()
    builder = language.builder
    builder.path, builder.diagnostics = path, []
    comments: list[ast.Comment] = []
    tree, diagnostics, clean = _drive(language, text, path, comments)
    diagnostics.extend(builder.diagnostics)
    if tree is None:
        return ParseResult(None, diagnostics, False)
    return ParseResult(ast.SourceFile(path, text, tree, tuple(comments)), diagnostics, clean)


class _Language:
    """The parser, lexer, AST builder and messages, made once per process from the grammar."""

    def __init__(self) -> None:
        self.builder = AstBuilder()
        # cache=True keeps the LALR tables in a temp file: 30 ms to load instead of 600.
        self.parser = Lark(grammar_text(), parser="lalr", lexer="basic", keep_all_tokens=True,
                           maybe_placeholders=True, transformer=self.builder, cache=True)
        self.tables = Tables(self.parser)
        self.lexer = Lexer(self.parser)
        self.messages = SyntaxMessages(self.parser)


@lru_cache(maxsize=1)
def _language() -> _Language:
    return _Language()


def _drive(language: _Language, text: str, path: str,
           comments: list[ast.Comment]) -> tuple[tuple | None, list[Diagnostic], bool]:
    messages = language.messages
    machine = Machine(language.tables)
    diagnostics: list[Diagnostic] = []
    clean = True
    recovering = False  # skipping tokens after an error
    depth = 0  # `{` nesting inside a skipped region

    for token in language.lexer.tokens(text, path, machine.expects, comments):
        if len(diagnostics) >= MAX_SYNTAX_ERRORS:
            return None, diagnostics, False
        if isinstance(token, BadCharacter):
            if not recovering:
                diagnostics.append(messages.unexpected_character(
                    text, token.pos, token.line, token.column, path))
                clean = False
            recovering, depth = True, 0
            continue
        if recovering:
            declaration = messages.declaration_keyword(token)
            if declaration is not None:
                # A declaration at the start of a line: drop the broken one, go on here.
                machine.unwind_to(declaration.type)
                token, depth = declaration, 0
            elif depth > 0:
                depth += {"LBRACE": 1, "RBRACE": -1}.get(token.type, 0)
                continue
            elif token.type == "LBRACE" or token.type not in machine.expects():
                # a block after a mistake belongs to the mistake: skip it whole
                depth = 1 if token.type == "LBRACE" else 0
                continue
        try:
            machine.feed(token.type, token)
            recovering = False
        except Rejected:
            if not recovering:
                diagnostic, skips_whole = messages.unexpected_token(
                    token, machine.accepts(), path, text)
                diagnostics.append(diagnostic)
                clean = clean and skips_whole
            recovering = True
            depth = 1 if token.type == "LBRACE" else 0

    end = Tok("$END", "", len(text), 0, 0, 0, 0)
    try:
        tree = machine.feed("$END", end)
    except Rejected:
        if not recovering:
            diagnostic, _ = messages.unexpected_token(end, machine.accepts(), path, text)
            diagnostics.append(diagnostic)
        return None, diagnostics, False
    return tree, diagnostics, clean
