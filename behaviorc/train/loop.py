"""The training loop, top to bottom.

1. Targets: only the parameters of the spec's groups train; everything else has
   `requires_grad = False`, so it gets no gradient and no optimizer state.
2. The optimizer: APOLLO, APOLLO-Mini or AdamW, over the targets in name order.
3. Each step: the batch for that step (a pure function of seed and step), the response
   loss (context frozen or full), gradient norm and clipping, a NaN/inf guard that skips
   the step and counts it, the learning rate of the schedule, the optimizer step. The
   guard's finiteness check is the step's one wait on the device; its loss, gradient norm
   and limiter count stay there.
4. Every `log_every` steps (`log_interval`), each checkpoint's and the last: the figures of the steps
   since the last log point, read from the device in one transfer, and an event for
   each of those steps (as nanoGPT and torchtune read their loss only to log).
5. Checkpoints every `checkpoint_every` steps; a loop started over an existing
   checkpoint resumes from it and ends with the same weights as one never interrupted,
   also from one a distributed training wrote (behaviorc.train.dcp).

Learning rate: linear warmup over `warmup` steps, then constant or a cosine decay to
10% of the peak at the last step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from behaviorc.core import ir
from behaviorc.train.apollo import APOLLO
from behaviorc.train.checkpoint import METADATA, load_checkpoint, save_checkpoint
from behaviorc.train.data import BatchSchedule, TrainSequence
from behaviorc.train.dcp import (is_distributed_checkpoint, load_distributed_checkpoint, load_whole_checkpoint,
                                 save_distributed_checkpoint)
from behaviorc.train.distributed import ShardedRun
from behaviorc.train.frozen import (FrozenContexts, collate, freeze_batch, length_mask, mask_if_padded,
                                     padded_ids, segment_labels, segment_logits, token_loss_sum, upload_longs)
from behaviorc.train.teacher import Distribution, kl_loss_sum

COSINE_FLOOR = 0.1  # the cosine schedule ends at this fraction of the peak learning rate
CHECKPOINT_EVERY = 50  # steps between a build's training checkpoints, on one process or several
LOG_EVERY = 10  # steps between reads of the loop's figures from an accelerator (and its events)


def log_interval(device: torch.device) -> int:
    """Steps between log points: LOG_EVERY on an accelerator, which runs ahead of the
    host until a read; every step on a CPU, where the figures are on the host already,
    so progress and a Stop are heard at each step (a step of a real model there takes
    seconds)."""
    return 1 if device.type == "cpu" else LOG_EVERY


@dataclass(frozen=True)
class StepEvent:
    step: int  # 1-based: the number of steps done
    loss: float
    grad_norm: float
    lr: float
    limiter: int  # limiter activations during this step
    tokens_per_s: float
    skipped: bool  # the NaN/inf guard dropped this step


@dataclass
class TrainSummary:
    losses: list[float] = field(default_factory=list)  # of every step, those before a resume included
    loss_first: float | None = None  # of step 1, also when this call resumed later
    steps_skipped: int = 0
    limiter_activations: int = 0
    resumed_from: int = 0

    def metrics(self) -> dict[str, float]:
        """What a build reports of the run (NaN for a loss no step of it recorded)."""
        return {"loss_first": self.loss_first if self.loss_first is not None else float("nan"),
                "loss_last": self.losses[-1] if self.losses else float("nan"),
                "steps_skipped": float(self.steps_skipped),
                "limiter_activations": float(self.limiter_activations)}


def make_optimizer(spec: ir.Optimizer, params: Sequence[torch.nn.Parameter], lr: float,
                   seed: int) -> torch.optim.Optimizer:
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=spec.betas, weight_decay=spec.weight_decay,
                                 foreach=True)
    options = dict(lr=lr, betas=spec.betas, weight_decay=spec.weight_decay, refresh=spec.refresh,
                   limiter=spec.limiter, scale=spec.scale, seed=seed)
    if spec.name == "apollo_mini":
        return APOLLO.mini(params, **options)
    return APOLLO(params, rank=spec.rank, **options)


def learning_rate(step: int, train: ir.Train) -> float:
    """The learning rate for 0-based `step`."""
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    if train.schedule == "constant":
        return train.lr
    span = max(train.steps - train.warmup - 1, 1)
    progress = min((step - train.warmup) / span, 1.0)
    return train.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


class ResponseLoss:
    """Mean loss over the response tokens of a batch, with the context frozen or not:
    next-token cross-entropy, or for a sequence that has a teacher's distribution
    (`teacher`, behaviorc.train.teacher) the weighted KL to it at each response token.
    With `reuse_contexts`, each sequence's frozen context is computed once and kept
    (keyed by the sequence, as a row of one batch on the device, its keys padded to the
    longest context kept): later steps skip the context forward, at the price of states
    from the weights as they were when first seen."""

    def __init__(self, model: torch.nn.Module, mode: str, pad_id: int, reuse_contexts: bool = False,
                 teacher: Mapping[TrainSequence, Distribution] | None = None):
        self.model, self.mode, self.pad_id = model, mode, pad_id
        self.reuse_contexts = reuse_contexts
        self.teacher = teacher or {}
        self._kept: FrozenContexts | None = None
        self._kept_rows: dict[TrainSequence, int] = {}

    def __call__(self, batch: Sequence[TrainSequence]) -> tuple[torch.Tensor, int]:
        if self.mode == "frozen":
            inputs = collate(self.model, self._contexts(batch), [s.context[-1:] + s.response for s in batch],
                             self.pad_id)
            logits = segment_logits(self.model, inputs)
            labels = segment_labels(inputs)
            firsts = [0] * len(batch)  # the segment's first position predicts the response's first token
        else:
            logits, labels = self._full(batch)
            firsts = [len(s.context) - 1 for s in batch]
        taught = [(row, firsts[row], self.teacher[s]) for row, s in enumerate(batch) if s in self.teacher]
        if taught:  # their tokens are the teacher's business, not the cross-entropy's
            labels = labels.index_fill(0, upload_longs([row for row, _, _ in taught], labels.device), -100)
        total = token_loss_sum(logits, labels)
        if taught:
            total = total + kl_loss_sum(logits, taught)
        count = sum(len(s.response) for s in batch)
        return total / count, count

    def _contexts(self, batch: Sequence[TrainSequence]) -> FrozenContexts:
        if not self.reuse_contexts:
            return freeze_batch(self.model, [s.context[:-1] for s in batch])
        missing = list(dict.fromkeys(s for s in batch if s not in self._kept_rows))
        if missing:
            fresh = freeze_batch(self.model, [s.context[:-1] for s in missing])
            self._kept = fresh if self._kept is None else self._kept.extended(fresh)
            for sequence in missing:
                self._kept_rows[sequence] = len(self._kept_rows)
        return self._kept.gather([self._kept_rows[s] for s in batch])

    def _full(self, batch: Sequence[TrainSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the whole sequences and the labels their positions predict (a label
        on each response token: past the context, within the sequence; -100 elsewhere)."""
        device = next(self.model.parameters()).device
        ids = padded_ids([s.context + s.response for s in batch], self.pad_id, device)
        lengths = upload_longs([s.tokens for s in batch] + [len(s.context) for s in batch], device)
        mask = length_mask(lengths[:len(batch)], ids.shape[1])
        past_context = ~length_mask(lengths[len(batch):], ids.shape[1]).bool()
        labels = ids.masked_fill(~(mask.bool() & past_context), -100)
        logits = self.model(input_ids=ids, attention_mask=mask_if_padded(mask, [s.tokens for s in batch])).logits
        return logits, labels[:, 1:]


