"""A build's training on several processes (`behaviorc build --nproc N`, or torchrun).

Every process runs the same `behaviorc build` command. Rank 0 runs the build as one
process would: every task, artifact, event and the report. When it reaches a training
task it has made the training's data (the spec's examples, distilled samples, the general
mix, as token ids; the teacher's distributions over them, read with its whole model) and sends the other ranks the task's id, its model folder, its
checkpoint folder and that data (`lead_training`); they find the task in their own
reading of the spec, which must be the same (the task's key is checked), load the model
and train with it (`follow`). With every step's event (the loop sends them at its log
points, the same steps on every rank) rank 0 says whether the training goes on, so a
build stopped on rank 0 (Ctrl-C, the dashboard, a failed hand-off) stops every rank at
the same step; at the end of the build it sends `done` and the others exit.

A rank that fails mid-training cannot tell the others where it stopped: it exits, and
the launcher stops the rest (torch.distributed.elastic). Checkpoints are written whole or
not at all, so nothing is half-written and the next build resumes from the last one.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.train.activations import Matching
from behaviorc.train.data import BatchSchedule, TrainSequence
from behaviorc.train.distributed import ShardedRun, World, device_mesh, full_tensors, load_sharded
from behaviorc.train.loop import CHECKPOINT_EVERY, StepEvent, TrainSummary, train
from behaviorc.train.teacher import Distribution


LOST_PEER_GRACE_S = 2.0
LOST_PEER_EXIT = 3  # rank 0's exit code when another process vanished mid-training


class _Stopped(Exception):
    """Rank 0 stopped the training at this step."""


def shard_training(decl: ir.ModelDecl, train_spec: ir.Train, path: Path, schedule: BatchSchedule,
                   matching: Matching | None, teacher: Mapping[TrainSequence, Distribution] | None,
                   checkpoint: Path, on_step: Callable[[StepEvent], None]) -> tuple[TrainSummary, dict[str, Any]]:
    """One rank's part of a training, from the model in `path`; `teacher`: the teacher's
    distributions rank 0 read with its whole model (`objective kl`, `anchor kl`)."""
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.chat import set_thinking
    from behaviorc.model.loading import load_tokenizer
    from behaviorc.train.data import start_token

    model, tokenizer = load_sharded(path, decl.dtype, decl.device, device_mesh()), load_tokenizer(path)
    set_thinking(tokenizer, decl.thinking)
    adapter = ArchitectureAdapter.for_model(model)
    # every rank runs the same target forwards, gathering the layers together
    matched = (matching.start(model, adapter.decoder_layers(model), tokenizer.pad_token_id, train_spec.context)
               if matching is not None else nullcontext())
    device = next(model.parameters()).device
    taught = {sequence: replace(d, tokens=d.tokens.to(device), logprobs=d.logprobs.to(device), rest=d.rest.to(device))
              for sequence, d in (teacher or {}).items()}
    with matched as extra:  # None without matching
        return train_sharded(model, adapter, schedule, train_spec,
                             pad_id=tokenizer.pad_token_id, start_token=start_token(tokenizer),
                             on_step=on_step, checkpoint_dir=checkpoint,
                             checkpoint_every=CHECKPOINT_EVERY, extra_loss=extra, teacher=taught)


def train_sharded(model: torch.nn.Module, adapter: Any, schedule: Any, spec: Any, *, pad_id: int,
                  start_token: int, **options: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Train a model sharded over every process (`load_sharded`) as `train` does (`options`
    are train's); returns the summary and the trained targets whole, on every rank."""
    targets = adapter.parameters(model, spec.targets)
    summary = train(model, targets, schedule, spec, pad_id=pad_id,
                    sharded=ShardedRun(model, spec.context, start_token), **options)
    return summary, full_tensors(targets)


