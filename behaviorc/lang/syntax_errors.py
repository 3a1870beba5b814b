"""Syntax errors in words a person reads: human token names and a short expected list.

The sections of the language and their settings are read from the grammar's rules
(`?steer_setting: s_layers | s_method ...`), so a new setting needs no change here.
"""

from __future__ import annotations

import re

from lark import Lark
from lark.lexer import PatternStr

from behaviorc.core.diagnostics import Diagnostic, Location, did_you_mean
from behaviorc.lang.ast import make_location
from behaviorc.lang.tokens import Tok

_VALUE_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "LONG_STRING": "a string",
    "COMPARE": "a comparison (`>`, `>=`, `<`, `<=`)",
    "$END": "the end of the file",
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_SECTION_RULE = re.compile(r"(\w+)_setting\Z")
MAX_EXPECTED = 5


class SyntaxMessages:
    def __init__(self, parser: Lark) -> None:
        self.human = dict(_VALUE_NAMES)
        for terminal in parser.terminals:
            if isinstance(terminal.pattern, PatternStr):
                self.human[terminal.name] = f"`{terminal.pattern.value}`"
        # section -> its settings, and the top level's declarations, from the grammar
        self.sections: dict[str, tuple[str, ...]] = {}
        top_level: list[str] = []
        for rule in parser.rules:
            origin = rule.origin.name
            target = rule.expansion[0].name if len(rule.expansion) == 1 else ""
            if origin == "_item":
                top_level.append(target.removesuffix("_decl"))
                continue
            section = "behavior" if origin == "section" else _section_of(origin)
            if section and target.startswith("s_"):
                self.sections[section] = self.sections.get(section, ()) + (target[2:],)
        self.top_level = tuple(top_level)
        self.all_settings = {s for settings in self.sections.values() for s in settings}

    def declaration_keyword(self, token: Tok) -> Tok | None:
        """`token` as a declaration keyword when it starts a line with one (`deploy`), else
        None. The contextual lexer may have read it as a name; this is where recovery
        from an error can safely start again."""
        if token.column != 1 or token.value not in self.top_level:
            return None
        return token.retyped(token.value.upper())

    def unexpected_token(self, token: Tok, expected: set[str], path: str,
                         text: str) -> tuple[Diagnostic, bool]:
        """The diagnostic for `token` where the parser can only take `expected`, and
        whether skipping from here drops exactly one unknown setting or declaration."""
        section = self._section_expected(expected)
        word = token.value if _WORD.match(token.value) else None
        if token.type == "$END":
            return Diagnostic("error", f"expected {self._expected_list(expected, section)}, "
                                       "found the end of the file", _end_loc(text, path)), False
        loc = _loc(token, path)
        if word and section == "top level":
            hint = did_you_mean(word, self.top_level) or \
                f"a spec holds {_join([f'`{d}`' for d in self.top_level], 'and')} declarations"
            return Diagnostic("error", f"unknown declaration `{word}`", loc, hint), True
        if word and section:
            settings = self.sections[section]
            owners = [s for s, keys in self.sections.items() if word in keys]
            if owners:
                message = f"`{word}` does not belong in `{section}`"
                hint = f"`{word}` goes in {_join([f'`{o}`' for o in owners], 'or')}"
            else:
                kind = "section" if section == "behavior" else "setting"
                message = f"unknown {kind} `{word}` in `{section}`"
                hint = did_you_mean(word, settings) or \
                    f"`{section}` takes {_join([f'`{s}`' for s in settings], 'and')}"
            return Diagnostic("error", message, loc, hint), True
        found = f"`{_short(token.value)}`" if token.type not in ("STRING", "LONG_STRING") else "a string"
        message = f"expected {self._expected_list(expected, section)}, found {found}"
        return Diagnostic("error", message, loc, self._hint_for(token, expected)), False

    def unexpected_character(self, text: str, pos: int, line: int, column: int,
                             path: str) -> Diagnostic:
        char = text[pos]
        if char in "\"'":
            line_end = text.find("\n", pos)
            width = (len(text) if line_end < 0 else line_end) - pos
            loc = make_location(path, line, column, line, column + width)
            return Diagnostic("error", "unterminated string", loc,
                              f"close it with {char} on the same line, or use triple quotes "
                              f"({char * 3}) for text over several lines")
        shown = char if char.isprintable() else repr(char)[1:-1]
        return Diagnostic("error", f"unexpected character `{shown}`",
                          make_location(path, line, column, line, column + 1),
                          "comments start with `#`" if char in "/;" else None)

    def _section_expected(self, expected: set[str]) -> str | None:
        """The block whose settings are all expected here (the parser sits between two
        of its settings), or "top level"."""
        if {d.upper() for d in self.top_level} <= expected:
            return "top level"
        best = None
        for section, settings in self.sections.items():
            if {s.upper() for s in settings} <= expected and \
                    (best is None or len(settings) > len(self.sections[best])):
                best = section
        return best

    def _expected_list(self, expected: set[str], section: str | None) -> str:
        names: list[str] = []
        if section == "top level":
            names.append("a declaration (`model`, `behavior`, `compose`, `deploy`, `import`)")
            expected = expected - {d.upper() for d in self.top_level}
        elif section:
            names.append(f"a setting of `{section}`")
            expected = expected - {s.upper() for s in self.sections[section]}
        # values before keywords before punctuation: the likeliest fix first
        order = sorted(expected, key=lambda t: (t not in _VALUE_NAMES, t.lower() not in self.all_settings, t))
        names.extend(dict.fromkeys(self.human.get(t, t) for t in order))
        if len(names) > MAX_EXPECTED:
            names = names[:MAX_EXPECTED - 1] + ["…"]
            return ", ".join(names)
        return _join(names, "or")

    def _hint_for(self, token: Tok, expected: set[str]) -> str | None:
        if token.type == "NUMBER" and "NUMBER" not in expected and "STRING" in expected:
            return "put text in quotes"
        if token.type == "NAME" and "STRING" in expected and "NAME" not in expected:
            return f'put text in quotes: "{_short(token.value)}"'
        if token.type == "LBRACE" and "STRING" in expected:
            return "a string comes first, then the `{ ... }` block"
        return None


def _section_of(rule_name: str) -> str | None:
    match = _SECTION_RULE.match(rule_name)
    return match.group(1) if match else None


def _join(items: list[str], word: str) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1]


def _short(text: str, width: int = 24) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def _loc(token: Tok, path: str) -> Location:
    return make_location(path, token.line, token.column, token.end_line, token.end_column)


def _end_loc(text: str, path: str) -> Location:
    """Just after the last character that is not blank: where the missing part belongs."""
    body = text.rstrip()
    line = body.count("\n") + 1
    column = len(body) - (body.rfind("\n") + 1) + 1
    return make_location(path, line, column, line, column + 1)
