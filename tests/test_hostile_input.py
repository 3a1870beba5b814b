"""Issue 22's reproductions, one test each: hostile input and failing servers end in a
located error (exit 1, `file:line:col:` or the server, the call and the cause), with no
traceback, bounded memory and an answer in seconds."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Diagnostic, Location
from behaviorc.engine.vllm.inside.weights import ServedWeights
from behaviorc.lang.check import check_file
from behaviorc.lang.fmt import format_text

ROOT = Path(__file__).resolve().parent.parent
GOOD = 'model base = "tiny-gdn"\nbehavior b {\n  steer { pair "p" { positive " a"  negative " b" } }\n}\n'


# The child reports its own peak, its memory's high-water mark (VmHWM): ru_maxrss would
# count this test process's memory too, which a child inherits across fork and exec (and
# RUSAGE_CHILDREN keeps the largest child ever waited for), models loaded by earlier tests
# included.
CHILD = """import atexit, os, re, sys
from behaviorc.cli import main
def report():
    status = open("/proc/self/status").read()
    open(os.environ["PEAK_KIB_FILE"], "w").write(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
atexit.register(report)
sys.exit(main())
"""


def behaviorc(*args: str, cwd: Path, env: dict | None = None,
              timeout: float = 60) -> tuple[int, str, float]:
    """Exit code, stderr and the child's peak memory in MiB of a CLI run; a run that
    outlasts `timeout` (a read that blocked, work without bound) fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        result = subprocess.run(
            [sys.executable, "-c", CHILD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PEAK_KIB_FILE": str(peak_file), **(env or {})})
        return result.returncode, result.stderr, int(peak_file.read_text()) / 1024


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def steer_with(pairs_setting: str) -> str:
    return GOOD.replace('pair "p" { positive " a"  negative " b" }', pairs_setting)


def assert_located_failure(code: int, err: str, where: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert where in err, err


# ---- odd text

@pytest.mark.parametrize("setting", ['pairs "\\uD800"', 'pair "\\uDBFF" { positive " a"  negative " b" }'])
def test_a_lone_surrogate_escape_is_a_located_error(tmp_path, setting):
    spec = write(tmp_path, "s.behavior", steer_with(setting))
    code, err, _ = behaviorc("check", "s.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "s.behavior:3:")
    assert "surrogate" in err
    code, err, _ = behaviorc("plan", "s.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "s.behavior:3:")
    write(tmp_path, "i.behavior", 'import "\\uD800"\n' + GOOD)
    code, err, _ = behaviorc("check", "i.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "i.behavior:1:8:")
    assert spec.exists()


def test_a_surrogate_escape_inside_a_data_file_is_refused(tmp_path):
    write(tmp_path, "pairs.jsonl", '{"prompt": "\\ud800", "positive": " a", "negative": " b"}\n')
    write(tmp_path, "s.behavior", steer_with('pairs "pairs.jsonl"'))
    _, diagnostics = check_file(str(tmp_path / "s.behavior"))
    assert any("pairs.jsonl:1:" in d.message and "surrogate" in d.message for d in diagnostics)


def test_check_reports_every_file_of_a_batch(tmp_path):
    write(tmp_path, "a.behavior", GOOD)
    write(tmp_path, "b.behavior", GOOD.encode().replace(b'"p"', b'"p\xff\xfe"'))
    write(tmp_path, "c.behavior", GOOD.replace("steer", "stear"))
    code, err, _ = behaviorc("check", "a.behavior", "b.behavior", "c.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "b.behavior:3:18: error: not UTF-8 text")
    assert "c.behavior:3:3: error:" in err


def test_a_raw_control_character_in_a_string_is_refused_with_the_escape(tmp_path):
    write(tmp_path, "s.behavior", GOOD.replace('"p"', '"p\x00q"'))
    code, err, _ = behaviorc("check", "s.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "s.behavior:3:18: error: a raw control character")
    assert "`\\0`" in err


def test_a_byte_order_mark_and_any_line_end_are_accepted(tmp_path):
    text = "\ufeff" + GOOD.replace("\n", "\r\n")
    write(tmp_path, "s.behavior", text)
    spec, diagnostics = check_file(str(tmp_path / "s.behavior"))
    assert spec is not None, [d.render() for d in diagnostics]
    write(tmp_path, "r.behavior", GOOD.replace("\n", "\r") + "oops\r")
    _, diagnostics = check_file(str(tmp_path / "r.behavior"))
    assert [d.loc.line for d in diagnostics if d.severity == "error"] == [5]


def test_u2028_inside_a_json_string_is_a_character_not_a_line_end(tmp_path):
    record = {"prompt": "one\u2028two\u2029three\x85four", "positive": " a", "negative": " b"}
    write(tmp_path, "pairs.jsonl", "\ufeff" + json.dumps(record, ensure_ascii=False) + "\n"
          + '{"prompt": 1}\n')
    write(tmp_path, "s.behavior", steer_with('pairs "pairs.jsonl"'))
    _, diagnostics = check_file(str(tmp_path / "s.behavior"))
    assert [d.message.split(" ")[0] for d in diagnostics] == ["pairs.jsonl:2:"]


def test_fmt_is_idempotent_on_a_multiline_string_after_a_comment():
    text = ('model base = "tiny-gdn"\nbehavior b {\n  train {\n    example # why\n'
            '      """first\nsecond""" { response " ok" }\n  }\n}\n')
    once, _ = format_text(text, "s.behavior")
    twice, _ = format_text(once, "s.behavior")
    assert once is not None and twice == once


# ---- memory and time

def test_a_10_mb_string_literal_is_refused_quickly_in_little_memory(tmp_path):
    write(tmp_path, "s.behavior", GOOD.replace('"p"', '"' + "x" * 10_000_000 + '"'))
    code, err, peak = behaviorc("check", "s.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "s.behavior:3:16: error: a string literal of 9.5 MiB")
    assert "BEHAVIORC_MAX_STRING_BYTES" in err
    assert peak < 1024, peak


def test_a_spec_over_the_size_limit_names_the_limit(tmp_path):
    write(tmp_path, "s.behavior", GOOD + "# " + "x" * 5000 + "\n")
    code, err, _ = behaviorc("check", "s.behavior", cwd=tmp_path,
                                env={"BEHAVIORC_MAX_SPEC_BYTES": "4096"})
    assert_located_failure(code, err, "s.behavior:1:1: error: a spec file of 5.")
    assert "BEHAVIORC_MAX_SPEC_BYTES" in err


@pytest.mark.parametrize("where", ["/dev/zero", "/dev/urandom", "fifo.jsonl"])
def test_endless_and_blocking_files_are_refused_at_once(tmp_path, where):
    os.mkfifo(tmp_path / "fifo.jsonl")
    write(tmp_path, "d.behavior", steer_with(f'pairs "{where}"'))
    write(tmp_path, "i.behavior", f'import "{where}"\n' + GOOD)
    for name, line in (("d.behavior", 3), ("i.behavior", 1)):
        code, err, peak = behaviorc("check", name, cwd=tmp_path, timeout=30)
        assert_located_failure(code, err, f"{name}:{line}:")
        assert "not a regular file" in err and peak < 1024


def test_a_model_folder_whose_config_is_a_fifo_is_refused_at_once(tmp_path):
    (tmp_path / "model").mkdir()
    os.mkfifo(tmp_path / "model" / "config.json")
    write(tmp_path, "s.behavior", GOOD.replace('"tiny-gdn"', '"model"'))
    code, err, _ = behaviorc("check", "s.behavior", cwd=tmp_path, timeout=30)
    assert_located_failure(code, err, "s.behavior:1:14: error: model/config.json: not a regular")


def test_a_50_mb_data_line_is_refused_at_check(tmp_path):
    line = json.dumps({"prompt": "x" * 50_000_000, "positive": " a", "negative": " b"})
    write(tmp_path, "pairs.jsonl", line + "\n")
    write(tmp_path, "s.behavior", steer_with('pairs "pairs.jsonl"'))
    code, err, peak = behaviorc("check", "s.behavior", cwd=tmp_path)
    assert_located_failure(code, err, "s.behavior:3:17: error: pairs.jsonl:1: the line of 47.7 MiB")
    assert "BEHAVIORC_MAX_LINE_BYTES" in err and peak < 1024


def test_a_prompt_longer_than_the_context_fails_before_any_work(tiny_gdn):
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.steer.extract import extract

    engine = EmbeddedEngine.load(tiny_gdn, device="cpu")
    short = ir.Pair(prompt="Use the parser.", positive=" yes", negative=" no")
    long = ir.Pair(prompt="word " * 4000, positive=" yes", negative=" no")
    steer = Location(file="s.behavior", line=3, column=3, end_line=3, end_column=8)
    started = time.monotonic()
    with pytest.raises(BehaviorError, match="more than the model's context of 2048 positions") \
            as caught:
        extract(engine, [short] * 40 + [long], [0, 1], "mean_diff", "mean", loc=steer)
    assert time.monotonic() - started < 10
    assert caught.value.render().startswith("s.behavior:3:3: error: the text 'word word")


# ---- models and servers

def test_a_wrong_shaped_tensor_is_named(tiny_dense, tmp_path):
    from behaviorc.engine.vllm.server import resolve_model_dir
    from behaviorc.model.loading import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_dense, folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] + 3)
    save_file(weights, str(folder / "model.safetensors"))
    for load in (load_model, resolve_model_dir):
        with pytest.raises(BehaviorError, match=f"tensor `{name}` in model.safetensors has shape"):
            load(folder)


def test_serve_refuses_a_folder_without_safetensors_before_vllm(tiny_dense, tmp_path):
    from behaviorc.engine.vllm.server import start_server

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dense, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    started = time.monotonic()
    with pytest.raises(BehaviorError, match="only pickle weights"):
        start_server(folder)
    assert time.monotonic() - started < 10


def test_serve_keeps_the_api_key_off_every_command_line(tiny_gdn, tmp_path):
    from behaviorc.engine.vllm.server import server_command, server_environment

    command = server_command(tiny_gdn, "0.0.0.0", 8000, api_key="s3cret")
    assert not any("s3cret" in part for part in command) and "--api-key" not in command
    env = server_environment("s3cret")
    assert env["VLLM_API_KEY"] == "s3cret" and env["BEHAVIORC_API_KEY"] == "s3cret"
    assert "VLLM_API_KEY" not in server_environment(None)
    code, err, _ = behaviorc("serve", "tiny-gdn", "--api-key", "s3cret", cwd=tmp_path)
    assert_located_failure(code, err, "BEHAVIORC_API_KEY=KEY")


def test_a_deploy_takes_its_key_from_the_spec_or_the_environment(tiny_gdn, tmp_path, monkeypatch):
    from behaviorc.engine.vllm.http import http_client
    from behaviorc.lang.check import check_text
    from behaviorc.pipeline.lower import lower

    spec_text = ('model base = "tiny-gdn"\nbehavior b from model "m"\n'
                 'deploy b to vllm "http://127.0.0.1:9" { api_key "k-from-spec"  timeout 3 }\n')
    shutil.copytree(tiny_gdn, tmp_path / "m")
    spec, diagnostics = check_text(spec_text, str(tmp_path / "s.behavior"))
    assert spec is not None, [d.render() for d in diagnostics]
    assert spec.deploys[0].api_key == "k-from-spec" and spec.deploys[0].timeout == 3
    assert "k-from-spec" not in lower(spec).to_json()  # never printed, never in a key
    shown = Diagnostic("error", "x", spec.deploys[0].loc).render(spec_text)
    assert 'api_key "***********"  timeout 3' in shown  # nor shown under an error
    monkeypatch.setenv("BEHAVIORC_API_KEY", "k-from-env")
    with http_client("http://127.0.0.1:9", None, 1.0) as http:
        assert http.headers["authorization"] == "Bearer k-from-env"
    with http_client("http://127.0.0.1:9", "k-from-spec", 1.0) as http:
        assert http.headers["authorization"] == "Bearer k-from-spec"


def test_a_server_that_accepts_and_never_answers_fails_in_seconds(tiny_dense, tmp_path):
    from behaviorc.pipeline.kinds import DeployModel, ImportModel, ResolveModel
    from behaviorc.pipeline.executor import Executor

    with socket.socket() as silent:  # the kernel accepts connections; nothing answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        model = ResolveModel(name="base", decl=ir.ModelDecl(name="base", source=str(tiny_dense),
                                                             kind="folder"))
        source = ImportModel(name="b", external=ir.External(kind="model", path=str(tiny_dense)))
        task = DeployModel(name="b", deploy=ir.Deploy(target="b", urls=(url,)), model=model,
                           source=source)
        started = time.monotonic()
        outcome = Executor(tmp_path / "out").run([task])
        seconds = time.monotonic() - started
    error = outcome.record("deploy:b").error
    assert not outcome.ok and seconds < 20, seconds
    assert f"the vLLM server at {url} did not answer in time while checking that it answers" \
        in error and "GET /health" in error


def test_a_timeout_is_configurable_and_names_the_call(monkeypatch, tiny_dense):
    from stand_in_server import stand_in_server

    from behaviorc.engine.vllm.push import push_weights

    monkeypatch.setenv("BEHAVIORC_SERVER_TIMEOUT_S", "1.5")
    with stand_in_server("hang") as (url, _):
        started = time.monotonic()
        with pytest.raises(BehaviorError) as caught:
            push_weights([url], tiny_dense)
    assert time.monotonic() - started < 10
    assert f"at {url} did not answer in time while pushing weights " \
           "(POST /collective_rpc, 1.5 s)" in str(caught.value)


def test_a_push_whose_folder_vanished_does_not_block_the_next(tiny_gdn, tmp_path):
    served = ServedWeights.of_folder(Path(shutil.copytree(tiny_gdn, tmp_path / "served")))
    pushed = Path(shutil.copytree(tiny_gdn, tmp_path / "pushed"))
    weights = load_file(str(pushed / "model.safetensors"))
    save_file({n: t + 0.01 for n, t in weights.items()}, str(pushed / "model.safetensors"))
    assert served.stage("one", pushed, complete=True, transient=False) == []
    served.sources.update(served.staged.sources)  # what a commit keeps
    shutil.rmtree(pushed)  # deleted while served (or mid-push, after it was read)
    assert served.stage("two", tmp_path / "served", complete=True, transient=False) == []
    assert len(served.staged.tensors) == len(served.manifest)


@pytest.mark.vllm
def test_a_live_server_takes_a_push_after_one_whose_folder_vanished(vllm_server, tmp_path):
    from behaviorc.engine.vllm.push import push_weights

    pushed = Path(shutil.copytree(vllm_server.model_dir, tmp_path / "pushed"))
    weights = load_file(str(pushed / "model.safetensors"))
    save_file({n: t + 0.01 for n, t in weights.items()}, str(pushed / "model.safetensors"))
    try:
        push_weights([vllm_server.url], pushed)
        shutil.rmtree(pushed)
        push_weights([vllm_server.url], vllm_server.model_dir)  # refused before the fix
        partial = {"model.norm.weight": load_file(
            str(vllm_server.model_dir / "model.safetensors"))["model.norm.weight"]}
        push_weights([vllm_server.url], partial)
    finally:
        push_weights([vllm_server.url], vllm_server.model_dir)
