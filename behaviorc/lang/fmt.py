"""`behaviorc fmt`: one canonical layout for .behavior files, comments kept.

Layout: two-space indents; sections, pairs and examples one setting per line; small
option blocks (`optimizer`, `merge`, `distill`, model and deploy options) on one line
when they fit and hold no comment; one blank line between declarations (runs of imports
and of one-line models may stay together); a blank line inside a block kept where the
author put one. Strings and numbers are printed as written, expressions with single
spaces around operators and only the parentheses they need. Formatting its own output
changes nothing.
"""

from __future__ import annotations

from behaviorc.core.diagnostics import Diagnostic
from behaviorc.lang import ast
from behaviorc.lang.linear import MAX_DEPTH, depth
from behaviorc.lang.parse import parse_text

INDENT = "  "
WIDTH = 88
INLINE_BLOCKS = ("optimizer", "merge", "distill", "objective", "mix", "model", "deploy", "score")
COMMA_SEPARATED = ("layers", "sweep", "targets", "groups", "betas")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def format_text(text: str, path: str) -> tuple[str | None, list[Diagnostic]]:
    """The formatted text, or None and the syntax errors when `text` does not parse."""
    result = parse_text(text, path)
    errors = [d for d in result.diagnostics if d.severity == "error"]
    if result.file is None or errors:
        return None, result.diagnostics
    for item in result.file.items:
        if isinstance(item, ast.ComposeDecl) and depth(item.expr) > MAX_DEPTH:
            return None, [Diagnostic("error", f"expression nested more than {MAX_DEPTH} levels "
                                              "deep", item.expr.loc)]
    return format_file(result.file), []


def format_file(file: ast.SourceFile) -> str:
    return _Printer(file.comments).file(file.items)


class _Printer:
    def __init__(self, comments: tuple[ast.Comment, ...]) -> None:
        self.comments = list(comments)
        self.next_comment = 0
        # output lines as [code, trailing comment, block id]: trailing comments of one
        # block's lines are aligned at the end
        self.out: list[list] = []
        self.block_ids = [0]
        self.last_source_line = 0  # source line of the last thing printed

    # ---- comments and blank lines

    def _pending(self) -> ast.Comment | None:
        return self.comments[self.next_comment] if self.next_comment < len(self.comments) else None

    def _leading(self, line: int, depth: int, blank_before: bool | None) -> None:
        """Comments before source `line`, each on its own line. `blank_before`: force a
        blank line before the first thing printed (True), forbid it (False), or keep the
        source's (None)."""
        while (comment := self._pending()) is not None and comment.loc.line < line:
            self._blank(comment.loc.line, blank_before)
            self.out.append([INDENT * depth + comment.text, "", None])
            self.last_source_line = comment.loc.end_line
            self.next_comment += 1
            blank_before = None
        self._blank(line, blank_before)

    def _blank(self, line: int, forced: bool | None) -> None:
        wanted = forced if forced is not None else line - self.last_source_line > 1
        if wanted and self.out and self.out[-1][0] != "":
            self.out.append(["", "", None])

    def _trailing(self, line: int) -> str:
        """Comments up to the end of source `line`, appended to the line just printed."""
        texts = []
        while (comment := self._pending()) is not None and comment.loc.line <= line:
            texts.append(comment.text)
            self.next_comment += 1
        return " ".join(texts)

    def _comment_inside(self, loc) -> bool:
        comment = self._pending()
        return comment is not None and (comment.loc.line, comment.loc.column) < (loc.end_line, loc.end_column)

    def _emit(self, text: str, depth: int, end_line: int) -> None:
        self.out.append([INDENT * depth + text, self._trailing(end_line), self.block_ids[-1]])
        self.last_source_line = end_line

    def _text(self) -> str:
        widths: dict[int, int] = {}
        for code, comment, block in self.out:
            if comment and "\n" not in code:
                widths[block] = max(widths.get(block, 0), len(code))
        lines = []
        for code, comment, block in self.out:
            if not comment:
                lines.append(code)
            elif "\n" in code or widths[block] + 2 + len(comment) > WIDTH:
                lines.append(f"{code}  {comment}")
            else:
                lines.append(f"{code:<{widths[block]}}  {comment}")
        return "\n".join(lines).rstrip("\n") + "\n" if lines else ""

    # ---- declarations

    def file(self, items: tuple[ast.Item, ...]) -> str:
        previous = None
        for item in items:
            if previous is None:
                blank = False
            elif _kind(previous) == _kind(item) and _kind(item) in ("import", "model"):
                blank = None
            else:
                blank = True
            self._leading(item.loc.line, 0, blank)
            self._item(item)
            previous = item
        self._leading(10 ** 9, 0, None)  # comments at the end of the file
        return self._text()

    def _item(self, item: ast.Item) -> None:
        if isinstance(item, ast.Import):
            self._emit(f"import {item.path.raw}", 0, item.loc.end_line)
        elif isinstance(item, ast.ModelDecl):
            head = f"model {item.name.name} = {item.source.raw}"
            self._block(head, "model", item.options, item.loc, 0)
        elif isinstance(item, ast.BehaviorDecl):
            head = f"behavior {item.name.name}"
            if item.model:
                head += f" on {item.model.name}"
            if item.external:
                head += f" from {item.external.kind.name} {item.external.path.raw}"
            self._block(head, "behavior", item.sections, item.loc, 0)
        elif isinstance(item, ast.ComposeDecl):
            head = f"compose {item.name.name} = {expression(item.expr)}"
            self._block(head, "compose", item.options, item.loc, 0)
        else:
            where = item.urls.name if isinstance(item.urls, ast.Word) else \
                ", ".join(u.raw for u in item.urls)
            head = f"deploy {item.target.name} to {item.engine.name} {where}"
            self._block(head, "deploy", item.options, item.loc, 0)

    # ---- settings and blocks

    def _block(self, head: str, kind: str, block: tuple[ast.Setting, ...] | None,
               loc, depth: int) -> None:
        if block is None:
            self._emit(head, depth, loc.end_line)
            return
        if not block:
            self._emit(head + " {}", depth, loc.end_line)
            return
        if kind in INLINE_BLOCKS and not self._comment_inside(loc):
            flat = head + " { " + "  ".join(_flat(s) for s in block) + " }"
            if "\n" not in flat and len(INDENT * depth + flat) <= WIDTH:
                self._emit(flat, depth, loc.end_line)
                return
        # Comments up to the line the printed head ends on stay on the `{` line: a head
        # with a multi-line string ends lines below where it starts, and a comment taken
        # there must be taken there again when the output is formatted.
        head_end = loc.line + head.count("\n")
        first = block[0].loc.line
        header = self._trailing(head_end) if first > head_end else ""
        self.out.append([INDENT * depth + head + " {", header, self.block_ids[-1]])
        self.last_source_line = loc.line
        self.block_ids.append(len(self.out))
        for i, setting in enumerate(block):
            self._leading(setting.loc.line, depth + 1, False if i == 0 else None)
            self._setting(setting, depth + 1)
        self._leading(loc.end_line, depth + 1, None)
        self.block_ids.pop()
        self._emit("}", depth, loc.end_line)

    def _setting(self, setting: ast.Setting, depth: int) -> None:
        head = _head(setting)
        if len(INDENT * depth + head) > WIDTH and setting.key == "score":
            head = _wrapped_words(setting, depth)
        if setting.block is None:
            self._emit(head, depth, setting.loc.end_line)
        else:
            self._block(head, setting.key, setting.block, setting.loc, depth)