def lead_training(world: World, task_id: str, task_key: str, decl: ir.ModelDecl,
                  train_spec: ir.Train, path: Path, schedule: BatchSchedule, checkpoint: Path,
                  on_step: Callable[[StepEvent], None], targets: dict[str, Any],
                  matching: Matching | None, teacher: Mapping[TrainSequence, Distribution] | None) -> TrainSummary:
    """Rank 0: train task `task_id` on every rank and copy the result into `targets`."""
    world.send({"train": task_id, "key": task_key, "path": str(path), "checkpoint": str(checkpoint),
                **_schedule_message(schedule), "matching": _matching_message(matching),
                "teacher": _teacher_message(teacher)})

    def step_then_agree(event: StepEvent) -> None:
        try:
            on_step(event)
        except BaseException:
            world.agree(stop=True)
            raise _Stopped from None
        world.agree(stop=False)

    try:
        summary, weights = shard_training(decl, train_spec, path, schedule, matching, teacher, checkpoint,
                                          step_then_agree)
    except _Stopped as stop:  # raise what stopped it, now that every rank knows
        raise stop.__context__ from None
    except BaseException as err:
        # The other ranks wait in a collective this rank will never join: end the
        # whole world (the launcher stops them) rather than hang.
        if _lost_peer(err):
            print(f"behaviorc: rank 0 lost another process while training {task_id}", file=sys.stderr)
            sys.stderr.flush()
            # The launcher names the first process it sees end (it looks every 0.1 s);
            # the one that died is the cause, so let it be seen first.
            time.sleep(LOST_PEER_GRACE_S)
            os._exit(LOST_PEER_EXIT)
        traceback.print_exc()
        print(f"behaviorc: rank 0 failed while training {task_id}; stopping every process", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(weights[name])
    return summary


def _lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another process is gone (gloo and NCCL say
    so in a RuntimeError), not because of this one."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        "Connection reset by peer" in text or "Connection closed by peer" in text or "NCCL" in text))


def follow(world: World, tasks: Callable[[], dict[str, Any]]) -> int:
    """A rank above 0: train what rank 0 asks for until it says `done`. `tasks`: the
    training tasks (TrainBehavior) of this rank's plan, by id (read once asked for)."""

    def agree(event: StepEvent) -> None:
        if world.agree(stop=False):
            raise _Stopped

    while True:
        message = world.receive()
        if "done" in message:
            return 0
        task = tasks().get(message["train"])
        if task is None or task.key != message["key"]:
            raise BehaviorError(f"rank {world.rank} reads another spec than rank 0: its task "
                                f"{message['train']} differs or is missing",
                                hint="every node of a distributed build must see the same spec and data")
        try:
            shard_training(task.model.decl, task.train, Path(message["path"]), _message_schedule(message),
                           _message_matching(message["matching"]), _message_teacher(message["teacher"]),
                           Path(message["checkpoint"]), agree)
        except _Stopped:
            continue


def _schedule_message(schedule: BatchSchedule) -> dict[str, Any]:
    return {"behavior": _token_ids(schedule.behavior), "general": _token_ids(schedule.general),
            "batch": schedule.batch, "ratio": schedule.ratio, "seed": schedule.seed}


def _message_schedule(message: dict[str, Any]) -> BatchSchedule:
    return BatchSchedule(_sequences(message["behavior"]), _sequences(message["general"]), message["batch"],
                         message["ratio"], message["seed"])


def _matching_message(matching: Matching | None) -> dict[str, Any] | None:
    if matching is None:
        return None
    # float32 values survive JSON exactly (as float64 numbers)
    return {"weight": matching.weight, "strength": matching.strength, "positions": matching.positions,
            "directions": {str(layer): vector.float().tolist() for layer, vector in matching.directions.items()},
            "sequences": _token_ids(matching.sequences)}


def _message_matching(message: dict[str, Any] | None) -> Matching | None:
    if message is None:
        return None
    directions = {int(layer): torch.tensor(vector, dtype=torch.float32)
                  for layer, vector in message["directions"].items()}
    return Matching(message["weight"], message["strength"], directions, tuple(_sequences(message["sequences"])),
                    message["positions"])


def _teacher_message(teacher: Mapping[TrainSequence, Distribution] | None) -> list[dict[str, Any]] | None:
    if not teacher:
        return None
    # float32 log-probs survive JSON exactly; a lumped rest of -inf travels as -Infinity
    return [{"sequence": [list(s.context), list(s.response)], "tokens": d.tokens.tolist(),
             "logprobs": d.logprobs.float().tolist(), "rest": d.rest.float().tolist(), "weight": d.weight,
             "temperature": d.temperature} for s, d in teacher.items()]


def _message_teacher(message: list[dict[str, Any]] | None) -> dict[TrainSequence, Distribution] | None:
    if message is None:
        return None
    return {TrainSequence(tuple(m["sequence"][0]), tuple(m["sequence"][1])): Distribution(
        torch.tensor(m["tokens"], dtype=torch.long), torch.tensor(m["logprobs"], dtype=torch.float32),
        torch.tensor(m["rest"], dtype=torch.float32), m["weight"], m["temperature"]) for m in message}


def _token_ids(sequences: Sequence[TrainSequence]) -> list[list[list[int]]]:
    return [[list(s.context), list(s.response)] for s in sequences]


def _sequences(rows: list[list[list[int]]]) -> list[TrainSequence]:
    return [TrainSequence(tuple(context), tuple(response)) for context, response in rows]


def release(world: World, code: int | None) -> None:
    """At the end of this process's part of the build, however it ended: rank 0 tells the
    others to exit, and every rank leaves the process group. A part that succeeded (exit
    `code` 0) then ends the process without the interpreter's teardown: torch's
    distributed C++ threads can still be joinable when its static objects are destroyed,
    which aborts a process whose work is done (SIGABRT, "terminate called without an
    active exception", about once in 30 two-process runs that checkpoint), and the
    launcher would report a finished build as a crash. Any other ending keeps the
    interpreter's, whose exit status the launcher reads (rank 0's code travels as its
    return value, not its status)."""
    try:
        if world.rank == 0:
            world.send({"done": True})
    finally:
        world.close()
    if code == 0:
        atexit.register(exit_now, 0)  # the last registered runs first


def exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
