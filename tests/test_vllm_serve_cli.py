"""`behaviorc serve` as a user runs it: a real subprocess serving tiny-dense.

One server start (about a minute here) covers the dense model's weight pushes, the API
key (given in the environment, every client here passes it) and the command's Ctrl-C;
the session's shared server serves tiny-gdn.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.vllm.push import push_weights
from behaviorc.engine.vllm.client import VLLMEngine

pytestmark = pytest.mark.vllm

PROMPTS = ["I will use", "def add(a, b):", ""]
COMPLETIONS = [" the existing parser.", "\n    return a + b", "Yes."]
BF16_TOLERANCE = 0.03  # vLLM and transformers both run bfloat16
START_TIMEOUT_S = 600
KEY = "k-9f3e1d7c5b"


@dataclass
class ServeProcess:
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float) -> int:
        """The exit code, once the process ended and all its output was read."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def url(self) -> str:
        found = re.search(r"^url: (\S+)$", self.output, re.MULTILINE)
        assert found, self.output
        return found.group(1)


@pytest.fixture(scope="module")
def served_dense(tiny_dense, tmp_path_factory) -> Iterator[tuple[ServeProcess, Path]]:
    """`behaviorc serve` on a copy of tiny-dense, ready to answer."""
    model_dir = tmp_path_factory.mktemp("serve") / "tiny-dense"
    shutil.copytree(tiny_dense, model_dir)
    process = subprocess.Popen(
        # eager starts a minute sooner; the session's tiny-gdn server runs compiled
        [sys.executable, "-m", "behaviorc.cli", "serve", str(model_dir), "--eager"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "BEHAVIORC_API_KEY": KEY})
    serving = ServeProcess(process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "press Ctrl-C to stop" not in serving.output:
        assert process.poll() is None, serving.output
        assert time.monotonic() < deadline, serving.output
        time.sleep(0.5)
    yield serving, model_dir
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        serving.wait(timeout=60)


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_dense_model_serves_and_takes_pushes_like_the_embedded_engine(served_dense, tmp_path):
    serving, model_dir = served_dense
    url = serving.url()
    weights = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(11)
    # q/k/v and gate/up are fused in vLLM: change some of the parts, not all.
    change = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
              for name, tensor in weights.items()
              if name.startswith("model.layers.1.") and ("k_proj" in name or "up_proj" in name)}
    assert len(change) == 2
    with VLLMEngine(url, KEY) as live:
        before = live.completion_logprobs(PROMPTS, COMPLETIONS)
        assert max_difference(before, EmbeddedEngine.load(model_dir, dtype="bfloat16")
                              .completion_logprobs(PROMPTS, COMPLETIONS)) < BF16_TOLERANCE

        push_weights([url], change, api_key=KEY)

        after = live.completion_logprobs(PROMPTS, COMPLETIONS)
        assert max_difference(after, before) > 0.01
        changed = tmp_path / "changed"
        shutil.copytree(model_dir, changed)
        save_file({**weights, **change}, str(changed / "model.safetensors"))
        expected = EmbeddedEngine.load(changed, dtype="bfloat16")
        assert max_difference(after, expected.completion_logprobs(PROMPTS, COMPLETIONS)) \
            < BF16_TOLERANCE

        push_weights([url], model_dir, api_key=KEY)
        assert live.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_the_key_guards_the_server_and_is_on_no_command_line(served_dense, monkeypatch):
    import httpx

    serving, model_dir = served_dense
    url = serving.url()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert KEY.encode() not in cmdline.read_bytes(), cmdline
        except OSError:
            continue  # a process that ended meanwhile
    assert httpx.post(f"{url}/collective_rpc", json={}).status_code == 401
    assert httpx.post(f"{url}/v1/completions", json={}).status_code == 401
    monkeypatch.setenv("BEHAVIORC_API_KEY", KEY)  # a deploy's key from the environment
    push_weights([url], model_dir)


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_serve_and_curl() -> tuple[str, str]:
    """The README's first `behaviorc serve MODEL` and the curl request after it (its
    continued lines joined), as a user copies them."""
    text = README.read_text()
    served = re.search(r"^behaviorc serve (\S+)", text, re.MULTILINE)
    assert served, "the README shows no `behaviorc serve`"
    curl = re.search(r"^curl .*?(?<!\\)$", text[served.end():], re.MULTILINE | re.DOTALL)
    assert curl, "no curl after the README's `behaviorc serve`"
    return served.group(1), curl.group(0).replace("\\\n", " ")


