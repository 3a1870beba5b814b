"""The AST builder: lark calls it as the LALR parser reduces each rule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from behaviorc.core.diagnostics import Diagnostic
from behaviorc.lang import ast
from behaviorc.lang.tokens import Tok
from behaviorc.core.textfiles import control_character, has_surrogate, limit, over_limit

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
_ESCAPE_HINT = ("write `\\\\` for a backslash; known escapes: \\n \\t \\r \\0 \\\\ \\\" \\' "
                "\\uXXXX \\UXXXXXXXX")


_VALUE_NODES = (ast.Str, ast.Num, ast.LayerRange)


def _offset_position(token: Tok, raw: str, index: int) -> tuple[int, int]:
    """The line and column of character `index` of a token's text."""
    before = raw[:index]
    newlines = before.count("\n")
    if not newlines:
        return token.line, token.column + index
    return token.line + newlines, index - before.rfind("\n")


@dataclass(frozen=True)
class _Braced:
    """A `{ ... }` block while its parent rule is being built."""

    items: tuple
    close: Tok


class AstBuilder:
    """Builds ast nodes as lark reduces rules (lark calls the method named after the
    rule, or after its `-> alias`, with all the rule's tokens and child nodes). Every
    rule named `s_<key>` becomes an `ast.Setting`. The path and the diagnostics are set
    per parse."""

    def __init__(self) -> None:
        self.path = ""
        self.diagnostics: list[Diagnostic] = []

    def __getattr__(self, rule: str):
        if rule.startswith("s_"):
            return partial(self._setting, rule[2:])
        raise AttributeError(rule)  # lark builds a plain tree for helper rules

    def _span(self, first, last) -> ast.Span:
        line, column = (first.line, first.column) if isinstance(first, Tok) else first.span[1:3]
        if isinstance(last, _Braced):
            last = last.close
        if isinstance(last, Tok):
            return self.path, line, column, last.end_line, last.end_column
        return self.path, line, column, last.span[3], last.span[4]

    def _token_span(self, token: Tok) -> ast.Span:
        return self.path, token.line, token.column, token.end_line, token.end_column

    def _word(self, token: Tok) -> ast.Word:
        return ast.Word(token.value, self._token_span(token))

    def _setting(self, key: str, children: list) -> ast.Setting:
        keyword = children[0]
        if len(children) == 2 and children[1].__class__ in _VALUE_NODES:  # the usual shape
            value = children[1]
            span = (self.path, keyword.line, keyword.column, value.span[3], value.span[4])
            return ast.Setting(key, (value,), None, span)
        values: list[ast.Value] = []
        block = None
        last = children[0]
        for child in children[1:]:
            if child is None:
                continue
            last = child
            if isinstance(child, _Braced):
                block = child.items
            elif isinstance(child, Tok):
                if child.type == "NAME":
                    values.append(self._word(child))
                elif child.type == "COMPARE":
                    values.append(ast.Op(child.value, self._token_span(child)))
            elif isinstance(child, list):  # `names`
                values.extend(child)
                last = child[-1]
            else:
                values.append(child)
        return ast.Setting(key, tuple(values), block, self._span(keyword, last))

    def start(self, children):
        return tuple(children)

    def block(self, children):
        return _Braced(tuple(children[1:-1]), children[-1])

    def names(self, children):
        return [self._word(t) for t in children if t.type == "NAME"]

    def teacher(self, children):
        """`steering` or `prompt "..."`: its values, joined into the `distill` setting's."""
        name, text = children
        return [self._word(name)] + ([text] if text is not None else [])

    def string(self, children):
        token = children[0]
        raw = token.value
        quote = 3 if raw[:3] in ('"""', "'''") else 1
        longest = limit("string")
        if len(raw) > longest // 4 and len(raw.encode("utf-8")) > longest:
            self._string_error(token, over_limit("string", len(raw.encode("utf-8"))),
                               "keep long texts in a JSONL data file the spec names")
            return ast.Str(raw[quote:quote + 80], raw, self._token_span(token))  # spec rejected
        control = control_character(raw)
        if control is not None:
            self._string_error(token, "a raw control character in a string",
                               f"write it as the escape `{control[1]}`",
                               _offset_position(token, raw, control[0]))
        value = self._unescape(raw[quote:-quote], token)
        if has_surrogate(value):
            self._string_error(token, "a `\\u` escape names a lone surrogate (D800 to DFFF), "
                               "which is not a character",
                               "write the character itself, or `\\U` with its 8-digit code")
            # the spec is rejected; until then the value must stay encodable (paths, hashes)
            value = value.encode("utf-8", "replace").decode("utf-8")
        return ast.Str(value, raw, self._token_span(token))

    def _string_error(self, token: Tok, message: str, hint: str,
                      at: tuple[int, int] | None = None) -> None:
        span = self._token_span(token)
        if at is not None:
            span = (self.path, at[0], at[1], at[0], at[1] + 1)
        self.diagnostics.append(Diagnostic("error", message, ast.make_location(*span), hint))

    def _unescape(self, body: str, token: Tok) -> str:
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
                "error", f"unknown escape `\\{escape}` in a string",
                ast.make_location(*self._token_span(token)), _ESCAPE_HINT))
            out.append(escape)
            i += 2
        return "".join(out)

    def number(self, children):
        minus, digits, percent = children
        first = minus or digits
        return ast.Num(digits.value, minus is not None, percent is not None,
                       self._span(first, percent or digits))

    def span(self, children):
        start, _, end = children
        return ast.LayerRange(start, end, self._span(start, end or start))

    def import_decl(self, children):
        return ast.Import(children[1], self._span(children[0], children[1]))

    def model_decl(self, children):
        keyword, name, _, source, options = children
        return ast.ModelDecl(self._word(name), source, options.items if options else None,
                             self._span(keyword, options or source))

    def on_model(self, children):
        return self._word(children[1])

    def external(self, children):
        keyword, kind, path = children
        return ast.External(self._word(kind), path, self._span(keyword, path))

    def behavior_decl(self, children):
        keyword, name, model, *rest = children
        external = rest[0] if isinstance(rest[0], ast.External) else None
        sections = rest[-1] if isinstance(rest[-1], _Braced) else None
        return ast.BehaviorDecl(self._word(name), model, external,
                                sections.items if sections else None,
                                self._span(keyword, sections or external))

    def compose_decl(self, children):
        keyword, name, _, expr, options = children
        return ast.ComposeDecl(self._word(name), expr, options.items if options else None,
                               self._span(keyword, options or expr))

    def deploy_decl(self, children):
        keyword, target, _, engine, *where, options = children
        if len(where) == 1 and isinstance(where[0], Tok):
            urls = self._word(where[0])
        else:
            urls = tuple(w for w in where if isinstance(w, ast.Str))
        return ast.DeployDecl(self._word(target), self._word(engine), urls,
                              options.items if options else None,
                              self._span(keyword, options or where[-1]))

    # compose expressions

    def ref(self, children):
        return ast.Ref(children[0].value, self._token_span(children[0]))

    def const(self, children):
        span = self._token_span(children[0])
        return ast.Const(ast.Num(children[0].value, False, False, span), span)

    def percent(self, children):
        span = self._span(children[0], children[1])
        return ast.Const(ast.Num(children[0].value, False, True, span), span)

    def neg(self, children):
        return ast.Neg(children[1], self._span(children[0], children[1]))

    def unary(self, children):  # `+x`
        return children[1]

    def atom(self, children):  # `( x )`
        return children[1]

    def add(self, children):
        return self._binary(children)

    sub = mul = div = add

    def _binary(self, children) -> ast.Binary:
        left, op, right = children
        return ast.Binary(op.value, left, right, self._span(left, right))
