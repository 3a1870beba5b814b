"""Every call to a server has a deadline for the whole call: a server that trickles its
answer a byte a second cannot hold a client past its timeout (issue 31, finding 3)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from behaviorc.cli import main
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.vllm.http import HEALTH_TIMEOUT_S, ServerClient

SLACK_S = 1.0  # what the issue allows past a deadline


class Trickler(socketserver.ThreadingTCPServer):
    """Reads a request, then answers one byte a second: the status line and headers
    (`headers`), or prompt headers and a body that never completes (`body`)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, part: str):
        super().__init__(("127.0.0.1", 0), _Trickle)
        self.part = part
        self.stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Trickle(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Trickler = self.server  # type: ignore[assignment]
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            received += chunk
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        if server.part == "body":
            self.request.sendall(answer)
            answer = b"{" + b" " * 100000
        for byte in answer:
            if server.stopped.wait(1.0):
                return
            try:
                self.request.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up


@pytest.fixture(params=["headers", "body"])
def trickler(request):
    yield from _serving(Trickler(request.param))


@pytest.fixture
def trickling_headers():
    yield from _serving(Trickler("headers"))


def _serving(server: Trickler):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stopped.set()
    server.shutdown()
    server.server_close()


def test_a_request_ends_at_its_deadline_however_the_server_trickles(trickler):
    client = ServerClient(trickler.url, timeout=2.0)
    began = time.monotonic()
    with pytest.raises(BehaviorError, match="did not answer in time while listing"):
        client.request("GET", "/v1/models", "listing served models")
    assert time.monotonic() - began < 2.0 + SLACK_S
    client.close()


@pytest.mark.parametrize("command", [["steer", "list"], ["chat", None, "hello"]])
def test_the_cli_checks_health_first_and_gives_up_in_seconds(trickling_headers, command, monkeypatch, capsys):
    trickler = trickling_headers
    monkeypatch.setenv("BEHAVIORC_SERVER_TIMEOUT_S", "120")
    argv = [trickler.url if part is None else part for part in command]
    if command[0] == "steer":
        argv.append(trickler.url)
    began = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - began < HEALTH_TIMEOUT_S + SLACK_S
    err = capsys.readouterr().err
    assert "did not answer in time while checking that it answers before" in err and "Traceback" not in err


def test_a_silent_server_is_named_as_well():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts connections, never reads or answers
    try:
        client = ServerClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=1.0)
        began = time.monotonic()
        with pytest.raises(BehaviorError, match="did not answer in time"):
            client.rpc("behaviorc_info", doing="describing the served model")
        assert time.monotonic() - began < 1.0 + SLACK_S
        client.close()
    finally:
        listener.close()