def test_the_readme_curl_answers_from_behaviorc_serve(served_dense):
    """The README's curl, run as written against `behaviorc serve`: only the URL, the
    model id (this server serves tiny-dense, the README a built-in the same way) and the
    API key this server needs are changed."""
    import json

    from behaviorc.engine.vllm.server import (COMPILING, STARTUP_PHASES, served_model_name,
                                              startup_phase)

    serving, _ = served_dense
    model, curl = readme_serve_and_curl()
    readme_id = json.loads(re.search(r"-d '(\{.*\})'", curl).group(1))["model"]
    assert readme_id == served_model_name(model)  # what `behaviorc serve MODEL` prints
    assert re.search(r"^model: tiny-dense$", serving.output, re.MULTILINE), serving.output
    url = re.search(r"http://\S+?(?=/v1/)", curl).group(0)
    command = curl.replace(url, serving.url()).replace(f'"model": "{readme_id}"', '"model": "tiny-dense"')
    command += f" -sS --fail-with-body -H 'Authorization: Bearer {KEY}'"
    answer = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    reply = json.loads(answer.stdout)
    assert reply["model"] == "tiny-dense" and reply["usage"]["completion_tokens"] >= 1
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    # while it started, `serve` told what vLLM was doing, by phrases its log really holds
    log = Path(re.search(r"^log: (\S+)$", serving.output, re.MULTILINE).group(1))
    text = log.read_text(errors="replace")
    assert startup_phase(log) == "ready"
    # (this server runs eager: it compiles nothing)
    assert [phrase for phrase, _ in STARTUP_PHASES
            if phrase not in text and phrase != COMPILING] == [], text[-3000:]


def test_ctrl_c_stops_the_server_and_frees_the_port(served_dense):
    serving, _ = served_dense
    port = int(serving.url().rsplit(":", 1)[1])

    serving.process.send_signal(signal.SIGINT)

    assert serving.wait(timeout=60) == 0
    assert "stopping the server" in serving.output
    assert f"127.0.0.1:{port} is free" in serving.output
    assert "Traceback" not in serving.output
    with socket.socket() as probe:  # nothing listens there any more
        with pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
    with socket.socket() as probe:  # and the port can be bound again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))



def test_killing_serve_outright_stops_vllm_and_frees_its_port_and_memory(tiny_dense):
    """kill -9 of `behaviorc serve` (nothing of it runs to stop the server) must not
    leave vLLM running: the kernel's parent-death signal stops it."""
    from behaviorc.engine.vllm.server import free_port, shared_memory

    port = free_port("127.0.0.1")
    serving = ServeProcess(subprocess.Popen(
        [sys.executable, "-m", "behaviorc.cli", "serve", str(tiny_dense), "--port", str(port),
         "--eager"],  # what is killed does not matter, only that it dies; eager starts sooner
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "press Ctrl-C to stop" not in serving.output:
            assert serving.process.poll() is None and time.monotonic() < deadline, serving.output
            time.sleep(0.5)
        group = next(int(p.name) for p in Path("/proc").iterdir()
                     if p.name.isdigit() and _parent(p) == serving.process.pid)
        segments = shared_memory(group)
        serving.process.send_signal(signal.SIGKILL)
        serving.wait(timeout=60)
        deadline = time.monotonic() + 120  # only guards against a server that never goes
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(group), "vLLM outlived behaviorc serve"
        with socket.socket() as probe:  # the port can be bound again
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
        assert not [s for s in segments if s.exists()]
    finally:
        if serving.process.poll() is None:
            serving.process.kill()


def test_killing_serve_while_vllm_starts_stops_it_too(tiny_dense):
    """kill -9 of `behaviorc serve` while vLLM starts: vLLM takes the SIGTERM that the
    parent-death signal sends it then, and waits in its engine handshake for ever, the
    engine core beside it; the launcher watch of behaviorc's plugin kills the group."""
    serving = ServeProcess(subprocess.Popen(
        [sys.executable, "-m", "behaviorc.cli", "serve", str(tiny_dense), "--eager"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        group = None
        while group is None or not _engine_core_started(group):  # mid-start: the handshake
            assert "press Ctrl-C to stop" not in serving.output, "vLLM was ready before the check"
            assert serving.process.poll() is None and time.monotonic() < deadline, serving.output
            group = next((int(p.name) for p in Path("/proc").iterdir()
                          if p.name.isdigit() and _parent(p) == serving.process.pid), None)
            time.sleep(0.2)
        serving.process.send_signal(signal.SIGKILL)
        serving.wait(timeout=60)
        deadline = time.monotonic() + 120  # the watch waits 15 s for vLLM to stop itself
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(group), "vLLM outlived behaviorc serve"
    finally:
        if serving.process.poll() is None:
            serving.process.kill()


def _engine_core_started(group: int) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == group \
                    and b"EngineCore" in (proc / "cmdline").read_bytes():
                return True
        except (OSError, ProcessLookupError):
            continue  # a process that ended meanwhile
    return False


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError):
        return -1


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
