"""`behaviorc check` refuses a text the model's context cannot hold, where the model is
known without loading it (a built-in already made, a local folder): issue 31 finding 7,
where a 20,000-character prompt passed check and was refused only 27 s into the build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from behaviorc.lang import check_text

LONG = "the cat sat on the mat " * 870  # 20,010 characters; ~6,000 tiny-gdn tokens


def spec(model: str) -> str:
    return f'''model base = "{model}"
behavior b {{
  steer {{
    layers 1
    pair "hi" {{ positive " yes" negative " no" }}
    pairs "pairs.jsonl"
  }}
}}
'''


def write_pairs(folder: Path, prompt: str) -> None:
    (folder / "pairs.jsonl").write_text(
        json.dumps({"prompt": prompt, "positive": " yes", "negative": " no"}) + "\n")


def errors(text: str, folder: Path) -> list[str]:
    _, diagnostics = check_text(text, str(folder / "s.behavior"))
    return [f"{d.loc.line if d.loc else '?'}: {d.message}" for d in diagnostics if d.severity == "error"]


def test_a_prompt_over_a_builtins_context_is_refused_at_check(tiny_gdn: Path, tmp_path: Path) -> None:
    assert len(LONG) > 20_000
    write_pairs(tmp_path, LONG)
    found = errors(spec("tiny-gdn"), tmp_path)
    assert len(found) == 1 and found[0].startswith("3: ")  # the steer section's line
    assert "more than the model's context of 2048 positions" in found[0], found
    assert "tokens long" in found[0] and "the cat sat" in found[0]


def test_a_folder_models_context_is_read_from_its_files(tiny_gdn: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_gdn, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    write_pairs(tmp_path, "the cat sat on the mat " * 20)  # 460 characters, ~120 tokens
    found = errors(spec("./m"), tmp_path)
    assert len(found) == 1 and "more than the model's context of 64 positions" in found[0], found
    write_pairs(tmp_path, "the cat sat on the mat " * 2)  # fits: no error
    assert errors(spec("./m"), tmp_path) == []


def test_check_command_shows_where(tiny_gdn: Path, tmp_path: Path) -> None:
    write_pairs(tmp_path, LONG)
    (tmp_path / "s.behavior").write_text(spec("tiny-gdn"))
    done = subprocess.run([sys.executable, "-m", "behaviorc.cli", "check", str(tmp_path / "s.behavior")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout
    assert "s.behavior:3" in done.stdout + done.stderr, done.stdout + done.stderr
    assert "2048 positions" in done.stdout + done.stderr
