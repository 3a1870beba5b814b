"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint folder holds
  weights.safetensors    the trained parameters, by model name
  optimizer.safetensors  every tensor of the optimizer's state, as `state.{index}.{key}`
  checkpoint.json        the optimizer's param groups (hyperparameters; parameter
                         indices), its non-tensor state values, and the loop's scalars
It is written into a temporary sibling and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Container, Iterable

import torch
from safetensors.torch import load_file, save_file

from behaviorc.core.atomic import atomic_folder

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
METADATA = "checkpoint.json"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict split into named tensors and JSON-able values."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                # a copy: state may be views into one storage (APOLLO's stacks), which
                # safetensors refuses to write
                tensors[f"state.{index}.{key}"] = value.detach().to(
                    "cpu", memory_format=torch.contiguous_format, copy=True)
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
    """Load what `optimizer_to_flat` produced into an optimizer over the same parameters."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(folder: Path, parameters: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scalars: dict[str, Any]) -> None:
    with atomic_folder(Path(folder), overwrite=True) as staging:
        save_file({n: p.detach().cpu().contiguous() for n, p in parameters.items()}, staging / WEIGHTS)
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, staging / OPTIMIZER)
        (staging / METADATA).write_text(json.dumps({**meta, "loop": scalars}, indent=1))


def read_weights(folder: Path, parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's whole trained tensors, checked to hold every one of `parameters`."""
    weights = load_file(Path(folder) / WEIGHTS)
    refuse_missing(folder, parameters, weights)
    return weights


def refuse_missing(folder: Path, parameters: Iterable[str], stored: Container[str]) -> None:
    """A checkpoint that lacks some of the trained parameters is not this training's."""
    missing = sorted(name for name in parameters if name not in stored)
    if missing:
        raise ValueError(f"checkpoint {folder} lacks parameters: {', '.join(missing[:5])}")


def load_checkpoint(folder: Path, parameters: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters (in place) and optimizer state; returns the loop's scalars."""
    folder = Path(folder)
    weights = read_weights(folder, parameters)
    with torch.no_grad():
        for name, param in parameters.items():
            param.copy_(weights[name])
    meta = json.loads((folder / METADATA).read_text())
    optimizer_from_flat(optimizer, load_file(folder / OPTIMIZER), meta)
    return meta["loop"]
