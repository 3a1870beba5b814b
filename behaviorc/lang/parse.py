"""Text -> syntax tree, with every syntax error of a file reported as a located diagnostic.

Lark is driven token by token so that a syntax error does not end the parse: the bad
token is reported, then tokens are skipped (a `{ ... }` block as a whole) until one the
parser accepts, and parsing goes on. Errors while skipping are not reported, so one
mistake gives one message. Lark's exceptions never leave this module.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from copy import copy
from functools import lru_cache

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedToken
from lark.parsers.lalr_parser_state import ParserState

from behaviorc.diagnostics import Diagnostic, Location
from behaviorc.lang import ast
from behaviorc.lang.syntax_errors import SyntaxMessages

MAX_SYNTAX_ERRORS = 20


@dataclass
class ParseResult:
    file: ast.SourceFile | None  # None when the text could not be parsed to the end
    diagnostics: list[Diagnostic]
    # True when every syntax error was a whole unknown setting that recovery skipped
    # cleanly, so the rest of the tree is what the author wrote and worth checking.
    recovered_cleanly: bool


class _CommentCollector:
    """Lark's lexer callback for comments; the parser is shared, the list is per parse."""

    def __init__(self) -> None:
        self.found: list[Token] = []

    def __call__(self, token: Token) -> Token:
        self.found.append(token)
        return token


_comments = _CommentCollector()


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return (importlib.resources.files("behaviorc.grammar") / "behavior.lark").read_text()


@lru_cache(maxsize=1)
def _parser() -> Lark:
    # cache=True keeps lark's LALR tables in a temp file: 30 ms to load instead of 600.
    return Lark(grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True, cache=True, lexer_callbacks={"COMMENT": _comments})


@lru_cache(maxsize=1)
def _messages() -> SyntaxMessages:
    return SyntaxMessages(_parser())


def parse_text(text: str, path: str) -> ParseResult:
    parser = _parser()
    _comments.found = []
    tree, diagnostics, clean = _drive(parser, text, path)
    comments = tuple(ast.Comment(t.value.rstrip(), _token_loc(t, path)) for t in _comments.found)
    _comments.found = []
    if tree is None:
        return ParseResult(None, diagnostics, False)
    builder = _AstBuilder(path)
    items = builder.transform(tree)
    diagnostics.extend(builder.diagnostics)
    return ParseResult(ast.SourceFile(path, text, items, comments), diagnostics, clean)


def _drive(parser: Lark, text: str, path: str) -> tuple[Tree | None, list[Diagnostic], bool]:
    messages = _messages()
    interactive = parser.parse_interactive(text)
    state, lexer = interactive.parser_state, interactive.lexer_thread
    diagnostics: list[Diagnostic] = []
    clean = True
    recovering = False  # skipping tokens after an error
    depth = 0  # `{` nesting inside a skipped region

    def report(token: Token) -> None:
        nonlocal clean
        diagnostic, skips_setting = messages.unexpected_token(token, _acceptable(state), path, text)
        diagnostics.append(diagnostic)
        clean = clean and skips_setting

    tokens = lexer.lex(state)
    while len(diagnostics) < MAX_SYNTAX_ERRORS:
        try:
            token = next(tokens)
            lexed_here = True
        except StopIteration:
            break
        except UnexpectedToken as err:  # a token of the language, but not here
            token, lexed_here = err.token, False
            tokens = lexer.lex(state)
        except UnexpectedCharacters as err:
            if not recovering:
                diagnostics.append(messages.unexpected_character(err, path, text))
                clean = False
            recovering, depth = True, 0
            lexer.state.line_ctr.feed(text[err.pos_in_stream])
            tokens = lexer.lex(state)
            continue

        if recovering:
            declaration = messages.declaration_keyword(token)
            if declaration is not None:
                # A declaration at the start of a line: drop the broken one and go on here.
                _unwind_to(state, declaration.type)
                token, lexed_here, depth = declaration, True, 0
                tokens = lexer.lex(state)
            elif depth > 0:
                depth += {"LBRACE": 1, "RBRACE": -1}.get(token.type, 0)
                continue
            elif not lexed_here or token.type not in state.parse_conf.states[state.position]:
                depth = 1 if token.type == "LBRACE" else 0
                continue
        try:
            if not lexed_here:
                raise UnexpectedToken(token, set(), state=state)
            state.feed_token(token)
            recovering = False
        except UnexpectedToken:
            if not recovering:
                report(token)
            recovering = True
            depth = 1 if token.type == "LBRACE" else 0
            tokens = lexer.lex(state)

    if len(diagnostics) >= MAX_SYNTAX_ERRORS:
        return None, diagnostics, False
    end = Token("$END", "", len(text), *_end_position(text), *_end_position(text))
    try:
        tree = state.feed_token(end, True)
    except UnexpectedToken:
        if not recovering:
            report(end)
        return None, diagnostics, False
    return tree, diagnostics, clean


def _acceptable(state: ParserState) -> set[str]:
    """Terminals the parser can take next. The LALR table alone over-promises (states
    are shared between contexts), so each candidate is tried on a copy of the stack."""
    conf = copy(state.parse_conf)
    conf.callbacks = {}
    found = set()
    for terminal in state.parse_conf.states[state.position]:
        if not terminal.isupper() and terminal != "$END":
            continue
        trial = ParserState(conf, state.lexer, list(state.state_stack), list(state.value_stack))
        try:
            trial.feed_token(Token(terminal, ""), terminal == "$END")
        except UnexpectedToken:
            continue
        found.add(terminal)
    return found


