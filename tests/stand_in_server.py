"""A stand-in for a vLLM replica, for the failure paths a real vLLM rarely shows.

It is a real HTTP server in its own process. It answers behaviorc's worker RPCs like
a server that accepts everything, and when a push is to change its weights (a single
push, or the commit after every replica staged it) it does what the test asks: `die`
(SIGKILL itself mid-request, as a killed server), `hang` (never answer), or `refuse`
(answer that the reload failed).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from typing import Iterator

import httpx

from behaviorc.engine.vllm.server import free_port

SERVER = textwrap.dedent("""
    import json, os, signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    on_push = sys.argv[2]
    ANSWERS = {
        "behaviorc_stage": {"ok": True, "problems": []},
        "behaviorc_discard": {"ok": True},
        "behaviorc_rollback": {"ok": True},
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = ANSWERS.get(body["method"])
            if body["method"] in ("behaviorc_push", "behaviorc_commit"):
                if on_push == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                if on_push == "hang":
                    time.sleep(3600)
                answer = {"ok": False, "problems": ["the stand-in refuses every push"]}
            data = json.dumps({"results": [answer]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
""")


@contextmanager
def stand_in_server(on_push: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port("127.0.0.1")
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port), on_push])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the stand-in server did not start") from None
                time.sleep(0.1)
        yield url, process
    finally:
        process.kill()
        process.wait()
