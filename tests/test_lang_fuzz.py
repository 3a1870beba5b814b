"""Mutation fuzzing of the example specs: no input may raise, hang, or be rejected
without a located diagnostic; whatever is accepted must lower to a plan."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from behaviorc.lang.check import check_text
from behaviorc.lang.parse import _language
from behaviorc.build.lower import lower

SPECS = Path(__file__).resolve().parent.parent / "specs"
EXAMPLES = sorted(SPECS.glob("*.behavior"))
INPUTS = 10_000
SECONDS_PER_INPUT = 10  # far above the few milliseconds one takes: only a hang trips it

CHARACTERS = list("{}()[]\"'#\\\n\t @%.,-+*/=<>;:0123456789abcxyz_") + ["\u00e9", "\u2603", "\x00"]
EXTRA_TOKENS = ['"x"', "'y'", '"""a\nb"""', "'''", '"', "0", "-1", "1e999", "2.5", "50%", "..",
                "1..3", "auto", "on", "off", "listen", "base", "gdn.gates", "nope.x", ">", ">=",
                "\\n", '"\\q"', '"\\u12"', "//", "#"]


def vocabulary() -> list[str]:
    language = _language()
    return list(language.lexer.keywords) + list(language.lexer.punctuation) + EXTRA_TOKENS


def mutate(text: str, rng: random.Random, words: list[str]) -> str:
    for _ in range(rng.randint(1, 3)):
        operation = rng.randrange(7)
        at = rng.randrange(len(text) + 1)
        if operation == 0:  # delete a short span
            text = text[:at] + text[at + rng.randint(1, 12):]
        elif operation == 1:  # insert a character
            text = text[:at] + rng.choice(CHARACTERS) + text[at:]
        elif operation == 2:  # insert a token of the language, spaced or not
            space = rng.choice(["", " "])
            text = text[:at] + space + rng.choice(words) + space + text[at:]
        elif operation in (3, 4):  # swap or duplicate lines
            lines = text.split("\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            if operation == 3:
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.insert(i, lines[j])
            text = "\n".join(lines)
        elif operation == 5:  # replace a word by another word of the language
            spots = [k for k in range(len(text)) if text[k].isalpha() and (k == 0 or not text[k - 1].isalnum())]
            if spots:
                start = rng.choice(spots)
                end = start
                while end < len(text) and (text[end].isalnum() or text[end] in "_."):
                    end += 1
                text = text[:start] + rng.choice(words) + text[end:]
        else:  # cut the text short
            text = text[:at]
    return text


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.mark.slow
def test_mutated_specs_never_crash_and_every_rejection_is_located() -> None:
    rng = random.Random(20261124)
    words = vocabulary()
    sources = [(str(p), p.read_text()) for p in EXAMPLES]
    previous = signal.signal(signal.SIGALRM, _alarm)
    rejected = accepted = 0
    try:
        for case in range(INPUTS):
            path, original = sources[case % len(sources)]
            text = mutate(original, rng, words)
            signal.alarm(SECONDS_PER_INPUT)
            try:
                spec, diagnostics = check_text(text, path)
                plan = lower(spec) if spec is not None else None
                rendered = [d.render(text if d.loc and d.loc.file == path else None)
                            for d in diagnostics]
            except _Hang:
                pytest.fail(f"input {case} hung:\n{text}")
            finally:
                signal.alarm(0)
            errors = [d for d in diagnostics if d.severity == "error"]
            if spec is None:
                rejected += 1
                assert errors, f"input {case} rejected without an error:\n{text}"
                for diagnostic in errors:
                    assert diagnostic.loc is not None and diagnostic.loc.line >= 1, \
                        f"input {case}: unlocated {diagnostic}\n{text}"
                    assert diagnostic.loc.file.endswith(".behavior"), diagnostic
            else:
                accepted += 1
                assert not errors and plan is not None and plan.tasks is not None
            assert all(rendered)
    finally:
        signal.signal(signal.SIGALRM, previous)
    # The mutations must exercise both paths, or the fuzzer tests nothing.
    assert rejected > INPUTS // 4 and accepted > INPUTS // 50, (rejected, accepted)
