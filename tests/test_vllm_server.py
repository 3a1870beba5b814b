"""Server lifecycle and failure paths of the vLLM client.

A server killed in the middle of a push is a real process that dies with SIGKILL when
the push request reaches it: starting a second vLLM (about a minute here) only to kill
it would test the same socket behaviour. The live vLLM tests use the shared fixture.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from behaviorc.cli import main
from behaviorc.diagnostics import BehaviorError
from behaviorc.engine.push import push_weights
from behaviorc.engine.server import free_port, server_command, start_server

# Answers the manifest like behaviorc's worker, then behaves as told on the push.
FAKE_SERVER = textwrap.dedent("""
    import json, os, signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    folder, on_push = sys.argv[2], sys.argv[3]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["method"] == "behaviorc_push":
                if on_push == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            answer = {"results": [{"folders": [folder], "previous": [], "tensors": {}}]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
""")


@pytest.fixture
def fake_server(tmp_path, request):
    port = free_port("127.0.0.1")
    process = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, str(port),
                                str(tmp_path), request.param])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1.0)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the stand-in server did not start"
            time.sleep(0.1)
    yield url, process
    process.kill()
    process.wait()


@pytest.mark.parametrize("fake_server", ["die"], indirect=True)
def test_server_killed_mid_push_gives_a_clear_error(fake_server, tiny_dense):
    url, process = fake_server
    with pytest.raises(BehaviorError, match=f"lost the vLLM server at {url} while pushing"):
        push_weights([url], tiny_dense)
    assert process.wait(timeout=10) == -9  # it really was killed during the push


@pytest.mark.parametrize("fake_server", ["hang"], indirect=True)
def test_server_that_stops_answering_times_out(fake_server, tiny_dense):
    url, _ = fake_server
    with pytest.raises(BehaviorError, match="did not answer in time while pushing"):
        push_weights([url], tiny_dense, timeout=2.0)


def test_public_host_needs_an_api_key():
    with pytest.raises(BehaviorError, match="refusing to serve on `0.0.0.0` without an API key"):
        start_server("tiny-gdn", host="0.0.0.0")


def test_unknown_model_is_named_with_a_hint(tmp_path):
    with pytest.raises(BehaviorError) as caught:
        start_server("tiny-gnd")
    assert "neither a built-in model nor a model folder" in caught.value.render()
    assert "did you mean `tiny-gdn`?" in caught.value.render()


def test_api_key_guards_every_route_but_health(monkeypatch, tiny_gdn):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from behaviorc.engine.server import API_KEY_ENV, guard_all_routes

    command = server_command(tiny_gdn, "0.0.0.0", 8000, api_key="secret")
    assert command[command.index("--middleware") + 1] == \
        "behaviorc.engine.server.guard_all_routes"
    monkeypatch.setenv(API_KEY_ENV, "secret")
    app = FastAPI()
    app.middleware("http")(guard_all_routes)
    app.get("/health")(lambda: {})
    app.post("/collective_rpc")(lambda: {"results": []})
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert client.post("/collective_rpc").status_code == 401
    assert client.post("/collective_rpc",
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/collective_rpc",
                       headers={"Authorization": "Bearer secret"}).status_code == 200


def test_serve_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "behaviorc serve tiny-gdn" in text
    assert "--api-key" in text
