"""What behaviorc keeps in a vLLM worker, and what each worker call does with it.

Steering. `set_steering` adds `strength * vector` to the output of chosen decoder layers
for every request; named vectors steer only the requests that name them. Both are
columns of the steering tables every layer reads (`steering.SteeringSlots`): before each
forward pass the state reads which tokens of the batch belong to which request (and,
for `generated` steering, where each request's prompt ends) and writes their
coefficients.

Weights. A push is staged, then committed. Staging reads every pushed tensor once,
checking names, shapes and dtypes against the served checkpoint and that every value is
finite, leaves out the decoder layers whose values did not change, and completes each
layer the push changes with the served values of its other tensors (vLLM rebuilds a
fused module, e.g. qkv or the MoE experts, from all of its parts). Committing feeds
those checkpoint-format tensors to vLLM's own `load_weights` (`VllmWorker.load_weights`),
so vLLM fuses and repacks them into its kernel layouts. The worker remembers where each
served value can be read again (the model folder, a pushed folder, or memory for a
pushed state dict), so a rollback loads the previous values of the same tensors.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from behaviorc.engine.vllm.inside.steering import (
    EMPTY, SERVER_WIDE, Shape, build_registry, positions_problems, registration_problems,
    token_coefficients, vector_problems, with_server_wide)
from behaviorc.engine.vllm.inside.vllm_internals import VllmWorker
from behaviorc.engine.vllm.inside.weights import ServedWeights


def _layer_kinds(config: Any, count: int) -> list[str]:
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * count
    return ["gdn" if kind == "linear_attention" else "attention" for kind in kinds[:count]]


class WorkerState:
    """One per worker, made on the extension's first call; requests are plain values
    (the decoded JSON of a worker call) and so are the answers."""

    def __init__(self, worker: VllmWorker):
        self.worker = worker
        self._served: ServedWeights | None = None  # read on the first push
        self._slots = worker.steering_slots()
        self._server_wide: list[int] = []  # the layers set_steering steers
        self._server_wide_positions = "all"
        self._registry = EMPTY
        self._counts = {"steered_passes": 0, "mixed_passes": 0}
        worker.before_each_forward(self._plan)

    # --- model description ---

    def info(self) -> dict[str, Any]:
        config, text = self.worker.config(), self.worker.text_config()
        count = len(self.worker.decoder_layers())
        return {
            "path": str(self.worker.folder()),
            "architecture": (getattr(config, "architectures", None) or ["?"])[0],
            "num_layers": count,
            "hidden_size": int(text.hidden_size),
            "layer_kinds": _layer_kinds(text, count),
            "dtype": str(self.worker.dtype()).removeprefix("torch."),
            "start_token_id": self.worker.start_token_id(),
            "compiled": self.worker.compiled(),
        }

    def _shape(self) -> Shape:
        return Shape(len(self.worker.decoder_layers()), int(self.worker.text_config().hidden_size),
                     float(torch.finfo(self.worker.dtype()).max))

    # --- steering every request ---

    def set_steering(self, request: Any) -> dict[str, Any]:
        """request: {"strength": float, "vectors": {"layer": [floats]}, "positions": "all"
        (the default) | "generated"}; replaces all steering."""
        strength = request.get("strength") if isinstance(request, dict) else None
        if type(strength) not in (int, float) or not math.isfinite(strength):
            raise ValueError(f"the steering strength must be a finite number, not {strength!r}")
        positions = request.get("positions", "all")
        # Everything is checked before the steering in place is touched: a refused
        # request leaves it as it was.
        problems = (positions_problems(positions)
                    + vector_problems("steering", request.get("vectors"), strength, self._shape()))
        if problems:
            raise ValueError("; ".join(problems))
        additions = {int(key): torch.tensor(values, dtype=torch.float32) * strength
                     for key, values in request["vectors"].items()}
        # rounded to the served dtype first: what adding it in that dtype adds
        self._slots.write_columns({SERVER_WIDE: {
            layer: delta.to(self.worker.dtype()).float() for layer, delta in additions.items()}})
        self._server_wide = sorted(additions)
        self._server_wide_positions = positions
        return {"layers": self._server_wide, "strength": strength, "positions": positions}

    def clear_steering(self) -> dict[str, Any]:
        removed = len(self._server_wide)
        self._slots.write_columns({SERVER_WIDE: {}})
        self._server_wide = []
        self._server_wide_positions = "all"
        return {"removed": removed}

    def server_wide(self) -> dict[str, Any]:
        """{"layers", "positions"} of the steering every request gets (no layers: none)."""
        return {"layers": self._server_wide, "positions": self._server_wide_positions}

    # --- named vectors, steering the requests that name them ---

    def register_vector(self, request: Any) -> dict[str, Any]:
        """request: {"name", "vectors": {"layer": [floats]}, "positions": "all" (the
        default) | "generated"}. Checks everything first; a refused vector changes
        nothing. Re-registering a name replaces its vector."""
        name = request.get("name")
        positions = request.get("positions", "all")
        problems = positions_problems(positions) + registration_problems(
            name, request.get("vectors"), self._registry, self._shape())
        if problems:
            return {"ok": False, "problems": problems}
        vectors = {int(k): [float(x) for x in v] for k, v in request["vectors"].items()}
        self._install({**self._registry.sources, name: vectors},
                      {**self._registry.positions, name: positions})
        return {"ok": True, "name": name, "layers": list(self._registry.layers[name]),
                "digest": self._registry.digests[name]}

    def unregister_vector(self, request: Any) -> dict[str, Any]:
        """request: {"name"}. Requests already running with it go on without it."""
        name = request.get("name")
        sources = dict(self._registry.sources)
        if name not in sources:
            return {"ok": False, "problems": [f"no steering vector named `{name}` is "
                                              f"registered (registered: "
                                              f"{', '.join(sorted(sources)) or 'none'})"]}
        del sources[name]
        self._install(sources, self._registry.positions)
        return {"ok": True, "name": name}

    def vector_names(self) -> dict[str, Any]:
        """{name: {"layers", "digest", "norms", "positions"}} for every registered vector."""
        registry = self._registry
        return {name: {"layers": list(registry.layers[name]), "digest": registry.digests[name],
                       "norms": {str(k): v for k, v in registry.norms[name].items()},
                       "positions": registry.positions[name]}
                for name in registry.names}

    def steering_counts(self) -> dict[str, int]:
        """Forward passes that steered some tokens, and those that also held unsteered
        requests (a test of per-request steering needs the second to be non-zero)."""
        return dict(self._counts)

    def _install(self, sources: Mapping[str, Mapping[int, list[float]]],
                 positions: Mapping[str, str]) -> None:
        """Swap in the new snapshot and write every registry column of the tables."""
        registry = build_registry(sources, positions)
        freed = range(len(registry.names) + 1, len(self._registry.names) + 1)
        self._slots.write_columns({
            **{column: {} for column in freed},
            **{column: {layer: torch.tensor(values) for layer, values in sources[name].items()}
               for name, column in registry.index.items()}})
        self._registry = registry

    def _plan(self, tokens: int) -> None:
        """Before a forward pass: the coefficients of its tokens."""
        coefficients = None
        per_request = self._server_wide and self._server_wide_positions != "all"
        requests = self.worker.scheduled_requests(tokens) if self._registry.names or per_request else []
        if self._registry.names:
            coefficients = token_coefficients(requests, self._registry.index, tokens,
                                              generated=self._registry.generated)
            if coefficients is not None:
                self._counts["steered_passes"] += 1
                self._counts["mixed_passes"] += any(not request.steer for request in requests)
        if self._server_wide:
            coefficients = with_server_wide(coefficients, requests, tokens,
                                            self._server_wide_positions)
        self._slots.set_tokens(coefficients)

    # --- weights ---

    def served(self) -> ServedWeights:
        if self._served is None:
            self._served = ServedWeights.of_folder(self.worker.folder())
        return self._served

    def stage(self, request: Any) -> dict[str, Any]:
        """request: {"token", "path": folder, "complete": bool, "transient": bool}. Checks
        the weights and reads them for `commit`; changes nothing served."""
        problems = self.served().stage(
            str(request["token"]), Path(request["path"]), bool(request["complete"]),
            bool(request["transient"]))
        return {"ok": not problems, "problems": problems}

    def commit(self, request: Any) -> dict[str, Any]:
        """request: {"token"}. Load the staged weights. If vLLM fails part-way, the
        previous values of the same tensors are loaded back and the answer says what
        failed."""
        token = request["token"]
        served = self.served()
        staged = served.staged
        if staged is None or staged.token != token:
            return {"ok": False, "problems": ["another push was staged since this one was "
                                              "checked; nothing changed"]}
        served.staged = None
        previous = {name: served.sources[name] for name in staged.tensors}
        started = time.perf_counter()
        try:
            self.worker.load_weights(staged.tensors)
        except Exception as err:  # vLLM's loader fails in many ways; all mean: roll back
            self.worker.load_weights(served.read(previous))
            return {"ok": False, "problems": [f"vLLM could not load the weights: {err!r}; "
                                              f"the previous weights are back"]}
        served.sources.update(staged.sources)
        served.previous, served.previous_token = previous, token
        return {"ok": True, "tensors": len(staged.tensors), "pushed": staged.pushed,
                "seconds": {"read": staged.read_seconds,
                            "load": time.perf_counter() - started}}

    def push(self, request: Any) -> dict[str, Any]:
        """Stage and commit in one call (a push to a single server)."""
        staged = self.stage(request)
        return self.commit(request) if staged["ok"] else staged

    def discard(self, request: Any) -> dict[str, Any]:
        """request: {"token"}. Drop that staged push (another replica refused it)."""
        served = self.served()
        if served.staged is not None and served.staged.token == request["token"]:
            served.staged = None
        return {"ok": True}

    def rollback(self, request: Any) -> dict[str, Any]:
        """request: {"token"}. Undo that push, the last one committed (another replica
        refused it)."""
        served = self.served()
        if not served.previous or served.previous_token != request["token"]:
            return {"ok": False, "problems": ["the push to undo is not the last one here"]}
        self.worker.load_weights(served.read(served.previous))
        served.sources.update(served.previous)
        served.previous, served.previous_token = {}, ""
        return {"ok": True}