def _kind(item: ast.Item) -> str:
    if isinstance(item, ast.ModelDecl) and (item.options is None or item.loc.line == item.loc.end_line):
        return "model"
    return "import" if isinstance(item, ast.Import) else type(item).__name__


def _head(setting: ast.Setting) -> str:
    if not setting.values:
        return setting.key
    if setting.key == "distill":  # teachers: a name, maybe its text, joined by `+`
        return "distill " + " ".join(
            ("+ " if isinstance(v, ast.Word) and i else "") + _value(v) for i, v in enumerate(setting.values))
    if setting.key == "score":  # score markers "happy", "glad": a kind, then its strings
        kind, *strings = setting.values
        return " ".join(("score", _value(kind), ", ".join(_value(v) for v in strings))).rstrip()
    separator = ", " if setting.key in COMMA_SEPARATED else " "
    return setting.key + " " + separator.join(_value(v) for v in setting.values)


def _wrapped_words(setting: ast.Setting, depth: int) -> str:
    """`score markers` with a long word list: as many words a line as fit, the lines
    after the first indented one level deeper."""
    words = [_value(v) for v in setting.values[1:]]
    lines, line = [], f"score {_value(setting.values[0])} {words[0]}"
    for word in words[1:]:
        if len(INDENT * depth + line) + len(word) + 2 > WIDTH:
            lines.append(line + ",")
            line = INDENT + word
        else:
            line += ", " + word
    lines.append(line)
    return ("\n" + INDENT * depth).join(lines)


def _flat(setting: ast.Setting) -> str:
    head = _head(setting)
    if setting.block is None:
        return head
    return head + (" { " + "  ".join(_flat(s) for s in setting.block) + " }" if setting.block else " {}")


def _value(value: ast.Value) -> str:
    if isinstance(value, ast.Str):
        return value.raw
    if isinstance(value, ast.Num):
        return value.source
    if isinstance(value, ast.Word):
        return value.name
    if isinstance(value, ast.Op):
        return value.text
    return value.start.source + (f"..{value.end.source}" if value.end else "")


def expression(expr: ast.Expr) -> str:
    """An expression with spaces around binary operators and only the needed parentheses."""
    if isinstance(expr, ast.Ref):
        return expr.name
    if isinstance(expr, ast.Const):
        return expr.number.source
    if isinstance(expr, ast.Neg):
        inner = expression(expr.operand)
        return f"-({inner})" if isinstance(expr.operand, ast.Binary) else f"-{inner}"
    precedence = _PRECEDENCE[expr.op]
    left, right = expression(expr.left), expression(expr.right)
    if isinstance(expr.left, ast.Binary) and _PRECEDENCE[expr.left.op] < precedence:
        left = f"({left})"
    if isinstance(expr.right, ast.Binary) and _PRECEDENCE[expr.right.op] <= precedence:
        right = f"({right})"
    return f"{left} {expr.op} {right}"
