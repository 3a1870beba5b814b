"""behaviorc's extension of the vLLM worker: the worker calls behaviorc serves.

vLLM mixes `BehaviorWorker` into its worker class when the server is started with
`--worker-extension-cls behaviorc.engine.vllm.inside.extension.BehaviorWorker`, and
`POST /collective_rpc {"method": ..., "args": [...]}` calls its methods inside every
worker process. The HTTP route passes only strings, so every method takes JSON text and
answers with plain JSON-able values. Each method decodes its argument and hands it to
the worker's `WorkerState` (`worker_state`), which holds all that behaviorc keeps there.
"""

from __future__ import annotations

import json
from typing import Any

from behaviorc.engine.vllm.inside.vllm_internals import VllmWorker
from behaviorc.engine.vllm.inside.worker_state import WorkerState


class BehaviorWorker:
    """Methods vLLM adds to its worker; reached through `POST /collective_rpc`. Only the
    `behaviorc_*` ones may be called (see `middleware.WorkerCalls`)."""

    def _behaviorc_state(self) -> WorkerState:
        # vLLM never calls an extension's __init__: the state is made on the first call
        state = getattr(self, "_behaviorc", None)
        if state is None:
            state = self._behaviorc = WorkerState(VllmWorker(self))
        return state

    def behaviorc_info(self) -> dict[str, Any]:
        return self._behaviorc_state().info()

    def behaviorc_set_steering(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().set_steering(json.loads(payload))

    def behaviorc_clear_steering(self) -> dict[str, Any]:
        return self._behaviorc_state().clear_steering()

    def behaviorc_steer_register(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().register_vector(json.loads(payload))

    def behaviorc_steer_unregister(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().unregister_vector(json.loads(payload))

    def behaviorc_steer_names(self) -> dict[str, Any]:
        return self._behaviorc_state().vector_names()

    def behaviorc_steer_served(self) -> dict[str, Any]:
        state = self._behaviorc_state()
        return {"vectors": state.vector_names(), "server_wide": state.server_wide()}

    def behaviorc_steer_stats(self) -> dict[str, int]:
        return self._behaviorc_state().steering_counts()

    def behaviorc_stage(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().stage(json.loads(payload))

    def behaviorc_commit(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().commit(json.loads(payload))

    def behaviorc_push(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().push(json.loads(payload))

    def behaviorc_discard(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().discard(json.loads(payload))

    def behaviorc_rollback(self, payload: str) -> dict[str, Any]:
        return self._behaviorc_state().rollback(json.loads(payload))
