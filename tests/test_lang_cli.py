"""`behaviorc check | plan | fmt`: output and exit codes (0 ok, 1 spec errors, 2 usage)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from behaviorc import cli

SPECS = Path(__file__).resolve().parent.parent / "specs"
# Tiny-model copies of the example specs (the examples in specs/ run on smollm2-135m).
TINY_SPECS = Path(__file__).resolve().parent / "data" / "specs"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_ok(capsys) -> None:
    code, out, err = run(capsys, "check", str(TINY_SPECS / "listen.behavior"), str(TINY_SPECS / "persona.behavior"))
    assert code == 0 and err == ""
    assert "persona.behavior: ok (1 model, 3 behaviors, 2 compositions, 0 deploys)" in out


def test_check_reports_every_error_with_caret(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("typo.behavior").write_text(
        'model base = "tiny-gdn"\n\nbehavior listen {\n  steer {\n    strenght 4.0\n'
        '    pairs "missing.jsonl"\n  }\n}\n')
    code, out, err = run(capsys, "check", "typo.behavior")
    assert code == 1 and out == ""
    assert err == (
        "typo.behavior:5:5: error: unknown setting `strenght` in `steer`\n"
        "   5 |     strenght 4.0\n"
        "     |     ^^^^^^^^\n"
        "  hint: did you mean `strength`?\n"
        "typo.behavior:6:11: error: data file `missing.jsonl` not found\n"
        "   6 |     pairs \"missing.jsonl\"\n"
        "     |           ^^^^^^^^^^^^^^^\n"
        "  hint: paths are relative to the spec's folder, `.`\n")


def test_warnings_do_not_fail_check(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "w.behavior"
    spec.write_text('model base = "tiny-gdn"\nbehavior a { steer { strength 30\n'
                    'pair "p" { positive " a"  negative " b" } } }\n')
    code, out, err = run(capsys, "check", str(spec))
    assert code == 0 and "warning: strength 30 is very strong" in err


def test_missing_file_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys, "check", "no/such.behavior")
    assert code == 2 and "no/such.behavior: no such file" in err
    assert run(capsys, "plan", "no/such.behavior")[0] == 2
    assert run(capsys, "fmt", "no/such.behavior")[0] == 2


def test_bad_arguments_are_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan"])
    assert exit_.value.code == 2


def test_plan_tree_and_json(capsys) -> None:
    # deploy.behavior hands its live server over from steering to the distilled weights,
    # so its training task owns the deploy and the plan says so.
    code, out, _ = run(capsys, "plan", str(TINY_SPECS / "deploy.behavior"))
    assert code == 0 and "└── steer.extract:listen (above)" in out
    assert "`listen` is deployed live by its training (train:listen)" in out
    code, out, _ = run(capsys, "plan", str(TINY_SPECS / "deploy.behavior"), "--json")
    data = json.loads(out)
    assert code == 0 and [t["id"] for t in data["tasks"]] == [
        "model:base", "steer.extract:listen", "steer.base:listen", "steer.verify:listen",
        "train:listen", "task_vector:listen"]


def test_plan_of_a_bad_spec_fails(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "bad.behavior"
    spec.write_text('model base = "nowhere/at/all"\n')
    code, out, err = run(capsys, "plan", str(spec))
    assert code == 1 and out == "" and "model folder `nowhere/at/all` not found" in err


def test_fmt_rewrites_and_check_mode(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "messy.behavior"
    spec.write_text('model base="tiny-gdn"   # ours\n')
    code, _, err = run(capsys, "fmt", "--check", str(spec))
    assert code == 1 and f"would reformat {spec}" in err
    assert spec.read_text() == 'model base="tiny-gdn"   # ours\n'  # --check changes nothing
    code, out, _ = run(capsys, "fmt", str(spec))
    assert code == 0 and spec.read_text() == 'model base = "tiny-gdn"  # ours\n'
    assert run(capsys, "fmt", "--check", str(spec))[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["messy.behavior"]  # no temp file left


def test_fmt_check_on_examples(capsys) -> None:
    assert run(capsys, "fmt", "--check", *map(str, sorted(SPECS.glob("*.behavior"))))[0] == 0


def test_fmt_of_broken_spec_fails_and_keeps_it(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "broken.behavior"
    spec.write_text("behavior {\n")
    code, _, err = run(capsys, "fmt", str(spec))
    assert code == 1 and "expected a name, found `{`" in err and spec.read_text() == "behavior {\n"


def test_console_script_help_teaches() -> None:
    if shutil.which("behaviorc") is None:
        pytest.skip("the package is not installed")
    result = subprocess.run(["behaviorc", "check", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "behaviorc check specs/listen.behavior" in result.stdout
    result = subprocess.run([sys.executable, "-m", "behaviorc.cli", "fmt", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--check" in result.stdout
