"""Training under torch.distributed: FSDP2 shards, the global batch split over ranks.

Every rank loads the model, shards each decoder layer and then the whole model with
`fully_shard` (parameters become DTensors, each rank holding a block of rows), and
trains its share of every step's batch. The batch of a step is the schedule's, the same
sequences as in one process, cut into contiguous parts, one per rank; each rank's loss
is its summed token loss over the step's token count across all ranks (times the number
of ranks, which FSDP's averaging reduce-scatter divides back out), so the gradients are
those of the one-process mean over the whole batch, up to the order of the sums.

AdamW works on DTensors as it is. APOLLO works on each rank's rows (`local_shard`): the
projection P (r x d) is drawn from the same seed on every rank. Where the rows are the
projected side (a wide matrix, d = rows), each rank multiplies its columns of P by its
rows of G and the r x n products are summed over the ranks: R = P G exactly, for r x n
numbers sent instead of the matrix. A tall matrix is projected across its columns, which
every rank holds whole, so each rank's R is its own block of channels and nothing is
sent; only the norms that span the matrix (the update's, for the limiter; the tensor's,
for APOLLO-Mini) are summed, a few scalars.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LocalShard:
    """The part of a parameter this rank holds and updates: `weights` and `grad` are
    its rows `rows` of the whole matrix (all of them when it is not sharded)."""

    weights: torch.Tensor
    grad: torch.Tensor | None
    rows: slice
    group: Any  # the process group the rows are spread over; None when not sharded

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed in place over the ranks sharing the parameter."""
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor


