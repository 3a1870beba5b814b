"""Steering chosen per request on a live vLLM server: the server side.

A server keeps a registry of named steering vectors (`behaviorc steer push URL FILE
--name happy`). A request names the ones it wants, with strengths, in vLLM's free-form
request arguments:

    POST /v1/chat/completions {"messages": [...], "vllm_xargs": {"steer": "happy:2,concise:-1"}}

Two parts run inside the server:

- `NamedSteering`, mixed into the worker extension, holds the registry and steers. Before
  each forward pass it reads which tokens of the batch belong to which request (vLLM's
  persistent batch: `input_batch.req_ids` in the order of `query_start_loc`, and each
  request's `sampling_params.extra_args`) and builds a per-token coefficient matrix C
  [tokens, vectors]; each steered layer adds `C @ V_layer` to its output. Rows of
  unsteered tokens are exactly zero, so their hidden states are bit-for-bit what they
  would be with no registry at all, whatever is batched beside them.
- `SteerRequests`, an ASGI middleware of the OpenAI server, checks the `steer` argument
  before vLLM sees the request (an unknown name or a bad strength is a 400 naming it) and
  sets the request's `cache_salt` from the steering and the vectors' digests, so vLLM's
  prefix cache never hands a steered request blocks computed with other steering (or
  none), and a re-pushed vector never meets blocks computed with its old values.

Registry changes run as worker RPCs, which vLLM executes between forward passes: a
forward pass sees the whole registry before a change or the whole registry after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

STEER_ARG = "steer"  # the key in vllm_xargs
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
STEERED_ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_TERMS = 16
MAX_REGISTERED = 64  # named vectors one server keeps (each holds layers x hidden floats)
FLOAT32_MAX = 3.4028234663852886e38


class SteerSpecError(ValueError):
    """A `steer` argument that cannot be read; the message says what is wrong."""


def parse_steer(text: str) -> tuple[tuple[str, float], ...]:
    """`"happy:2,concise:-1"` -> (("happy", 2.0), ("concise", -1.0)); a bare name is
    strength 1. Names are sorted (steering adds, so order carries no meaning)."""
    if not isinstance(text, str):
        raise SteerSpecError(f"`steer` must be a string like \"happy:2,concise:-1\", "
                             f"not {json.dumps(text)}")
    terms: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, colon, number = (s.strip() for s in part.partition(":"))
        if not NAME_PATTERN.fullmatch(name):
            raise SteerSpecError(f"`{part}` in steer \"{text}\": a vector name is letters, "
                                 f"digits, `_`, `.` or `-`, starting with a letter")
        try:
            strength = float(number) if colon else 1.0
        except ValueError:
            raise SteerSpecError(f"`{part}` in steer \"{text}\": the strength `{number}` "
                                 f"is not a number") from None
        if not math.isfinite(strength):
            raise SteerSpecError(f"`{part}` in steer \"{text}\": the strength must be finite")
        if name in terms:
            raise SteerSpecError(f"steer \"{text}\" names `{name}` twice")
        terms[name] = strength
    if len(terms) > MAX_TERMS:
        raise SteerSpecError(f"steer \"{text}\" names {len(terms)} vectors; at most "
                             f"{MAX_TERMS} per request")
    return tuple(sorted(terms.items()))


def format_steer(terms: Mapping[str, float] | tuple[tuple[str, float], ...]) -> str:
    items = terms.items() if isinstance(terms, Mapping) else terms
    return ",".join(f"{name}:{strength:g}" for name, strength in items)


def vector_digest(vectors: Mapping[int, list[float]]) -> str:
    """A short content hash of a registered vector (the cache salt changes with it)."""
    payload = json.dumps({str(k): vectors[k] for k in sorted(vectors)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_salt(terms: tuple[tuple[str, float], ...], digests: Mapping[str, str],
               salt: Any) -> str:
    """The prefix-cache salt of a steered request: one value per steering setting (names,
    strengths, vector contents) and the client's own salt; vLLM allows 128 characters."""
    key = json.dumps([salt, [(name, digests[name], strength) for name, strength in terms]])
    return "behaviorc-steer-" + hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------- the worker side


