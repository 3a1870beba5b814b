"""All-or-nothing weight pushes into live vLLM servers (one or several replicas).

A push never stops a server: the worker extension (`behaviorc.engine.vllm.inside`) loads the
new weights in place between two forward steps while requests keep flowing (HOGWILD).
Weights travel in checkpoint format, so vLLM itself fuses q/k/v, gate/up, the GDN
projections and the MoE experts into its own layouts.

Order of a push:
1. a state dict is written as a safetensors file to a scratch folder in memory
   (/dev/shm where there is one), which the servers read by path: they must run on this
   machine (a remote replica would need the file sent to it first); a model folder is
   read where it is and must stay there while it is served;
2. every replica checks the weights against the checkpoint it serves (names, shapes,
   floating dtypes, finite values) and reads them, changing nothing yet; one replica
   does this and step 3 in a single call;
3. each replica loads them in turn; if one fails, it puts its previous values back and
   the replicas already changed roll back, so all serve the old weights again;
4. every replica's prefix cache is reset, preempting running requests so that no cached
   prefix computed with the old weights survives (they are recomputed, not failed).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.vllm.http import PUSH_TIMEOUT_S, ServerClient, default_timeout

SHARED_MEMORY = Path("/dev/shm")


@dataclass(frozen=True)
class PushReport:
    urls: tuple[str, ...]
    tensors: int  # tensors loaded: the decoder layers that changed, whole
    seconds: float  # wall time from the first call to the last prefix-cache reset
    reload_seconds: tuple[float, ...]  # vLLM loading the weights, per replica
    # Where the time went (s): write (the state dict's file), read (servers checking
    # and reading the weights, slowest replica), load (vLLM, slowest), calls (the push
    # calls end to end, server work included), reset (prefix caches).
    breakdown: dict[str, float] = field(default_factory=dict)


def push_weights(urls: Sequence[str], source: Path | str | Mapping[str, Any],
                 api_key: str | None = None, timeout: float | None = None) -> PushReport:
    """Replace the weights of every server in `urls` by `source`, or of none of them.

    `source` is a model folder (every served tensor, checkpoint names) or a mapping of
    checkpoint names to tensors (any subset). Raises BehaviorError saying what failed;
    the servers then serve the weights they had before.
    """
    if not urls:
        raise BehaviorError("a push needs at least one server URL")
    started = time.perf_counter()
    timeout = default_timeout(timeout, PUSH_TIMEOUT_S)
    clients = [ServerClient(url, api_key, timeout) for url in urls]
    try:
        with _as_folder(source) as (payload, write_seconds):
            calls_started = time.perf_counter()
            if len(clients) == 1:
                answers = [_answer(clients[0], "behaviorc_push", payload,
                                   doing="pushing weights")]
            else:
                _stage_all(clients, payload)
                answers = _commit_all(clients, {"token": payload["token"]})
            calls_seconds = time.perf_counter() - calls_started
        reset_started = time.perf_counter()
        for client in clients:
            client.reset_prefix_cache()
        reset_seconds = time.perf_counter() - reset_started
    finally:
        for client in clients:
            client.close()
    loads = tuple(float(answer["seconds"]["load"]) for answer in answers)
    breakdown = {"write": write_seconds,
                 "read": max(float(answer["seconds"]["read"]) for answer in answers),
                 "load": max(loads), "calls": calls_seconds, "reset": reset_seconds}
    return PushReport(tuple(c.url for c in clients), int(answers[0]["tensors"]),
                      time.perf_counter() - started, loads, breakdown)


def answering(urls: Sequence[str], api_key: str | None = None,
              timeout: float | None = None) -> None:
    """Check that every server answers within a short time, before a push that may
    rightly take minutes: a server that accepts connections and never answers is named
    in seconds, not after the push's timeout."""
    for url in urls:
        client = ServerClient(url, api_key, default_timeout(timeout))
        try:
            client.require_answer("a push")
        finally:
            client.close()