def local_shard(param: torch.Tensor) -> LocalShard:
    """A parameter's local rows. FSDP2 splits dim 0 as torch.chunk does: blocks of
    ceil(rows / ranks), the last ones shorter or empty."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return LocalShard(param, param.grad, slice(0, param.shape[0]), None)
    placement = param.placements[0]
    if len(param.placements) != 1 or not isinstance(placement, Shard) or placement.dim != 0:
        raise NotImplementedError(f"APOLLO on a parameter placed as {param.placements}")
    mesh = param.device_mesh
    local = param.to_local()
    block = math.ceil(param.shape[0] / mesh.size())
    start = min(mesh.get_local_rank() * block, param.shape[0])
    grad = param.grad.to_local() if param.grad is not None else None
    return LocalShard(local, grad, slice(start, start + local.shape[0]), mesh.get_group())


def shard_model(model: torch.nn.Module, layers: Sequence[torch.nn.Module], mesh: Any) -> None:
    """FSDP2 over `mesh`: each decoder layer its own unit (gathered only while it runs),
    the rest (embeddings, final norm, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def load_sharded(path: Path, dtype: str, device: str, mesh: Any) -> torch.nn.Module:
    """The model of the folder `path`, sharded over `mesh`: each process
    reads only its rows of each tensor from the files, so no process ever holds the whole
    model. A folder whose tensors are not the model's parameters by name and shape (a
    checkpoint transformers converts as it loads, like per-expert MoE weights) is loaded
    whole, then sharded."""
    from behaviorc.formats.safetensors_io import WeightFolder, to_float32
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.loading import load_empty_model, load_model, resolve_device

    model = load_empty_model(path, dtype)
    layers = ArchitectureAdapter.for_model(model).decoder_layers(model)
    with WeightFolder(path) as folder:
        stored = {name: tuple(info.shape) for name, info in folder.tensors.items()}
        if any(stored.get(name) != tuple(param.shape) for name, param in model.named_parameters()):
            model, _ = load_model(path, dtype, device)
            shard_model(model, ArchitectureAdapter.for_model(model).decoder_layers(model), mesh)
            return model
        shard_model(model, layers, mesh)
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        model.to_empty(device=resolve_device(device))
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
            for name, param in model.named_parameters():
                shard = local_shard(param)
                if shard.rows.stop > shard.rows.start:
                    rows = folder.read(name, (shard.rows.start, shard.rows.stop))
                    values = torch.from_numpy(to_float32(rows, folder.tensors[name].dtype))
                    shard.weights.copy_(values.reshape(shard.weights.shape))
    return model


class ShardedRun:
    """What the training loop asks of the ranks of one data-parallel training."""

    def __init__(self, model: torch.nn.Module, context: str, start_token: int, group: Any = None):
        self.model = model
        self.frozen = context == "frozen"
        self.start_token = start_token
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def local(self, batch: Sequence[Any]) -> list[Any]:
        """This rank's contiguous part of a step's batch."""
        if len(batch) < self.size:
            raise ValueError(f"a batch of {len(batch)} cannot be split over {self.size} processes")
        part = list(batch[self.rank * len(batch) // self.size:(self.rank + 1) * len(batch) // self.size])
        if self.frozen:
            self._match_context_forwards(part)
        return part

    def _match_context_forwards(self, part: Sequence[Any]) -> None:
        """Context-frozen training runs a forward over the contexts only when some
        sequence has more than one context token. A sharded forward gathers each layer
        with the other ranks, so a rank without one runs a token through the model
        while the others run theirs."""
        mine = torch.tensor([int(any(len(s.context) > 1 for s in part))])
        anyone = mine.clone()
        dist.all_reduce(anyone, op=dist.ReduceOp.MAX, group=self.group)
        if anyone.item() and not mine.item():
            device = next(self.model.parameters()).device
            with torch.no_grad():
                self.model(input_ids=torch.tensor([[self.start_token]], device=device))

    def mean(self, loss: torch.Tensor, count: int,
             extra: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """This rank's mean loss over its `count` tokens made its share of the mean over
        every rank's tokens, plus its part of a term summed over ranks (`extra`, already
        divided by its whole-batch normaliser): what to differentiate, and the whole
        batch's loss. FSDP2 averages gradients over ranks, hence the factors of size."""
        extra_value = float(extra.detach()) if extra is not None else 0.0
        totals = torch.tensor([float(loss.detach()) * count, float(count), extra_value], dtype=torch.float64)
        dist.all_reduce(totals, group=self.group)
        total, tokens, extra_total = totals.tolist()
        mine = loss * (count * self.size / tokens)
        if extra is not None:
            mine = mine + extra * self.size
        return mine, total / tokens + extra_total


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole copies of (possibly sharded) tensors; every rank must call it."""
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for name, t in tensors.items()}


def device_mesh() -> Any:
    """A one-dimensional mesh over every process of the default group, on this rank's
    accelerator when the group runs NCCL."""
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() != "gloo" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


class World:
    """The processes of a build started by `behaviorc build --nproc N` or by torchrun:
    rank 0 runs the build and tells the others, by broadcast, what to train with it;
    their gradients and shards travel through FSDP's collectives."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    @classmethod
    def join(cls) -> "World":
        """Join the process group this process was started into (torch.distributed's
        environment: RANK, WORLD_SIZE, MASTER_ADDR ...), in a process a launcher started.
        NCCL carries an accelerator's tensors, gloo the CPU's and the messages."""
        if not dist.is_initialized():
            # rank 0 may run other tasks for long while the others wait for a message
            timeout = timedelta(hours=24)
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
            else:
                dist.init_process_group("gloo", timeout=timeout)
        return cls()

    def send(self, message: dict[str, Any]) -> None:
        """Rank 0 to every rank: a JSON object."""
        data = torch.frombuffer(bytearray(json.dumps(message).encode()), dtype=torch.uint8)
        dist.broadcast(torch.tensor([data.numel()]), 0)
        dist.broadcast(data, 0)

    def receive(self) -> dict[str, Any]:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0)
        return json.loads(bytes(data.tolist()).decode())

    def agree(self, stop: bool) -> bool:
        """Whether rank 0 stops here; every rank must ask at the same point."""
        flag = torch.tensor([int(stop)])
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def current_world() -> World | None:
    """The world this process trains in, when it is one rank of several."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World()
    return None
