"""Data files are read a line at a time in bounded chunks: a line over the line limit is
refused from its size without being held, and a line under a raised limit costs a few
times its size, not gigabytes (issue 31 finding 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from behaviorc.core.textfiles import TextFileError, TextLines, read_text_file
from test_hostile_input import assert_located_failure, behaviorc, steer_with, write

MIB = 1 << 20


def huge_pair_line(folder: Path, mib: int) -> int:
    line = json.dumps({"prompt": "the cat " * (mib * MIB // 8), "positive": " a", "negative": " b"})
    write(folder, "pairs.jsonl", line + "\n")
    write(folder, "s.behavior", steer_with('pairs "pairs.jsonl"'))
    return len(line)


def test_a_line_over_the_limit_is_never_held_whole(tmp_path: Path) -> None:
    size = huge_pair_line(tmp_path, 96)
    code, err, peak_mib = behaviorc("check", "s.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "s.behavior:3:17: error: pairs.jsonl:1: the line of 96.0 MiB")
    # Under the line's own size (the interpreter and behaviorc take ~70 MiB); read whole,
    # the file, its text, its lines and the record took 4 times the line.
    assert peak_mib < size / MIB, peak_mib


def test_a_raised_limit_costs_a_few_times_the_line(tiny_gdn: Path, tmp_path: Path) -> None:
    size = huge_pair_line(tmp_path, 64)
    code, err, peak_mib = behaviorc("check", "s.behavior", cwd=tmp_path,
                                       env={"BEHAVIORC_MAX_LINE_BYTES": str(128 * MIB)})
    # Accepted by the reader, the prompt is refused at check: tiny-gdn's context is known.
    assert_located_failure(code, err, "s.behavior:3:3: error: in `b`'s steer section")
    assert "more than the model's context of 2048 positions" in err
    assert peak_mib < 4 * size / MIB + 100, peak_mib


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_lines_read_in_chunks_are_the_lines_read_whole(tmp_path: Path, chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(TextLines, "CHUNK", chunk)
    for content in (b"\xef\xbb\xbfa\r\nb\rc\n\nd", b"a\r", b"a\r\r\nb\n", b"", b"\n",
                    "ünï\r\ncödé\u2028x\n".encode(), b"x" * 20 + b"\ny"):
        path = write(tmp_path, "d.jsonl", content)
        whole = read_text_file(str(path), "data").text.split("\n")
        read = [text for _, text in TextLines(str(path), "data")]
        assert read == (whole[:-1] if whole[-1] == "" else whole), content


def test_a_long_line_is_sized_and_later_lines_still_numbered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BEHAVIORC_MAX_LINE_BYTES", "10")
    monkeypatch.setattr(TextLines, "CHUNK", 4)
    path = write(tmp_path, "d.jsonl", b"short\n" + b"y" * 25 + b"\nok\n\xff\n")
    lines = iter(TextLines(str(path), "data"))
    assert [next(lines) for _ in range(3)] == [(1, "short"), (2, 25), (3, "ok")]
    with pytest.raises(TextFileError) as raised:
        next(lines)
    assert (raised.value.line, raised.value.column) == (4, 1)