@contextmanager
def _as_folder(source: Path | str | Mapping[str, Any]) -> Iterator[tuple[dict, float]]:
    """The push request for `source`, and the seconds spent writing it to a file."""
    if not isinstance(source, Mapping):
        folder = Path(source).expanduser().resolve()
        if not folder.is_dir():
            raise BehaviorError(f"cannot push `{source}`: not a model folder")
        yield {"token": uuid.uuid4().hex, "path": str(folder), "complete": True,
               "transient": False}, 0.0
        return
    started = time.perf_counter()
    tensors = _checked_tensors(source)
    from safetensors.torch import save_file

    scratch = Path(tempfile.mkdtemp(prefix="behaviorc-push-", dir=_scratch_root()))
    try:
        save_file(tensors, str(scratch / "model.safetensors"))
        # The servers keep the values in memory: the file goes once they have read it.
        yield ({"token": uuid.uuid4().hex, "path": str(scratch), "complete": False,
                "transient": True}, time.perf_counter() - started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_root() -> str | None:
    """Memory-backed when the machine has it: the file only carries tensors across."""
    return str(SHARED_MEMORY) if SHARED_MEMORY.is_dir() else None


def _checked_tensors(weights: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors, contiguous on the CPU; names, shapes and values the servers check."""
    import torch

    if not weights:
        raise BehaviorError("the push holds no tensors")
    problems = []
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            problems.append(f"tensor `{name}` is {kind}, weights must be floating point")
    if problems:
        raise _refused(problems)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}


def _reply(client: ServerClient, method: str, *args: Any, doing: str) -> dict[str, Any]:
    """A worker's answer, as behaviorc's worker extension gives it."""
    answer = client.rpc(method, *args, doing=doing)
    if not isinstance(answer, dict):
        raise BehaviorError(
            f"the vLLM server at {client.url} does not run behaviorc's worker extension",
            hint="start it with `behaviorc serve MODEL`")
    return answer


def _answer(client: ServerClient, method: str, *args: Any, doing: str) -> dict[str, Any]:
    """A worker's answer; a refusal (`ok` false) becomes a BehaviorError."""
    answer = _reply(client, method, *args, doing=doing)
    if not answer.get("ok"):
        raise _refused([f"{client.url}: {p}" for p in answer.get("problems", [])])
    return answer


def _stage_all(clients: list[ServerClient], payload: dict) -> None:
    """Every replica checks and reads the weights before any is changed."""
    problems: list[str] = []
    for index, client in enumerate(clients):
        try:
            answer = _reply(client, "behaviorc_stage", payload, doing="checking the pushed weights")
        except BehaviorError:
            _discard(clients[:index], payload)
            raise
        problems += [f"{client.url}: {p}" for p in answer.get("problems", [])]
    if problems:
        _discard(clients, payload)
        raise _refused(problems)


def _discard(clients: list[ServerClient], push: dict) -> None:
    """Drop what replicas staged for a push that will not happen (best effort: a staged
    push changes nothing served, and the next push replaces it anyway)."""
    for client in clients:
        try:
            client.rpc("behaviorc_discard", {"token": push["token"]},
                       doing="dropping a refused push")
        except BehaviorError:
            pass


def _commit_all(clients: list[ServerClient], push: dict) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    for index, client in enumerate(clients):
        try:
            answers.append(_answer(client, "behaviorc_commit", push, doing="pushing weights"))
        except BehaviorError as err:
            _discard(clients[index + 1:], push)
            _roll_back(clients[:index], push, str(err))
            raise
    return answers


def _roll_back(pushed: list[ServerClient], push: dict, cause: str) -> None:
    """Put the replicas already pushed back on their previous weights."""
    failed: list[str] = []
    for client in pushed:
        try:
            answer = _reply(client, "behaviorc_rollback", push, doing="rolling back a push")
            if not answer.get("ok"):
                failed += [f"{client.url}: {p}" for p in answer.get("problems", [])]
        except BehaviorError as err:
            failed.append(str(err))
    if failed:
        raise BehaviorError(
            "a push failed and rolling back the replicas already pushed failed too; they "
            "may serve different weights: " + "; ".join(failed) + f" (cause: {cause})")


def _refused(problems: list[str]) -> BehaviorError:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return BehaviorError(f"weight push refused, the servers keep their weights:\n  "
                         f"{shown}{more}")
