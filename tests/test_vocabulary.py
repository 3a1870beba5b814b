"""Each closed word list of the spec is written once (core.vocabulary, the merge method
catalog): no other tuple, list, set or Literal in the package spells one out again, and
the checker's hints list the words from there."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from behaviorc.core import vocabulary
from behaviorc.core.merge_methods import METHOD_NAMES, METHODS
from behaviorc.lang import check_text

PACKAGE = Path(__file__).resolve().parent.parent / "behaviorc"
VOCABULARIES = {name: frozenset(get_args(value)) for name, value in vars(vocabulary).items()
                if get_origin(value) is Literal}
VOCABULARIES |= {"merge methods": frozenset(METHODS), "merge method names": frozenset(METHOD_NAMES)}
DEFINITIONS = {("core/merge_methods.py", "merge methods")}  # the catalog's keys


def _word_lists(tree: ast.AST):
    """Each tuple, list, set or Literal[...] of two or more string constants: (line, words)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        else:
            continue
        if len(items) > 1 and all(isinstance(i, ast.Constant) and isinstance(i.value, str)
                                  for i in items):
            yield node.lineno, frozenset(i.value for i in items)


def test_no_vocabulary_is_written_twice() -> None:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        if where == "core/vocabulary.py":
            continue
        for line, words in _word_lists(ast.parse(path.read_text())):
            for name, vocabulary_words in VOCABULARIES.items():
                if words == vocabulary_words and (where, name) not in DEFINITIONS:
                    found.setdefault((where, name), []).append(line)
    assert not found, f"vocabularies spelled out again (import them from core): {found}"


@pytest.mark.parametrize("setting, vocabulary_words", [
    ("steer { layers 1  pair \"a\" { positive \"b\"  negative \"c\" }  method WORD }",
     vocabulary.STEER_METHODS),
    ("steer { layers 1  pair \"a\" { positive \"b\"  negative \"c\" }  orient WORD }",
     vocabulary.ORIENTATIONS),
    ("train { example \"a\" { response \"b\" }  optimizer WORD }", vocabulary.OPTIMIZERS),
    ("train { example \"a\" { response \"b\" }  context WORD }", vocabulary.CONTEXT_MODES),
])
def test_the_checker_offers_the_core_words(tmp_path: Path, setting: str,
                                           vocabulary_words: tuple[str, ...]) -> None:
    text = f'model base = "tiny-gdn"\nbehavior b {{\n  {setting.replace("WORD", "zzz")}\n}}\n'
    _, diagnostics = check_text(text, str(tmp_path / "spec.behavior"))
    hints = [d.hint for d in diagnostics if d.message.endswith("`zzz`")]
    *others, last = [f"`{word}`" for word in vocabulary_words]
    assert hints == [f"choose {', '.join(others)} or {last}"]
