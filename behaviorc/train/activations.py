"""Activation matching: pull the plain model's residual stream toward the steered one.

Next-token loss on steered samples teaches the plain model what the steered model
*said*; this term teaches it what the steered model *was*: at each steered layer, the
hidden states over a distilled example's response positions are pulled toward those the
steered base model had on the same tokens. The targets are computed once, without
gradient, before training (base weights, steering on, whole sequence). During training a
forward hook on each steered layer keeps that layer's latest output, and the loss reads
it after the response loss has run its forward.

The term is measured against what the steering moves: sum |h - t|^2 over the matched
positions and layers, divided by sum |t - h0|^2, where h0 are the base model's own
(unsteered) states. It is 1 for the base model and 0 once the weights reproduce the
steered states, on any model and at any strength, so one `match_activations` weight
means the same everywhere (0.5: not carrying the steering at all costs half a nat per
token, beside the response loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from behaviorc.core.vocabulary import SteerPositions
from behaviorc.engine.hooks import add_to_output, capture_outputs, steering_addition
from behaviorc.train.data import TrainSequence

TARGET_BATCH = 16


def matched_span(sequence: TrainSequence, mode: str) -> slice:
    """Positions of the forward that predict the response tokens: in a frozen-context
    forward (last context token + response) the first len(response); in a full forward
    the same tokens, after the context."""
    start = 0 if mode == "frozen" else len(sequence.context) - 1
    return slice(start, start + len(sequence.response))


@dataclass(frozen=True)
class Target:
    states: dict[int, torch.Tensor]  # layer -> steered states [len(response), hidden]
    moved: float  # sum over layers and positions of |steered - unsteered|^2


@torch.no_grad()
def steered_targets(model: torch.nn.Module, layers: Sequence[torch.nn.Module],
                    directions: Mapping[int, torch.Tensor], strength: float,
                    sequences: Sequence[TrainSequence], pad_id: int,
                    positions: SteerPositions = "all") -> dict[TrainSequence, Target]:
    """Each sequence's steered hidden states (steered at `positions`) at the steered
    layers over the positions that predict its response, and how far the steering moved
    them."""
    param = next(model.parameters())
    deltas = {layer: (strength * vector.float()).to(param.device, param.dtype)
              for layer, vector in directions.items()}
    targets: dict[TrainSequence, Target] = {}
    unique = list(dict.fromkeys(sequences))
    for start in range(0, len(unique), TARGET_BATCH):
        batch = unique[start:start + TARGET_BATCH]
        plain = _states(model, layers, batch, list(deltas), pad_id, {}, positions)
        steered = _states(model, layers, batch, list(deltas), pad_id, deltas, positions)
        for s, base, target in zip(batch, plain, steered):
            moved = sum(float((target[layer] - base[layer]).pow(2).sum()) for layer in deltas)
            targets[s] = Target(target, moved)
    return targets


def _states(model: torch.nn.Module, layers: Sequence[torch.nn.Module], batch: Sequence[TrainSequence],
            wanted: Sequence[int], pad_id: int,
            deltas: Mapping[int, torch.Tensor], positions: SteerPositions) -> list[dict[int, torch.Tensor]]:
    device = next(model.parameters()).device
    width = max(s.tokens for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(batch):
        ids[row, :s.tokens] = torch.tensor(s.context + s.response, device=device)
        mask[row, :s.tokens] = 1
    first = torch.tensor([len(s.context) - 1 for s in batch])
    steering = [layers[layer].register_forward_hook(add_to_output(steering_addition(delta, positions, first)))
                for layer, delta in deltas.items()]
    try:
        # The steering hooks were registered first, so the capture sees steered outputs.
        # The whole model runs, not its decoder up to the deepest layer: a sharded model
        # gathers its embeddings in the model's own forward, and every rank must run
        # every layer's gather.
        with capture_outputs(layers, wanted, stop_after_deepest=False) as captured:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    finally:
        for handle in steering:
            handle.remove()
    return [{layer: captured[layer][row, matched_span(s, "full")].float().clone() for layer in wanted}
            for row, s in enumerate(batch)]


@dataclass(frozen=True)
class Matching:
    """Activation matching as a data source asks for it. The targets are computed where
    the training runs, with the model it trains: in a build on several processes every
    rank computes them with its sharded model, so no rank sends hidden states."""

    weight: float
    strength: float
    directions: Mapping[int, torch.Tensor]
    sequences: tuple[TrainSequence, ...]  # the distilled ones: the rest has nothing to match
    positions: SteerPositions = "all"  # where the steering adds (the vectors' own)

    def start(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module], pad_id: int,
              mode: str) -> "ActivationMatch":
        targets = steered_targets(model, layers, self.directions, self.strength, self.sequences, pad_id,
                                  self.positions)
        return ActivationMatch(layers, targets, self.weight, mode)


class ActivationMatch:
    """The activation-matching term for the training loop's `extra_loss`. Use as a
    context manager around training: it holds the capture hooks."""

    def __init__(self, layers: Sequence[torch.nn.Module], targets: Mapping[TrainSequence, Target],
                 weight: float, mode: str):
        self.layers, self.targets, self.weight, self.mode = layers, targets, weight, mode
        self.layer_indices = sorted({layer for target in targets.values() for layer in target.states})
        self._latest: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "ActivationMatch":
        for index in self.layer_indices:
            self._handles.append(self.layers[index].register_forward_hook(self._keeper(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._latest = [], {}

    def _keeper(self, index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._latest[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def __call__(self, batch: Sequence[TrainSequence], whole: Sequence[TrainSequence]) -> torch.Tensor:
        """weight * squared error over `batch`'s distilled sequences (read from the forward
        that just ran) / the steering displacement over the step's `whole` batch, of which
        `batch` is this process's part (zero when it holds no distilled sequence)."""
        error = None
        for row, sequence in enumerate(batch):
            target = self.targets.get(sequence)
            if target is None:  # a spec example or general text: nothing to match
                continue
            span = matched_span(sequence, self.mode)
            for layer, states in target.states.items():
                hidden = self._latest[layer][row, span].float()
                term = (hidden - states.to(hidden.device)).pow(2).sum()
                error = term if error is None else error + term
        if error is None:
            device = next(iter(self._latest.values())).device if self._latest else "cpu"
            return torch.zeros((), device=device)
        moved = sum(self.targets[s].moved for s in whole if s in self.targets)
        return self.weight * error / max(moved, 1e-12)