def train(
    model: torch.nn.Module,
    targets: dict[str, torch.nn.Parameter],
    schedule: BatchSchedule,
    spec: ir.Train,
    *,
    pad_id: int,
    on_step: Callable[[StepEvent], None] = lambda event: None,
    log_every: int | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    reuse_contexts: bool = False,
    extra_loss: Callable[[Sequence[TrainSequence], Sequence[TrainSequence]], torch.Tensor] | None = None,
    sharded: ShardedRun | None = None,
    teacher: Mapping[TrainSequence, Distribution] | None = None,
) -> TrainSummary:
    """Train `targets` of `model` in place for `spec.steps` steps. `on_step` hears of
    every step, in order, at the log point that read its figures: while the weights are
    those of that log point's step. `extra_loss`, when given, is added to each step's
    response loss; it is called with this process's batch and the step's whole batch
    right after the forward of that loss, so hooks it holds on the model have seen the
    batch. With `sharded`, this process is one rank of a data-parallel training
    (behaviorc.train.distributed); every rank logs at the same steps. Sequences in
    `teacher` learn its distribution instead of their tokens (`ResponseLoss`)."""
    for param in model.parameters():
        param.requires_grad_(False)
    params = [targets[name] for name in sorted(targets)]
    for param in params:
        param.requires_grad_(True)
    log_every = log_every or log_interval(params[0].device)
    optimizer = make_optimizer(spec.optimizer, params, spec.lr, spec.seed)
    response_loss = ResponseLoss(model, spec.context, pad_id, reuse_contexts, teacher)
    summary = TrainSummary()

    start = 0
    if checkpoint_dir is not None and (checkpoint_dir / METADATA).is_file():
        load = (load_distributed_checkpoint if is_distributed_checkpoint(checkpoint_dir)
                else load_checkpoint if sharded is None else load_whole_checkpoint)
        scalars = load(checkpoint_dir, targets, optimizer)
        start = summary.resumed_from = int(scalars["step"])
        summary.steps_skipped = int(scalars["steps_skipped"])
        summary.loss_first = scalars["loss_first"]
        summary.losses = [float(v) for v in scalars.get("losses", ())]
        summary.limiter_activations = int(scalars.get("limiter_activations", 0))
    log = _StepLog(summary, on_step)

    for step in range(start, spec.steps):
        began = time.perf_counter()
        whole = schedule.at(step)  # every rank's sequences: the step's tokens/s are theirs
        batch = whole if sharded is None else sharded.local(whole)
        loss, count = response_loss(batch)
        extra = extra_loss(batch, whole) if extra_loss is not None else None
        if sharded is not None:  # this rank's share of the whole batch's loss
            loss, whole_loss = sharded.mean(loss, count, extra)
            step_loss = torch.tensor(whole_loss, dtype=torch.float64)
        else:
            if extra is not None:
                loss = loss + extra
            step_loss = loss.detach()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.clip if spec.clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # sharded gradients: a DTensor of partial sums
            grad_norm = grad_norm.full_tensor()
        lr = learning_rate(step, spec)
        skipped = not _finite(step_loss, grad_norm)
        if skipped:
            summary.steps_skipped += 1
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        log.add(_Unread(done, step_loss, grad_norm.detach(), _limiter_total(optimizer).clone(), lr, skipped,
                        sum(s.tokens for s in whole), time.perf_counter() - began))

        # The last step checkpoints too: the caller measures and saves for minutes after
        # it, and a kill then must not cost the training (the store drops the checkpoint
        # with the task's stored result).
        checkpointing = (checkpoint_dir is not None and checkpoint_every > 0
                         and (done % checkpoint_every == 0 or done == spec.steps))
        if checkpointing or done % log_every == 0 or done == spec.steps:
            log.flush()  # a checkpoint's loop scalars cover the steps it holds
        if checkpointing:
            save = save_checkpoint if sharded is None else save_distributed_checkpoint
            save(checkpoint_dir, targets, optimizer,
                 {"step": done, "steps_skipped": summary.steps_skipped, "loss_first": summary.loss_first,
                  "losses": summary.losses, "limiter_activations": summary.limiter_activations})
    for param in params:
        param.requires_grad_(False)
    return summary


