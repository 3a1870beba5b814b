"""Settings that cannot be meant are refused by `check`, at the value (issue 31, finding
6): each would overflow the model's numbers, spin without a step, or leak a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from behaviorc.lang.check import check_file

SPEC = """model base = "tiny-gdn"
behavior b {
  steer {
    pair "p" { positive " a"  negative " b" }
    STEER
  }
  train {
    example "e" { response " r" }
    TRAIN
  }
}
deploy b to vllm URL { DEPLOY }
"""


def diagnostics_of(tmp_path: Path, steer: str = "", train: str = "", deploy: str = "live",
                   url: str = '"http://127.0.0.1:8000"') -> list[str]:
    text = SPEC.replace("STEER", steer).replace("TRAIN", train).replace("DEPLOY", deploy).replace("URL", url)
    path = tmp_path / "s.behavior"
    path.write_text(text)
    _, found = check_file(str(path))
    return [d.render().removeprefix(f"{tmp_path}/") for d in found if d.severity == "error"]


@pytest.mark.parametrize("where, setting, says", [
    ("steer", "strength 1e308", "s.behavior:5:14: error: `strength` must be in (0, 1000], not 1e308"),
    ("steer", "sweep 0, 2, -1e308", "s.behavior:5:17: error: `sweep` must be in [-1000, 1000], not -1e308"),
    ("steer", "layers 1, 1, 1, 1", "s.behavior:5:15: error: layer 1 is listed twice"),
    ("steer", "layers 0..2, 1", "s.behavior:5:18: error: layer 1 is listed twice"),
    ("train", "steps 1e15", "s.behavior:9:11: error: `steps` must be in [1, 1000000], not 1e15"),
    ("train", "batch 1e9", "s.behavior:9:11: error: `batch` must be in [1, 4096], not 1e9"),
    ("train", "optimizer apollo { rank 1e12 }", "s.behavior:9:29: error: `rank` must be in [1, 65536], not 1e12"),
    ("train", "seed 1e20", "s.behavior:9:10: error: `seed` must be in [0, 4294967295], not 1e20"),
    ("deploy", "timeout 1e-9", "s.behavior:12:52: error: `timeout` must be in [0.1, 86400], not 1e-9"),
])
def test_settings_out_of_range_are_located_errors(tmp_path, where, setting, says):
    errors = diagnostics_of(tmp_path, **{where: setting})
    assert errors and errors[0].startswith(says), errors


@pytest.mark.parametrize("url, says", [
    ('"http://127.0.0.1:99999"', "has no valid port (1..65535)"),
    ('"http://127.0.0.1:0"', "has no valid port (1..65535)"),
    ('"http://admin:hunter2@127.0.0.1:8000"', "a server URL holds no user or password"),
])
def test_server_urls_are_checked(tmp_path, url, says):
    errors = diagnostics_of(tmp_path, url=url)
    assert len(errors) == 1 and errors[0].startswith("s.behavior:12:18: error: ") and says in errors[0], errors


def test_the_bounds_themselves_are_accepted(tmp_path):
    assert diagnostics_of(tmp_path, steer="strength 1000  sweep -1000, 1000  layers 0..1, 3",
                          train="steps 1000000  batch 4096  seed 4294967295  optimizer apollo { rank 65536 }",
                          deploy="live  timeout 0.1") == []
