"""Golden diagnostics: the whole rendered text (message, source line, caret, hint) of
each spec in tests/golden must match its .expected file exactly.

To accept new output after a deliberate change, run with BEHAVIORC_UPDATE_GOLDEN=1 and
review the diff.
"""

import os
from pathlib import Path

import pytest

from behaviorc.lang.check import check_file

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.behavior"))


def render(name: str) -> str:
    spec, diagnostics = check_file(f"{name}.behavior")
    assert diagnostics, f"{name}.behavior gave no diagnostic"
    if any(d.severity == "error" for d in diagnostics):
        assert spec is None, "a spec with errors must not produce IR"
    return "\n".join(d.render() for d in diagnostics) + "\n"


@pytest.mark.parametrize("name", CASES)
def test_golden_diagnostic(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)  # diagnostics name files as the user passed them
    actual = render(name)
    expected_path = GOLDEN / f"{name}.expected"
    if os.environ.get("BEHAVIORC_UPDATE_GOLDEN"):
        expected_path.write_text(actual)
    assert actual == expected_path.read_text()


def test_enough_distinct_errors() -> None:
    messages = set()
    for path in GOLDEN.glob("*.expected"):
        for line in path.read_text().splitlines():
            if ": error: " in line:
                messages.add(line.split(": error: ", 1)[1])
    assert len(CASES) >= 25 and len(messages) >= 25


def test_every_error_is_located(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)
    for name in CASES:
        _, diagnostics = check_file(f"{name}.behavior")
        for diagnostic in diagnostics:
            assert diagnostic.loc is not None and diagnostic.loc.line >= 1, (name, diagnostic)