@dataclass(frozen=True)
class _Unread:
    """A step done, its device figures not read yet."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    limited_total: torch.Tensor  # the optimizer's limiter count after this step
    lr: float
    skipped: bool
    tokens: int
    seconds: float


class _StepLog:
    """The steps since the last log point; `flush` reads their figures in one transfer,
    adds them to the summary and tells `on_step` of each."""

    def __init__(self, summary: TrainSummary, on_step: Callable[[StepEvent], None]):
        self.summary, self.on_step = summary, on_step
        self.unread: list[_Unread] = []
        # The optimizer's limiter count restarts with it, so a resumed loop adds to the
        # activations its checkpoint recorded.
        self.limited_before_start = summary.limiter_activations
        self.limited_total = 0.0

    def add(self, step: _Unread) -> None:
        self.unread.append(step)

    def flush(self) -> None:
        steps, self.unread = self.unread, []
        count = len(steps)
        values = _read(*(s.loss for s in steps), *(s.grad_norm for s in steps), *(s.limited_total for s in steps))
        losses, grad_norms, limited_totals = values[:count], values[count:2 * count], values[2 * count:]
        events = []
        for step, loss, grad_norm, limited_total in zip(steps, losses, grad_norms, limited_totals):
            events.append(StepEvent(step.step, loss, grad_norm, step.lr, int(limited_total - self.limited_total),
                                    step.tokens / max(step.seconds, 1e-9), step.skipped))
            self.limited_total = limited_total
        summary = self.summary
        summary.losses += losses
        summary.loss_first = summary.losses[0] if summary.loss_first is None else summary.loss_first
        summary.limiter_activations = self.limited_before_start + int(self.limited_total)
        for event in events:
            self.on_step(event)


def _finite(*values: torch.Tensor) -> bool:
    """Whether every scalar is finite: the NaN/inf guard's one read of the device."""
    device = values[-1].device
    return bool(torch.isfinite(torch.stack([v.detach().to(device, torch.float64) for v in values])).all())


def _limiter_total(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    if isinstance(optimizer, APOLLO):
        return optimizer.limiter_activations_since_start()
    return torch.zeros((), dtype=torch.int64)


def _read(*values: torch.Tensor) -> list[float]:
    """Scalars as floats: those on an accelerator in one transfer (one host sync), those
    on the CPU directly (copying them over to join the transfer would sync too)."""
    remote = [v.detach().to(torch.float64) for v in values if v.device.type != "cpu"]
    fetched = iter(torch.stack(remote).tolist() if remote else [])
    return [float(v) if v.device.type == "cpu" else next(fetched) for v in values]