def _unwind_to(state: ParserState, terminal: str) -> None:
    """Pop the parser's stacks back to a state that takes `terminal` (panic-mode recovery:
    the half-parsed construct on top of the stack is dropped)."""
    while len(state.state_stack) > 1 and terminal not in state.parse_conf.states[state.position]:
        state.state_stack.pop()
        state.value_stack.pop()


def _end_position(text: str) -> tuple[int, int]:
    line = text.count("\n") + 1
    return line, len(text) - (text.rfind("\n") + 1) + 1


def _token_loc(token: Token, path: str) -> Location:
    return Location.model_construct(file=path, line=token.line, column=token.column,
                                    end_line=token.end_line, end_column=token.end_column)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


@v_args(meta=True)
class _AstBuilder(Transformer):
    """Lark's tree -> ast nodes. Rules named `s_<key>` all become `ast.Setting`."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.diagnostics: list[Diagnostic] = []

    def _loc(self, meta) -> Location:
        return Location.model_construct(file=self.path, line=meta.line, column=meta.column,
                                        end_line=meta.end_line, end_column=meta.end_column)

    def __default__(self, data, children, meta):
        if isinstance(data, str) and data.startswith("s_"):
            values: list[ast.Value] = []
            block = None
            for child in children:
                if isinstance(child, tuple):
                    block = child
                elif child is not None:
                    values.extend(child if isinstance(child, list) else [child])
            return ast.Setting(data[2:], tuple(values), block, self._loc(meta))
        raise AssertionError(f"no AST rule for {data}")  # grammar and builder disagree

    def __default_token__(self, token: Token):
        loc = _token_loc(token, self.path)
        if token.type == "NAME":
            return ast.Word(token.value, loc)
        if token.type == "COMPARE":
            return ast.Op(token.value, loc)
        return token  # punctuation kept by name (MINUS, PERCENT): read by its rule

    def start(self, meta, children):
        return tuple(children)

    def block(self, meta, children):
        return tuple(children)

    def names(self, meta, children):
        return list(children)

    def string(self, meta, children):
        token = children[0]
        raw = token.value
        quote = 3 if raw[:3] in ('"""', "'''") else 1
        return ast.Str(self._unescape(raw[quote:-quote], token), raw, self._loc(meta))

    def _unescape(self, body: str, token: Token) -> str:
        if "\\" not in body:
            return body
        out: list[str] = []
        i = 0
        while i < len(body):
            char = body[i]
            if char != "\\":
                out.append(char)
                i += 1
                continue
            escape = body[i + 1]
            if escape in _ESCAPES:
                out.append(_ESCAPES[escape])
                i += 2
                continue
            digits = {"u": 4, "U": 8}.get(escape, 0)
            code = body[i + 2:i + 2 + digits]
            if digits and len(code) == digits and all(c in "0123456789abcdefABCDEF" for c in code) \
                    and int(code, 16) <= 0x10FFFF:
                out.append(chr(int(code, 16)))
                i += 2 + digits
                continue
            self.diagnostics.append(Diagnostic(
                "error", f"unknown escape `\\{escape}` in a string", _token_loc(token, self.path),
                "write `\\\\` for a backslash; known escapes: \\n \\t \\r \\0 \\\\ \\\" \\' "
                "\\uXXXX \\UXXXXXXXX"))
            out.append(escape)
            i += 2
        return "".join(out)

    def number(self, meta, children):
        minus, digits, percent = children
        return ast.Num(digits.value, minus is not None, percent is not None, self._loc(meta))

    def span(self, meta, children):
        return ast.Span(children[0], children[1], self._loc(meta))

    def import_decl(self, meta, children):
        return ast.Import(children[0], self._loc(meta))

    def model_decl(self, meta, children):
        name, source, options = children
        return ast.ModelDecl(name, source, options, self._loc(meta))

    def on_model(self, meta, children):
        return children[0]

    def external(self, meta, children):
        return ast.External(children[0], children[1], self._loc(meta))

    def behavior_decl(self, meta, children):
        name, model, *rest = children
        external = rest[0] if rest and isinstance(rest[0], ast.External) else None
        sections = next((c for c in rest if isinstance(c, tuple)), None)
        return ast.BehaviorDecl(name, model, external, sections, self._loc(meta))

    def compose_decl(self, meta, children):
        name, expr, options = children
        return ast.ComposeDecl(name, expr, options, self._loc(meta))

    def deploy_decl(self, meta, children):
        target, engine, *where, options = children
        urls = where[0] if len(where) == 1 and isinstance(where[0], ast.Word) else tuple(where)
        return ast.DeployDecl(target, engine, urls, options, self._loc(meta))

    # compose expressions

    def ref(self, meta, children):
        return ast.Ref(children[0].name, self._loc(meta))

    def const(self, meta, children):
        loc = self._loc(meta)
        return ast.Const(ast.Num(children[0].value, False, False, loc), loc)

    def percent(self, meta, children):
        loc = self._loc(meta)
        return ast.Const(ast.Num(children[0].value, False, True, loc), loc)

    def neg(self, meta, children):
        return ast.Neg(children[-1], self._loc(meta))

    def add(self, meta, children):
        return self._binary("+", meta, children)

    def sub(self, meta, children):
        return self._binary("-", meta, children)

    def mul(self, meta, children):
        return self._binary("*", meta, children)

    def div(self, meta, children):
        return self._binary("/", meta, children)

    def _binary(self, op: str, meta, children) -> ast.Binary:
        return ast.Binary(op, children[0], children[-1], self._loc(meta))
