"""Worker calls and development routes of behaviorc's vLLM server: only what behaviorc
needs is open.

behaviorc needs vLLM's development mode for `/collective_rpc` (the worker extension's
methods) and `/reset_prefix_cache`; the mode opens much more (`/sleep`, `/pause`,
`/update_weights`, `/server_info`, and any worker method by name, such as one that
writes files where the caller says). `WorkerCalls`, an ASGI middleware of the server
(`--middleware`), refuses every other development route, lets `/collective_rpc` call
only `BehaviorWorker`'s `behaviorc_*` methods with at most one JSON string, and refuses
a body larger than the biggest steering payload the model can take from its
Content-Length, before reading it.
"""

from __future__ import annotations

import json
from typing import Any

from behaviorc.engine.vllm.live_steer import read_body, refuse, replay, with_length

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
    from behaviorc.engine.vllm.worker import BehaviorWorker

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