@dataclass(frozen=True)
class _Registry:
    """An immutable snapshot: replaced whole on every change, never edited."""

    names: tuple[str, ...]
    index: Mapping[str, int]
    digests: Mapping[str, str]
    layers: Mapping[str, tuple[int, ...]]
    norms: Mapping[str, Mapping[int, float]]
    matrices: Mapping[int, Any]  # layer -> [len(names), hidden] float32, zero rows where absent
    sources: Mapping[str, Mapping[int, list[float]]]  # name -> the registered values


_EMPTY = _Registry((), {}, {}, {}, {}, {}, {})


class NamedSteering:
    """Worker-extension methods for the registry; mixed into `BehaviorWorker`.

    Relies on the worker's `model_runner` and the extension's `_behaviorc_decoder_layers`
    and `_behaviorc_text_config`."""

    def _behaviorc_registry(self) -> _Registry:
        return getattr(self, "_behaviorc_named", _EMPTY)

    def behaviorc_steer_register(self, payload: str) -> dict[str, Any]:
        """payload: {"name", "vectors": {"layer": [floats]}}. Checks everything first;
        a refused vector changes nothing. Re-registering a name replaces its vector."""
        request = json.loads(payload)
        name = request.get("name")
        problems = self._behaviorc_check_vectors(name, request.get("vectors"))
        if problems:
            return {"ok": False, "problems": problems}
        vectors = {int(k): [float(x) for x in v] for k, v in request["vectors"].items()}
        sources = dict(self._behaviorc_registry().sources)
        sources[name] = vectors
        self._behaviorc_install(sources)
        registry = self._behaviorc_registry()
        return {"ok": True, "name": name, "layers": list(registry.layers[name]),
                "digest": registry.digests[name]}

    def behaviorc_steer_unregister(self, payload: str) -> dict[str, Any]:
        """payload: {"name"}. Requests already running with it go on without it."""
        name = json.loads(payload).get("name")
        sources = dict(self._behaviorc_registry().sources)
        if name not in sources:
            return {"ok": False, "problems": [f"no steering vector named `{name}` is "
                                              f"registered (registered: "
                                              f"{', '.join(sorted(sources)) or 'none'})"]}
        del sources[name]
        self._behaviorc_install(sources)
        return {"ok": True, "name": name}

    def behaviorc_steer_names(self) -> dict[str, Any]:
        """{name: {"layers", "digest", "norms"}} for every registered vector."""
        registry = self._behaviorc_registry()
        return {name: {"layers": list(registry.layers[name]), "digest": registry.digests[name],
                       "norms": {str(k): v for k, v in registry.norms[name].items()}}
                for name in registry.names}

    def behaviorc_steer_stats(self) -> dict[str, int]:
        """Forward passes that steered some tokens, and those that also held unsteered
        requests (a test of per-request steering needs the second to be non-zero)."""
        return dict(self._behaviorc_steer_counts())

    def _behaviorc_steer_counts(self) -> dict[str, int]:
        counts = getattr(self, "_behaviorc_named_counts", None)
        if counts is None:
            counts = self._behaviorc_named_counts = {"steered_passes": 0, "mixed_passes": 0}
        return counts

    def _behaviorc_check_vectors(self, name: Any, vectors: Any) -> list[str]:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            return [f"the name {json.dumps(name)} is not a vector name (letters, digits, "
                    f"`_`, `.` or `-`, starting with a letter; at most 64)"]
        registered = self._behaviorc_registry().sources
        if name not in registered and len(registered) >= MAX_REGISTERED:
            return [f"`{name}`: the server already keeps {MAX_REGISTERED} named vectors; "
                    f"remove one first (`behaviorc steer remove URL NAME`)"]
        return self._behaviorc_vector_problems(f"`{name}`", vectors, 1.0)

    def _behaviorc_vector_problems(self, label: str, vectors: Any, strength: float) -> list[str]:
        """What is wrong with steering `vectors` ({"layer": [floats]}) added at `strength`:
        layers in range, the hidden size, float values whose product with the strength
        the served dtype holds (an overflow would turn every steered answer into NaN)."""
        if not isinstance(vectors, dict) or not vectors:
            return [f"{label}: no layers given"]
        count = len(self._behaviorc_decoder_layers())
        hidden = int(self._behaviorc_text_config().hidden_size)
        largest = min(FLOAT32_MAX, self._behaviorc_dtype_max())
        problems = []
        for key, values in vectors.items():
            try:
                layer = int(key)
            except ValueError:
                problems.append(f"{label}: `{key}` is not a layer number")
                continue
            if not 0 <= layer < count:
                problems.append(f"{label}: layer {layer} out of range: the model has "
                                f"{count} decoder layers (0..{count - 1})")
            elif not isinstance(values, list) or len(values) != hidden:
                size = len(values) if isinstance(values, list) else "no list of"
                problems.append(f"{label}: the vector for layer {layer} has {size} values, "
                                f"the hidden size is {hidden}")
            elif not all(type(x) is float for x in values):
                problems.append(f"{label}: the vector for layer {layer} holds values that are "
                                f"not floating-point numbers (write 1.0, not 1)")
            elif not all(math.isfinite(x) and abs(x * strength) <= largest for x in values):
                problems.append(f"{label}: the vector for layer {layer} has NaN or infinite "
                                f"values, or values that times the strength overflow the "
                                f"served dtype (largest {largest:.3g})")
        return problems

    def _behaviorc_dtype_max(self) -> float:
        import torch
        return float(torch.finfo(self.model_runner.model_config.dtype).max)

    def _behaviorc_install(self, sources: Mapping[str, Mapping[int, list[float]]]) -> None:
        """Build the new snapshot completely, then swap it in and re-hook the layers."""
        import torch

        names = tuple(sorted(sources))
        hidden = int(self._behaviorc_text_config().hidden_size)
        matrices: dict[int, Any] = {}
        for row, name in enumerate(names):
            for layer, values in sources[name].items():
                matrix = matrices.setdefault(layer, torch.zeros(len(names), hidden))
                matrix[row] = torch.tensor(values, dtype=torch.float32)
        device = next(self.model_runner.get_model().parameters()).device
        registry = _Registry(
            names=names, index={name: i for i, name in enumerate(names)},
            digests={name: vector_digest(sources[name]) for name in names},
            layers={name: tuple(sorted(sources[name])) for name in names},
            norms={name: {layer: float(torch.tensor(v, dtype=torch.float64).norm())
                          for layer, v in sorted(sources[name].items())} for name in names},
            matrices={layer: m.to(device) for layer, m in matrices.items()},
            sources=dict(sources))
        for handle in getattr(self, "_behaviorc_named_hooks", []):
            handle.remove()
        self._behaviorc_named = registry
        self._behaviorc_named_plan = None
        self._behaviorc_named_hooks = self._behaviorc_hook_registry(registry) if names else []

    def _behaviorc_hook_registry(self, registry: _Registry) -> list[Any]:
        model = self.model_runner.get_model()
        layers = self._behaviorc_decoder_layers()
        handles = [model.register_forward_pre_hook(self._behaviorc_plan_step, with_kwargs=True)]
        for layer in sorted(registry.matrices):
            handles.append(layers[layer].register_forward_hook(
                _per_request_hook(self, registry.matrices[layer])))
        return handles

    def _behaviorc_plan_step(self, module: Any, args: Any, kwargs: Any) -> None:
        """Before a forward pass: C [tokens, vectors], the strength of each registered
        vector on each token of this batch (None when no request in it is steered)."""
        self._behaviorc_named_plan = self._behaviorc_coefficients(_token_count(args, kwargs))

    def _behaviorc_coefficients(self, tokens: int) -> Any:
        import torch

        runner = self.model_runner
        registry = self._behaviorc_registry()
        batch = runner.input_batch
        count = batch.num_reqs
        if not count or tokens <= 0:
            return None
        starts = runner.query_start_loc.np[:count + 1]
        if int(starts[-1]) > tokens:  # not a batch of scheduled requests (a warm-up run)
            return None
        coefficients = None
        plain = 0
        for position, req_id in enumerate(batch.req_ids[:count]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            spec = (getattr(params, "extra_args", None) or {}).get(STEER_ARG)
            if not spec:
                plain += 1
                continue
            for name, strength in _parsed(spec):
                row = registry.index.get(name)
                if row is None:  # removed after the server admitted the request
                    continue
                if coefficients is None:
                    coefficients = torch.zeros(tokens, len(registry.names))
                coefficients[int(starts[position]):int(starts[position + 1]), row] = strength
        if coefficients is None:
            return None
        counts = self._behaviorc_steer_counts()
        counts["steered_passes"] += 1
        counts["mixed_passes"] += plain > 0
        device = next(iter(registry.matrices.values())).device
        return coefficients.to(device)


_PARSED: dict[str, tuple[tuple[str, float], ...]] = {}


def _parsed(spec: str) -> tuple[tuple[str, float], ...]:
    """parse_steer, remembered (a request's spec is read at every step it runs)."""
    found = _PARSED.get(spec)
    if found is None:
        try:
            found = parse_steer(spec)
        except SteerSpecError:  # the server refuses these at admission
            found = ()
        if len(_PARSED) > 4096:
            _PARSED.clear()
        _PARSED[spec] = found
    return found


def _token_count(args: Any, kwargs: Any) -> int:
    for key, position in (("input_ids", 0), ("inputs_embeds", 3)):
        value = kwargs.get(key, args[position] if len(args) > position else None)
        if value is not None:
            return int(value.shape[0])
    return 0


def _per_request_hook(worker: NamedSteering, matrix: Any) -> Any:
    def add_to_steered_tokens(module: Any, inputs: Any, output: Any) -> Any:
        coefficients = worker._behaviorc_named_plan
        if coefficients is None:
            return None
        stream = output[0] if isinstance(output, tuple) else output
        # Unsteered tokens' rows are zero: adding an exact 0 leaves them unchanged.
        addition = (coefficients[: stream.shape[0]] @ matrix).to(stream.dtype)
        if isinstance(output, tuple):
            return (stream + addition, *output[1:])
        return stream + addition

    return add_to_steered_tokens


# ---------------------------------------------------------------- the HTTP side


class SteerRequests:
    """ASGI middleware of vLLM's OpenAI server (`--middleware`): refuses requests naming
    unknown vectors or bad strengths with a 400, and salts steered requests' prefix cache.

    It knows the registry's names from the worker (one RPC, remembered until a
    `/collective_rpc` call passes through, which may have changed the registry, or until a
    request names a vector it does not know)."""

    def __init__(self, app: Any):
        self.app = app
        self._digests: dict[str, str] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if scope["path"] == "/collective_rpc":
            try:
                return await self.app(scope, receive, send)
            finally:
                self._digests = None
        if scope["path"] not in STEERED_ROUTES:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:  # the client went away
            return None
        if b'"' + STEER_ARG.encode() + b'"' in body:
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
        xargs = request.get("vllm_xargs") if isinstance(request, dict) else None
        if not isinstance(xargs, dict) or STEER_ARG not in xargs:
            return body
        terms = parse_steer(xargs[STEER_ARG])
        if not terms:
            del xargs[STEER_ARG]
            return json.dumps(request).encode()
        digests = await self._known(scope, {name for name, _ in terms})
        unknown = [name for name, _ in terms if name not in digests]
        if unknown:
            from behaviorc.core.diagnostics import did_you_mean

            hint = did_you_mean(unknown[0], digests)
            raise SteerSpecError(
                f"unknown steering vector `{unknown[0]}` in vllm_xargs.steer "
                f"\"{xargs[STEER_ARG]}\"; registered: {', '.join(sorted(digests)) or 'none'}"
                + (f" ({hint})" if hint else "")
                + ("" if digests else " (push one with `behaviorc steer push URL FILE --name N`)"))
        xargs[STEER_ARG] = format_steer(terms)
        request["cache_salt"] = cache_salt(terms, digests, request.get("cache_salt"))
        return json.dumps(request).encode()

    async def _known(self, scope: Any, wanted: set[str]) -> dict[str, str]:
        if self._digests is None or not wanted <= self._digests.keys():
            results = await scope["app"].state.engine_client.collective_rpc(
                "behaviorc_steer_names")
            self._digests = {name: entry["digest"] for name, entry in (results[0] or {}).items()}
        return self._digests


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
