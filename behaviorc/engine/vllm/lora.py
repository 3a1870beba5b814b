"""LoRA adapters on a live vLLM server (`behaviorc serve --lora`), through vLLM's own
routes: `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, `/v1/models`.

A request picks an adapter by naming it as its `model`; requests naming the served model
get no adapter. Loading and unloading happen while the server serves, with no pause.
An adapter is checked here before vLLM sees it (safetensors only, a plain PEFT LoRA,
every factor shaped for a linear layer of the served model, made for that base): vLLM
would unpickle a `.bin`, and an adapter it fails on part-way is not ours to clean up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.vllm.http import ServerClient
from behaviorc.formats.peft_lora import CheckedAdapter, check_adapter

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@dataclass(frozen=True)
class Served:
    model: str  # the served model's id (what requests without an adapter name)
    root: str  # its folder, as the server sees it
    adapters: dict[str, str]  # adapter name -> folder


def served(client: ServerClient) -> Served:
    """The served model and the adapters loaded now."""
    answer = client.request("GET", "/v1/models", "listing its models and adapters")
    entries = (answer or {}).get("data") or []
    bases = [e for e in entries if not e.get("parent")]
    # `behaviorc serve` gives the model two names (its short name and its folder): one
    # model, listed once per name
    if len({e.get("root") or e["id"] for e in bases}) != 1:
        raise BehaviorError(f"the vLLM server at {client.url} lists {len(bases)} base models "
                            f"in /v1/models; expected one")
    return Served(model=bases[0]["id"], root=bases[0].get("root") or bases[0]["id"],
                  adapters={e["id"]: e.get("root", "") for e in entries if e.get("parent")})


def push_adapter(client: ServerClient, adapter: Path, name: str,
                 base: Path | None = None, replace: bool = False) -> CheckedAdapter:
    """Check `adapter` against the served model (or `base`, when the server's folder is
    not readable here) and load it under `name`; `replace`: an adapter of that name goes
    first (a deploy's newer build of it), once the new one has passed its checks."""
    if not _NAME.match(name):
        raise BehaviorError(f"adapter name `{name}` is not usable as a request's model name",
                            hint="letters, digits and _ . : - (at most 64), starting with a "
                                 "letter or digit")
    now = served(client)
    if name == now.model:
        raise BehaviorError(f"`{name}` is the served model's own name; requests naming it "
                            f"get no adapter", hint="choose another name")
    if name in now.adapters and not replace:
        raise BehaviorError(f"an adapter named `{name}` is already loaded on {client.url} "
                            f"(from {now.adapters[name]})",
                            hint=f"`behaviorc lora remove {client.url} {name}` first")
    base_dir = base or Path(now.root)
    if not (base_dir / "config.json").is_file():
        raise BehaviorError(f"the served model's folder {now.root} is not readable here, so "
                            f"the adapter cannot be checked against it",
                            hint="give the base model folder with --base")
    checked = check_adapter(adapter, base_dir)
    if name in now.adapters:
        _unload(client, name)
    client.request("POST", "/v1/load_lora_adapter", f"loading LoRA adapter `{name}`",
                   {"lora_name": name, "lora_path": str(Path(adapter).resolve())})
    return checked


def remove_adapter(client: ServerClient, name: str) -> None:
    if name not in served(client).adapters:
        raise BehaviorError(f"no adapter named `{name}` is loaded on {client.url}",
                            hint=f"`behaviorc lora list {client.url}` lists them")
    _unload(client, name)


def _unload(client: ServerClient, name: str) -> None:
    client.request("POST", "/v1/unload_lora_adapter", f"unloading LoRA adapter `{name}`",
                   {"lora_name": name})
