"""All-or-nothing weight pushes into live vLLM servers (one or several replicas).

A push never stops a server: vLLM's `reload_weights` replaces the weights in place
between two forward steps while requests keep flowing (HOGWILD). It reads a folder in
checkpoint format, so vLLM itself fuses q/k/v, gate/up, the GDN projections and the MoE
experts into its own layouts.

Order of a push:
1. ask every replica for its served manifest (checkpoint name -> shape, dtype, file);
2. check the new weights against every manifest (names, shapes, floating dtype, finite
   values) and refuse before anything is sent;
3. for a partial state dict, write a folder holding every decoder layer the change
   touches in full (the unchanged tensors of that layer read from the served files),
   because vLLM reloads a fused module from whatever parts it is given and leaves the
   rest undefined;
4. push to each replica in turn; a replica that fails restores its own previous weights,
   and the replicas already pushed roll back, so all serve the old weights again;
5. reset every replica's prefix cache (cached prefixes came from the old weights).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from behaviorc.diagnostics import BehaviorError, did_you_mean
from behaviorc.engine.vllm import PUSH_TIMEOUT_S, ServerClient

PUSH_MARKER = "behaviorc-push.json"  # marks folders that behaviorc wrote and may delete
_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+)\.")


@dataclass(frozen=True)
class PushReport:
    urls: tuple[str, ...]
    tensors: int  # tensors sent (whole layers for a partial push)
    seconds: float  # wall time from the first check to the last prefix-cache reset
    reload_seconds: tuple[float, ...]  # vLLM's in-place reload, per replica


def push_weights(urls: Sequence[str], source: Path | str | Mapping[str, Any],
                 api_key: str | None = None, timeout: float = PUSH_TIMEOUT_S) -> PushReport:
    """Replace the weights of every server in `urls` by `source`, or of none of them.

    `source` is a model folder (every served tensor, checkpoint names) or a mapping of
    checkpoint names to tensors (any subset). Raises BehaviorError saying what failed;
    the servers then serve the weights they had before.
    """
    if not urls:
        raise BehaviorError("a push needs at least one server URL")
    started = time.perf_counter()
    clients = [ServerClient(url, api_key, timeout) for url in urls]
    try:
        if isinstance(source, Mapping):
            complete = False
            manifests = [_manifest(client) for client in clients]
            _check_state_dict(source, clients, manifests)
            folder = _write_layers(source, manifests[0]["tensors"], _push_root(clients))
        else:
            complete = True
            folder = Path(source).expanduser().resolve()
            if not folder.is_dir():
                raise BehaviorError(f"cannot push `{source}`: not a model folder")
        if len(clients) > 1:  # every replica must accept before any is changed
            _check_on_servers(clients, folder, complete)
        answers = _push_all(clients, folder, complete)
        for client in clients:
            client.reset_prefix_cache()
        # Served now, or the state a rollback would return to.
        in_use = {f for answer in answers for f in answer["folders"] + answer["previous"]}
        _forget_unused_pushes(_push_root(clients), in_use)
    finally:
        for client in clients:
            client.close()
    return PushReport(tuple(c.url for c in clients), int(answers[0]["tensors"]),
                      time.perf_counter() - started,
                      tuple(float(answer["seconds"]) for answer in answers))


def _manifest(client: ServerClient) -> dict[str, Any]:
    manifest = client.rpc("behaviorc_manifest", doing="reading the served weights")
    if not isinstance(manifest, dict):
        raise BehaviorError(
            f"the vLLM server at {client.url} does not run behaviorc's worker extension",
            hint="start it with `behaviorc serve MODEL`")
    return manifest


def _check_state_dict(weights: Mapping[str, Any], clients: list[ServerClient],
                      manifests: list[dict[str, Any]]) -> None:
    import torch

    if not weights:
        raise BehaviorError("the push holds no tensors")
    problems: list[str] = []
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            problems.append(f"tensor `{name}` is {kind}, weights must be floating point")
            continue
        for client, manifest in zip(clients, manifests):
            served = manifest["tensors"]
            want = served.get(name)
            if want is None:
                hint = did_you_mean(name, served)
                problems.append(f"{client.url}: tensor `{name}` is not a weight of the "
                                f"served model" + (f" ({hint})" if hint else ""))
            elif list(tensor.shape) != want["shape"]:
                problems.append(f"{client.url}: tensor `{name}` has shape "
                                f"{list(tensor.shape)}, the served model has {want['shape']}")
        if not bool(torch.isfinite(tensor).all()):
            problems.append(f"tensor `{name}` holds NaN or infinite values")
    # The rest of each pushed layer is read from the first replica's files: the others
    # must serve the same checkpoint, or they would end up with a mix.
    for client, manifest in zip(clients[1:], manifests[1:]):
        if manifest["folders"] != manifests[0]["folders"]:
            problems.append(f"{client.url} serves other weights than {clients[0].url}; "
                            f"push a whole model folder to bring the replicas in line")
    if problems:
        raise _refused(problems)


def _check_on_servers(clients: list[ServerClient], folder: Path, complete: bool) -> None:
    problems: list[str] = []
    for client in clients:
        answer = client.rpc("behaviorc_check", {"folder": str(folder), "complete": complete},
                            doing="checking the pushed weights")
        problems += [f"{client.url}: {p}" for p in answer["problems"]]
    if problems:
        raise _refused(problems)


def _push_all(clients: list[ServerClient], folder: Path,
              complete: bool) -> list[dict[str, Any]]:
    payload = {"folder": str(folder), "complete": complete}
    answers: list[dict[str, Any]] = []
    for index, client in enumerate(clients):
        try:
            answer = client.rpc("behaviorc_push", payload, doing="pushing weights")
        except BehaviorError as err:
            _roll_back(clients[:index], str(err))
            raise
        if not answer["ok"]:
            _roll_back(clients[:index], "")
            raise _refused([f"{client.url}: {p}" for p in answer["problems"]])
        answers.append(answer)
    return answers


def _roll_back(pushed: list[ServerClient], cause: str) -> None:
    """Put the replicas already pushed back on their previous weights."""
    failed: list[str] = []
    for client in pushed:
        try:
            answer = client.rpc("behaviorc_rollback", doing="rolling back a push")
            if not answer["ok"]:
                failed += [f"{client.url}: {p}" for p in answer["problems"]]
        except BehaviorError as err:
            failed.append(str(err))
    if failed:
        raise BehaviorError(
            "a push failed and rolling back the replicas already pushed failed too; they "
            "may serve different weights: " + "; ".join(failed) + (f" (cause: {cause})"
                                                                  if cause else ""))


def _refused(problems: list[str]) -> BehaviorError:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return BehaviorError(f"weight push refused, the servers keep their weights:\n  "
                         f"{shown}{more}")


def layer_group(name: str) -> str:
    """The unit a push carries whole: a decoder layer, or the tensor itself outside them."""
    found = _LAYER_PREFIX.match(name)
    return found.group(1) if found else name


def _write_layers(weights: Mapping[str, Any], served: dict[str, Any], root: Path) -> Path:
    """A checkpoint folder with the changed tensors and the rest of their layers."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    groups = {layer_group(name) for name in weights}
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for name, entry in served.items():
        if layer_group(name) in groups and name not in weights:
            by_file.setdefault(entry["file"], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in names:
                tensors[name] = handle.get_tensor(name)
    checkpoint_dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                         "BF16": torch.bfloat16}
    for name, tensor in weights.items():
        dtype = checkpoint_dtypes.get(served[name]["dtype"], tensor.dtype)
        tensors[name] = tensor.detach().to("cpu", dtype).contiguous()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=root))
    save_file(tensors, str(staging / "model.safetensors"))
    (staging / PUSH_MARKER).write_text(json.dumps({"tensors": len(tensors)}) + "\n")
    folder = root / staging.name.removeprefix(".")
    staging.rename(folder)
    return folder


def _push_root(clients: list[ServerClient]) -> Path:
    """Push folders for one set of replicas live together, so cleaning up after a push
    never touches a folder another deploy still serves."""
    from behaviorc.model.builtin import cache_root
    urls = sorted(client.url for client in clients)
    replicas = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
    return cache_root() / "pushes" / replicas


def _forget_unused_pushes(root: Path, in_use: set[str]) -> None:
    """Delete push folders that no replica serves or could roll back to."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.name.startswith("push-") and str(folder) not in in_use \
                and (folder / PUSH_MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)
