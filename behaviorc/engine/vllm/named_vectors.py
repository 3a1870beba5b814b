"""The client side of a server's registry of named steering vectors (see
`behaviorc.engine.vllm.inside.steering`): register, list and remove vectors that requests then
choose with `"vllm_xargs": {"steer": "name:strength,..."}`.

Every change is checked by the server before anything changes (layers in range, one value
per hidden unit, finite values); a refusal is a BehaviorError naming the server and each
problem.
"""

from __future__ import annotations

from typing import Any, Mapping

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.vocabulary import SteerPositions
from behaviorc.engine.vllm.http import ServerClient


def register_vectors(client: ServerClient, name: str, directions: Mapping[int, Any],
                     positions: SteerPositions = "all") -> dict:
    """Register (or replace) `name` -> {layer: vector}, steering `positions` of the
    requests that name it; the server's answer (layers, digest)."""
    payload = {"name": name, "positions": positions,
               "vectors": {str(int(layer)): _floats(vector) for layer, vector in directions.items()}}
    answer = _worker(client, "behaviorc_steer_register", payload,
                     f"registering steering vector `{name}`")
    if not answer.get("ok"):
        raise BehaviorError(f"the vLLM server at {client.url} refused steering vector "
                            f"`{name}`, nothing changed:\n  "
                            + "\n  ".join(answer.get("problems") or ["(no reason given)"]))
    return answer


def registered_vectors(client: ServerClient) -> dict[str, dict]:
    """{name: {"layers", "digest", "norms", "positions"}} for every vector the server holds."""
    return _worker(client, "behaviorc_steer_names", None, "listing steering vectors")


def unregister_vector(client: ServerClient, name: str) -> None:
    answer = _worker(client, "behaviorc_steer_unregister", {"name": name},
                     f"removing steering vector `{name}`")
    if not answer.get("ok"):
        raise BehaviorError(f"the vLLM server at {client.url} could not remove `{name}`: "
                            + "; ".join(answer.get("problems") or ["(no reason given)"]))


def _worker(client: ServerClient, method: str, payload: Any, doing: str) -> Any:
    answer = client.rpc(method, *([payload] if payload is not None else []), doing=doing)
    if not isinstance(answer, dict):
        raise BehaviorError(
            f"the vLLM server at {client.url} does not keep named steering vectors "
            f"(it answered {answer!r} while {doing})",
            hint="start it with `behaviorc serve MODEL` (behaviorc's worker extension)")
    return answer


def _floats(vector: Any) -> list[float]:
    if hasattr(vector, "detach"):
        vector = vector.detach().float().cpu().reshape(-1).tolist()
    return [float(x) for x in vector]
