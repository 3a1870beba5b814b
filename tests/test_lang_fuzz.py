"""Mutation fuzzing of the example specs: no input may raise, hang, or be rejected
without a located diagnostic; whatever is accepted must lower to a plan."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import pytest

from behaviorc.lang.check import check_text
from behaviorc.lang.parse import _language
from behaviorc.pipeline.lower import lower

SPECS = Path(__file__).resolve().parent.parent / "specs"
EXAMPLES = sorted(SPECS.glob("*.behavior"))
INPUTS = 4_000
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
                if plan is not None:  # what `behaviorc plan` prints must print
                    assert plan.to_json() and plan.render_tree()
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


# ---- property tests per class of hostile input (issue 22): fixed seeds, bounded counts

from behaviorc.lang.check import check_file  # noqa: E402
from behaviorc.lang.fmt import format_text  # noqa: E402

PAIR = 'pair "p" { positive " a"  negative " b" }'
ONE_PAIR = 'model base = "tiny-gdn"\nbehavior b {\n  steer {\n    ' + PAIR + '\n  }\n}\n'


def _located_within(diagnostics, text_lines: int | None = None) -> None:
    for d in diagnostics:
        if d.severity != "error":
            continue
        assert d.loc is not None and d.loc.line >= 1 and d.loc.column >= 1, d
        if text_lines is not None:
            assert d.loc.line <= text_lines, (d, text_lines)


def test_any_bytes_give_located_errors_and_line_ends_or_a_bom_change_nothing(tmp_path) -> None:
    """Encodings: a spec's bytes mutated (bad UTF-8, BOM, CR and CRLF line ends, control
    characters, U+2028) never crash `check`, and every error is at a line of the file."""
    rng = random.Random(2201)
    originals = [p.read_bytes() for p in EXAMPLES]
    shutil.copytree(SPECS, tmp_path / "specs")  # beside its data files and imports
    path = tmp_path / "specs" / "mutated.behavior"
    odd = [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r", b"\r\n", b"\x00",
           b"\x1b", "\u2028".encode(), "\u0085".encode(), b"\x7f", b"\t"]
    for case in range(300):
        raw = originals[case % len(originals)]
        if case % 3 == 0:  # only a BOM and other line ends: the same spec
            ending = rng.choice([b"\r\n", b"\r", b"\n"])
            mutated = rng.choice([b"", b"\xef\xbb\xbf"]) + raw.replace(b"\n", ending)
            path.write_bytes(mutated)
            spec, diagnostics = check_file(str(path))
            expected, _ = check_file(str(EXAMPLES[case % len(originals)]))
            assert (spec is None) == (expected is None), [d.render() for d in diagnostics]
            continue
        mutated = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(mutated) + 1)
            mutated[at:at] = rng.choice(odd)
        path.write_bytes(bytes(mutated))
        lines = bytes(mutated).replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        spec, diagnostics = check_file(str(path))
        _located_within(diagnostics, lines)
        assert all(d.render() for d in diagnostics)


def test_string_literals_take_escapes_and_refuse_raw_controls_and_surrogates() -> None:
    """Strings: a random literal is accepted exactly when it holds no raw control
    character and no surrogate escape, and then reads as the characters it spells."""
    rng = random.Random(2202)
    plain = ["a", " ", "é", "\u2603", "\U0001F600", "\u2028", "'"]
    escapes = {"\\n": "\n", "\\t": "\t", "\\\\": "\\", '\\"': '"', "\\u00e9": "é",
               "\\U0001F600": "\U0001F600", "\\0": "\0"}
    refused = 0
    for case in range(400):
        literal, value, bad = [], [], False
        for _ in range(rng.randint(1, 8)):
            kind = rng.choice([0, 0, 0, 0, 1, 1, 1, 1, 2, 3])
            if kind == 0:
                char = rng.choice(plain)
                literal.append(char)
                value.append(char)
            elif kind == 1:
                escape = rng.choice(list(escapes))
                literal.append(escape)
                value.append(escapes[escape])
            elif kind == 2:
                literal.append(f"\\u{rng.randrange(0xD800, 0xE000):04X}")
                bad = True
            else:
                literal.append(rng.choice(["\x00", "\x01", "\x1f", "\x7f", "\x85", "\r"]))
                bad = True
        text = ONE_PAIR.replace('"p"', '"x' + "".join(literal) + '"')
        spec, diagnostics = check_text(text, "fuzz.behavior")
        _located_within(diagnostics)
        refused += bad
        if bad:
            assert spec is None, repr(text)
        else:
            assert spec is not None, [d.render() for d in diagnostics]
            assert spec.behaviors[0].steer.pairs[0].prompt == "x" + "".join(value)
    assert 100 < refused < 300, refused


def test_data_files_count_lines_as_the_reader_does_and_locate_every_bad_one(tmp_path) -> None:
    """Data files: line ends of any kind, a BOM and U+2028 inside strings keep line
    numbers right; a bad record (bad JSON, a surrogate escape, bad bytes) is named by
    its line."""
    rng = random.Random(2203)
    (tmp_path / "s.behavior").write_text(ONE_PAIR.replace(PAIR, 'pairs "pairs.jsonl"'))
    good = [json.dumps({"prompt": f"p{i}\u2028q", "positive": " a", "negative": " b"},
                       ensure_ascii=False) for i in range(6)]
    bad = ['{"prompt": 1, "positive": " a", "negative": " b"}',
           '{"prompt": "\\udc00", "positive": " a", "negative": " b"}', "{nope"]
    outcomes = {None: 0, True: 0, False: 0}  # accepted, bad bytes, bad records
    for case in range(150):
        lines, wrong = [], None
        for number in range(1, rng.randint(2, 7)):
            if wrong is None and rng.random() < 0.3:
                lines.append(rng.choice(bad))
                wrong = number
            else:
                lines.append(rng.choice(good))
        ending = rng.choice(["\n", "\r\n", "\r"])
        raw = (rng.choice(["", "\ufeff"]) + ending.join(lines) + ending).encode()
        if wrong is None and rng.random() < 0.3:
            wrong = rng.randrange(1, len(lines) + 1)
            start = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            offset = sum(len(line.encode()) + 1 for line in lines[:wrong - 1]) + 3
            raw = start[:offset + (3 if start.startswith(b"\xef\xbb\xbf") else 0)] + b"\xff" + \
                start[offset + (3 if start.startswith(b"\xef\xbb\xbf") else 0):]
        (tmp_path / "pairs.jsonl").write_bytes(raw)
        spec, diagnostics = check_file(str(tmp_path / "s.behavior"))
        errors = [d for d in diagnostics if d.severity == "error"]
        outcomes[b"\xff" in raw if wrong else None] += 1
        if wrong is None:
            assert spec is not None, [d.render() for d in diagnostics]
        else:
            assert errors and errors[0].message.startswith(f"pairs.jsonl:{wrong}:"), \
                (wrong, raw, [d.message for d in errors])
        _located_within(diagnostics)
    assert min(outcomes.values()) > 15, outcomes


def test_size_limits_refuse_exactly_what_is_over_them(tmp_path, monkeypatch) -> None:
    """Limits: specs, strings, data files and lines are refused exactly when over their
    limit, and the message names the variable that raises it."""
    rng = random.Random(2204)
    monkeypatch.setenv("BEHAVIORC_MAX_SPEC_BYTES", "4000")
    monkeypatch.setenv("BEHAVIORC_MAX_STRING_BYTES", "500")
    monkeypatch.setenv("BEHAVIORC_MAX_DATA_BYTES", "3000")
    monkeypatch.setenv("BEHAVIORC_MAX_LINE_BYTES", "700")
    spec_path, data_path = tmp_path / "s.behavior", tmp_path / "pairs.jsonl"
    refused = 0
    for case in range(120):
        kind = rng.choice(["spec", "string", "data", "line"])
        size = rng.randrange(300, 5000)
        if kind == "spec":
            text = ONE_PAIR + "#" * (size - len(ONE_PAIR) - 1) + "\n"
            over, variable = len(text.encode()) > 4000, "BEHAVIORC_MAX_SPEC_BYTES"
        elif kind == "string":
            literal = '"' + "s" * (size // 8) + '"'
            text, over = ONE_PAIR.replace('"p"', literal), len(literal) > 500
            variable = "BEHAVIORC_MAX_STRING_BYTES"
        else:
            record = json.dumps({"prompt": "d" * (size // 8), "positive": " a", "negative": " b"})
            copies = 1 if kind == "line" else rng.randint(1, 40)
            data_path.write_text((record + "\n") * copies)
            text = ONE_PAIR.replace(PAIR, 'pairs "pairs.jsonl"')
            if kind == "data":
                over, variable = len(record + "\n") * copies > 3000, "BEHAVIORC_MAX_DATA_BYTES"
            else:
                over, variable = len(record) > 700, "BEHAVIORC_MAX_LINE_BYTES"
                if len(record + "\n") > 3000:
                    continue  # the data limit would speak first
        spec_path.write_text(text)
        spec, diagnostics = check_file(str(spec_path))
        messages = " ".join(d.message for d in diagnostics)
        assert (spec is None) == over, (kind, size, messages)
        assert (variable in messages) == over, (kind, size, messages)
        _located_within(diagnostics)
        refused += over
    assert 20 < refused < 100, refused


def test_check_reports_every_file_of_any_batch(tmp_path, capsys) -> None:
    """Batches: whatever mix of good, broken, undecodable and special files is checked,
    every file is reported, each broken one with its own located error."""
    from behaviorc.cli import main

    rng = random.Random(2205)
    os.mkfifo(tmp_path / "fifo.behavior")
    kinds = {"good": ONE_PAIR.encode(), "typo": ONE_PAIR.replace("steer", "stear").encode(),
             "bytes": ONE_PAIR.encode().replace(b'"p"', b'"\xff"'),
             "nul": ONE_PAIR.replace('"p"', '"\x00"').encode()}
    for case in range(25):
        names = []
        for index in range(rng.randint(1, 5)):
            kind = rng.choice([*kinds, "fifo"])
            if kind == "fifo":
                names.append("fifo.behavior")
                continue
            path = tmp_path / f"{case}_{index}_{kind}.behavior"
            path.write_bytes(kinds[kind])
            names.append(path.name)
        previous = os.getcwd()
        os.chdir(tmp_path)
        try:
            code = main(["check", *names])
        finally:
            os.chdir(previous)
        out, err = capsys.readouterr()
        for name in names:
            if name.endswith("_good.behavior"):
                assert f"{name}: ok" in out
            else:
                assert re.search(re.escape(name) + r":\d+:\d+: error: ", err), (name, err)
        assert code == (0 if all(n.endswith("_good.behavior") for n in names) else 1)


def test_fmt_is_idempotent_with_multiline_strings_and_comments_anywhere() -> None:
    """fmt: comments before, inside and after multi-line strings, in any order of
    settings, format to a text that formats to itself."""
    rng = random.Random(2206)
    pieces = ['# c\n', '\n', 'example """a\nb""" { response " ok" }\n',
              'example """a\nb"""  # t\n{ response " ok" }\n',
              'example "x" { response """p\nq""" }\n', 'lr 1e-4  # t\n', 'steps 3\n',
              'example # t\n """a\nb""" { response " ok" }\n',
              'example """a\nb""" { # t\n response " ok" }\n',
              "example '''one\n# not a comment\ntwo''' { response ''' r\n''' }  # t\n"]
    for case in range(1500):
        body = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        text = f'model base = "tiny-gdn"\n# top\nbehavior b {{\n  train {{\n{body}  }}\n}}\n'
        once, diagnostics = format_text(text, "fuzz.behavior")
        assert once is not None, [d.render() for d in diagnostics]
        assert format_text(once, "fuzz.behavior")[0] == once, text
