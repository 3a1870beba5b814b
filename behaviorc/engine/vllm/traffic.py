"""A bounded stream of small completion requests against live servers.

Used to show that pushes do not interrupt serving: the deploy task runs it during a push
to count failed requests, and bench/live_push.py uses it to compare request latency
during pushes with latency without them. Every request is a real HTTP completion.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx

from behaviorc.engine.vllm.http import http_client

PROBE_PROMPT = "I will use the existing"


@dataclass(frozen=True)
class Request:
    started: float  # time.perf_counter() when sent
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class RequestLoop:
    """`threads` clients per server, each sending at most `limit` requests, until stopped."""

    urls: Sequence[str]
    threads: int = 2
    limit: int = 1000
    max_tokens: int = 4
    api_key: str | None = None
    timeout: float = 60.0
    extra: dict = field(default_factory=dict)  # more request fields, e.g. vllm_xargs
    pause: float = 0.0  # seconds each client waits after a request (0: back to back)
    requests: list[Request] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> "RequestLoop":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for url in self.urls:
            for _ in range(self.threads):
                worker = threading.Thread(target=self._client, args=(url,), daemon=True)
                worker.start()
                self._workers.append(worker)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()

    @property
    def failed(self) -> list[Request]:
        return [r for r in self.requests if not r.ok]

    def _client(self, url: str) -> None:
        with http_client(url, self.api_key, self.timeout) as http:
            started = time.perf_counter()
            try:
                model = http.get("/v1/models").json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, LookupError) as err:
                self._record(started, False, f"listing models: {type(err).__name__}: {err}")
                return
            body = {"model": model, "prompt": PROBE_PROMPT, "max_tokens": self.max_tokens,
                    "temperature": 0.0, **self.extra}
            for _ in range(self.limit):
                if self._stop.is_set():
                    return
                started = time.perf_counter()
                try:
                    response = http.post("/v1/completions", json=body)
                    ok = response.status_code == 200 and bool(response.json().get("choices"))
                    error = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError) as err:
                    ok, error = False, f"{type(err).__name__}: {err}"
                self._record(started, ok, error)
                if self.pause:
                    self._stop.wait(self.pause)

    def _record(self, started: float, ok: bool, error: str) -> None:
        with self._lock:
            self.requests.append(Request(started, time.perf_counter() - started, ok, error))
