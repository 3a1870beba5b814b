"""Training checkpoints through torch.distributed.checkpoint, readable at any process count.

A distributed training writes its checkpoint with DCP's Hugging Face storage: each rank
writes the shards it holds into its own safetensors file, their offsets in the file's
metadata (no pickle). Reading assembles and re-cuts them for whatever reads: the shards
of another number of processes, or whole tensors in one process without a process group.
The folder holds
  shard-*.safetensors  the trained parameters (`param.NAME`) and every tensor of the
                       optimizer's state (`state.NAME.KEY`), by parameter name
  checkpoint.json      {"format": FORMAT, "loop": the loop's scalars}
The optimizer's hyperparameters come from the spec, as in a fresh run. The folder is
written beside and renamed into place by rank 0 once every rank has written, so a kill
leaves the previous checkpoint or the new one.

APOLLO's state is held per rank as plain tensors: the moments of a tall matrix are its
rows' block of channels (r x rows), saved as a DTensor sharded along the channels; those
of a wide matrix are whole on every rank (the projected gradient is summed), saved once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from behaviorc.train.apollo import APOLLO
from behaviorc.train.checkpoint import METADATA, refuse_missing

FORMAT = "torch.distributed.checkpoint"


def is_distributed_checkpoint(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / METADATA).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save_distributed_checkpoint(folder: Path, parameters: dict[str, torch.Tensor],
                                optimizer: torch.optim.Optimizer, scalars: dict[str, Any]) -> None:
    """Every rank calls it."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.staging")
    lead = dist.get_rank() == 0
    if lead:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state_dict(parameters, optimizer), storage_writer=dcp.HuggingFaceStorageWriter(
        str(staging), save_distributed=True))
    if lead:
        (staging / METADATA).write_text(json.dumps({"format": FORMAT, "loop": scalars}, indent=1))
        retired = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        if folder.exists():
            os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    dist.barrier()


def load_distributed_checkpoint(folder: Path, parameters: dict[str, torch.Tensor],
                                optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters (in place) and optimizer state from a checkpoint written at
    any number of processes; returns the loop's scalars. Every rank calls it."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    refuse_missing(folder, parameters, {key.removeprefix("param.") for key in saved if key.startswith("param.")})
    state_dict: dict[str, torch.Tensor] = {f"param.{name}": p.detach() for name, p in parameters.items()}
    wanted: dict[str, tuple[torch.Tensor, str]] = {}
    for name, param in parameters.items():
        prefix = f"state.{name}."
        for key, meta in saved.items():
            if key.startswith(prefix):
                field = key[len(prefix):]
                empty = torch.zeros(meta.size, dtype=meta.properties.dtype, device=param.device)
                state_dict[key] = _placed(optimizer, param, field, empty)
                wanted[key] = (param, field)
    dcp.load(state_dict, storage_reader=reader)
    for key, (param, field) in wanted.items():
        _set_state(optimizer, param, field, state_dict[key])
    return json.loads((Path(folder) / METADATA).read_text())["loop"]


def load_whole_checkpoint(folder: Path, parameters: dict[str, torch.Tensor],
                          optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A sharded training resumed from a checkpoint of one process (behaviorc.train.checkpoint):
    each rank takes its part of every whole tensor. Every rank calls it."""
    from safetensors.torch import load_file

    from behaviorc.train.checkpoint import OPTIMIZER, read_weights
    from behaviorc.train.distributed import local_shard

    folder = Path(folder)
    weights = read_weights(folder, parameters)
    with torch.no_grad():
        for name, param in parameters.items():
            shard = local_shard(param)
            shard.weights.copy_(weights[name][shard.rows])
    numbered = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in load_file(folder / OPTIMIZER).items():
        _, index, field = key.split(".", 2)
        param = numbered[int(index)]
        _set_state(optimizer, param, field, _placed(optimizer, param, field, value.to(param.device)))
    return json.loads((folder / METADATA).read_text())["loop"]


def _state_dict(parameters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    entries = {f"param.{name}": p.detach() for name, p in parameters.items()}
    for name, param in parameters.items():
        for field, value in optimizer.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}.{field} is not a tensor")
            if _channel_sharded(optimizer, param, field):
                value = _channel_dtensor(value, param)
            entries[f"state.{name}.{field}"] = value
    return entries


def _channel_sharded(optimizer: torch.optim.Optimizer, param: torch.Tensor, field: str) -> bool:
    """Whether this state tensor is APOLLO's moments of a tall sharded matrix: a block
    of its channels (columns) per rank."""
    if not (hasattr(param, "device_mesh") and isinstance(optimizer, APOLLO) and field in ("exp_avg", "exp_avg_sq")):
        return False
    rank = next(g["rank"] for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return APOLLO.is_projected(param, rank) and param.shape[0] > param.shape[1]


def _channel_dtensor(local: torch.Tensor, param: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    shape = (local.shape[0], param.shape[0])
    return DTensor.from_local(local, param.device_mesh, [Shard(1)], run_check=False,
                              shape=shape, stride=(shape[1], 1))


def _placed(optimizer: torch.optim.Optimizer, param: torch.Tensor, field: str, whole: torch.Tensor) -> torch.Tensor:
    """A whole state tensor (alike on every rank) placed as this process holds it: cut along APOLLO's channels,
    sharded as the parameter when it has the parameter's shape, else whole."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if _channel_sharded(optimizer, param, field):
        return distribute_tensor(whole, param.device_mesh, [Shard(1)], src_data_rank=None)
    if hasattr(param, "device_mesh") and tuple(whole.shape) == tuple(param.shape):
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    return whole


def _set_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, field: str, value: torch.Tensor) -> None:
    optimizer.state[param][field] = value.to_local() if _channel_sharded(optimizer, param, field) else value
