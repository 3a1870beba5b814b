"""HTTP to a live vLLM server: one client for every call behaviorc makes (the engine, a
push, the probe traffic).

Every call has a deadline for the whole call (connecting, sending, the headers and the
body), not for each read: a server that trickles a byte a second cannot hold a call past
its timeout. A server that stops answering gives a BehaviorError naming the server and
what was being done, never a hang or a raw traceback.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpcore
import httpx

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.vllm.inside.middleware import API_KEY_ENV

REQUEST_TIMEOUT_S = 120.0  # default for a call; BEHAVIORC_SERVER_TIMEOUT_S overrides it
PUSH_TIMEOUT_S = 600.0
TIMEOUT_ENV = "BEHAVIORC_SERVER_TIMEOUT_S"
KEEPALIVE_S = 2.0
NOT_REPEATABLE = {"/collective_rpc"}  # requests that may change the server's state
HEALTH_TIMEOUT_S = 5.0  # a server's /health answers in milliseconds, even under load


class ServerClient:
    """HTTP plumbing for one server: JSON requests, worker RPCs, clear errors."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float | None = None):
        self.url = url.rstrip("/")
        self._http = http_client(self.url, api_key, default_timeout(timeout))

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, doing: str, body: Any = None,
                timeout: float | None = None) -> Any:
        """The decoded JSON answer (None for an empty one); a BehaviorError otherwise."""
        try:
            response = self._send(method, path, body, timeout)
        except httpx.TimeoutException:
            waited = timeout if timeout is not None else self._http.timeout.read
            raise BehaviorError(f"the vLLM server at {self.url} did not answer in time "
                                f"while {doing} ({method} {path.partition('?')[0]}, "
                                f"{waited:g} s)",
                                hint=f"is the server overloaded or stuck? {TIMEOUT_ENV} "
                                     f"(or `timeout` in a deploy) sets how long to wait") from None
        except httpx.HTTPError as err:
            raise BehaviorError(
                f"lost the vLLM server at {self.url} while {doing}: {type(err).__name__}: "
                f"{err or 'connection closed'}",
                hint="is the server running? `behaviorc serve MODEL` starts one") from None
        if response.status_code >= 400:
            raise BehaviorError(f"the vLLM server at {self.url} refused {doing}: HTTP "
                                f"{response.status_code}: {_error_text(response)}")
        if not response.content:
            return None
        # a few vLLM routes (loading a LoRA adapter) answer in plain text
        return response.json() if "json" in response.headers.get("content-type", "") else response.text

    def _send(self, method: str, path: str, body: Any, timeout: float | None) -> httpx.Response:
        timeout = timeout if timeout is not None else self._http.timeout
        try:
            return self._http.request(method, path, json=body, timeout=timeout)
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # A pooled connection the server closed under us (seen after a refused worker
            # RPC). Reads are safe to send again once on a fresh connection; a worker RPC
            # may have acted, so it is never repeated.
            if path in NOT_REPEATABLE:
                raise
            return self._http.request(method, path, json=body, timeout=timeout)

    def rpc(self, method: str, *args: Any, doing: str,
            timeout: float | None = None) -> Any:
        """Call a worker-extension method; the first worker's answer (all agree)."""
        body = {"method": method, "args": [json.dumps(a) if not isinstance(a, str) else a
                                           for a in args]}
        answer = self.request("POST", "/collective_rpc", doing, body, timeout)
        results = (answer or {}).get("results") or [None]
        return results[0]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (they were computed with other weights or steering).

        vLLM refuses a plain reset while requests hold cache blocks, which under load is
        almost always; preempting them makes it succeed, and they are recomputed."""
        answer = self.request("POST", "/reset_prefix_cache?reset_running_requests=true",
                              "resetting the prefix cache")
        if isinstance(answer, dict) and answer.get("success") is False:
            raise BehaviorError(f"the vLLM server at {self.url} could not reset its prefix "
                                f"cache: answers may still reuse prefixes computed before "
                                f"this change")

    def healthy(self) -> bool:
        try:
            return self._http.get("/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    def require_answer(self, doing: str) -> None:
        """Fail in seconds when the server does not answer `/health`, before a call that
        may rightly wait for minutes."""
        self.request("GET", "/health", f"checking that it answers before {doing}",
                     timeout=min(HEALTH_TIMEOUT_S, self._http.timeout.read or HEALTH_TIMEOUT_S))


def http_client(url: str, api_key: str | None, timeout: float) -> httpx.Client:
    """A client for one server. Plain-HTTP servers get no TLS context: building the
    default one loads the CA bundle, which costs more than a whole push on loopback.
    Idle connections are dropped before vLLM's server closes them (after 5 s), so a
    request never goes out on a connection the server is closing."""
    api_key = check_api_key(api_key or os.environ.get(API_KEY_ENV) or None)  # never from a command line
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = _DeadlineTransport(verify=url.startswith("https://"),
                                   limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S))
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                        transport=transport)


# --- the whole call's deadline -----------------------------------------------------------
# httpx's timeouts bound each socket operation. A request's deadline (now + its read
# timeout) is kept for the thread making it, and every connect, write and read of the
# connection waits at most until then. httpx reads a response's body right after the
# transport returns, in the same thread, before the thread's next request sets a new one.

_calls = threading.local()


class _DeadlineTransport(httpx.HTTPTransport):
    def __init__(self, **options: Any):
        super().__init__(**options)
        # httpcore takes a network backend only when its pool is made; httpx makes the
        # pool without one, so the default backend is wrapped where the pool keeps it.
        self._pool._network_backend = _DeadlineBackend(self._pool._network_backend)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        seconds = request.extensions.get("timeout", {}).get("read")
        _calls.deadline = None if seconds is None else time.monotonic() + seconds
        return super().handle_request(request)


def _left(timeout: float | None, late: type[Exception]) -> float | None:
    """What an operation may wait: its own timeout, cut at the call's deadline."""
    deadline = getattr(_calls, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise late("the call's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend):
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(
            path, _left(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def check_api_key(key: str | None) -> str | None:
    """A key goes in an HTTP header: one word of printable ASCII, or a clear error here
    (a header cannot carry other characters, and a server given one refuses everyone)."""
    if key is not None and not (key.isascii() and key.isprintable() and key.split() == [key]):
        raise BehaviorError(f"the API key (from {API_KEY_ENV} or the spec) is not one word of "
                            f"printable ASCII characters",
                            hint="use letters, digits and punctuation, e.g. `openssl rand -hex 16`")
    return key


def default_timeout(given: float | None = None, fallback: float = REQUEST_TIMEOUT_S) -> float:
    """Seconds a server call waits: `given`, else BEHAVIORC_SERVER_TIMEOUT_S, else
    `fallback` (120 s for a call, PUSH_TIMEOUT_S for a push)."""
    if given is not None:
        return given
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return fallback
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise BehaviorError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds")
    return seconds


def _error_text(response: httpx.Response) -> str:
    try:
        detail = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(detail, dict):
        inner = detail.get("error", detail.get("detail", detail))
        if isinstance(inner, dict):
            inner = inner.get("message", inner)
        return str(inner)[:500]
    return str(detail)[:500]


@contextmanager
def answering_client(url: str, doing: str) -> Iterator[ServerClient]:
    """A client of the server at `url` for one command, which first fails in seconds when
    the server does not answer `/health` (see ServerClient.require_answer)."""
    client = ServerClient(url)
    try:
        client.require_answer(doing)
        yield client
    finally:
        client.close()
