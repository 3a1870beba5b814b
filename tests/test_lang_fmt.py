"""`behaviorc fmt`: canonical layout, comments kept, idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest

from behaviorc.lang.fmt import format_text
from behaviorc.lang.parse import parse_text

SPECS = Path(__file__).resolve().parent.parent / "specs"
EXAMPLES = sorted(SPECS.glob("*.behavior"))


def comments(text: str) -> list[str]:
    return [c.text for c in parse_text(text, "x.behavior").file.comments]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_formatted_and_fmt_is_idempotent(path: Path) -> None:
    text = path.read_text()
    once, diagnostics = format_text(text, str(path))
    assert diagnostics == []
    assert once == text, "the example specs are kept in canonical layout"
    assert format_text(once, str(path))[0] == once


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_fmt_of_a_scrambled_layout_restores_it(path: Path) -> None:
    """Collapse every run of blanks to one space and indentation to nothing: fmt must
    give back the canonical text, comments included (blank lines aside)."""
    text = path.read_text()
    flat = "\n".join(" ".join(line.split()) for line in text.splitlines()) + "\n"
    restored, _ = format_text(flat, str(path))
    assert comments(restored) == comments(text)
    assert [line for line in restored.splitlines() if line] == \
        [line for line in text.splitlines() if line]
    assert format_text(restored, str(path))[0] == restored


def test_canonical_layout() -> None:
    messy = (
        "# the model\n"
        'model   base="tiny-gdn"{dtype float32 device cpu}\n'
        "behavior listen{steer{layers 1 ..2,3  # layers\n"
        'strength 4 pair "p"{positive "a" negative \'b\'}}\n'
        "\n\n\n"
        "  # training\n"
        'train{optimizer apollo{rank 8 scale auto} targets gdn.gates,attn.q example """x\n'
        'y"""{response "r"}}}\n'
        "compose c=(listen+listen)*-1/2{merge ties{density 20%}}\n"
        'deploy c to vllm "http://a","http://b"{live steering off}  # end\n'
        "# last words\n")
    expected = (
        "# the model\n"
        'model base = "tiny-gdn" { dtype float32  device cpu }\n'
        "\n"
        "behavior listen {\n"
        "  steer {\n"
        "    layers 1..2, 3  # layers\n"
        "    strength 4\n"
        '    pair "p" {\n'
        '      positive "a"\n'
        "      negative 'b'\n"
        "    }\n"
        "  }\n"
        "\n"
        "  # training\n"
        "  train {\n"
        "    optimizer apollo { rank 8  scale auto }\n"
        "    targets gdn.gates, attn.q\n"
        '    example """x\n'
        'y""" {\n'
        '      response "r"\n'
        "    }\n"
        "  }\n"
        "}\n"
        "\n"
        "compose c = (listen + listen) * -1 / 2 {\n"
        "  merge ties { density 20% }\n"
        "}\n"
        "\n"
        'deploy c to vllm "http://a", "http://b" { live  steering off }  # end\n'
        "# last words\n")
    formatted, diagnostics = format_text(messy, "x.behavior")
    assert diagnostics == []
    assert formatted == expected
    assert format_text(formatted, "x.behavior")[0] == formatted


def test_expression_parentheses_are_kept_where_needed() -> None:
    text = "compose c = a - (b - c) + -(a * 2) - a / (b * 3)\n"
    assert format_text(text, "x.behavior")[0] == text


def test_trailing_comments_of_a_block_align() -> None:
    text = ('behavior a {\n  steer {\n    layers 1  # one\n    strength 4.0  # two\n'
            '    method pca\n  }\n}\n')
    formatted, _ = format_text(text, "x.behavior")
    assert "    layers 1      # one\n    strength 4.0  # two\n" in formatted


def test_fmt_refuses_a_file_with_syntax_errors() -> None:
    formatted, diagnostics = format_text("model base = \n", "x.behavior")
    assert formatted is None
    assert diagnostics[0].message == "expected a string, found the end of the file"


def test_steerability_settings_survive_fmt() -> None:
    from behaviorc.lang.check import check_text

    text = ('model base = "tiny-gdn"\nbehavior cheer { steer { method pca_center strength auto '
            'sweep 1,2 budget { nll 5% repetition 0.2 } '
            'pair "Hi" { positive " Great!" negative " Awful." } '
            'pair "Yo" { positive " Lovely!" negative " Dreadful." } } }\n')
    formatted, _ = format_text(text, "cheer.behavior")
    assert format_text(formatted, "cheer.behavior")[0] == formatted
    assert "budget {\n      nll 5%\n      repetition 0.2\n    }" in formatted
    spec, diagnostics = check_text(formatted, "cheer.behavior")
    assert spec is not None, [d.render() for d in diagnostics]
    steer = spec.behaviors[0].steer
    assert (steer.method, steer.strength, steer.sweep) == ("pca_center", "auto", (1.0, 2.0))
    assert (steer.nll_budget, steer.repetition_budget) == (pytest.approx(0.05), 0.2)
