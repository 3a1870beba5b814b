"""Activation-projection score: how much of a trait a text expresses, judge-free.

As persona vectors monitor a trait, a reply is read back through the model *without*
steering, its hidden states at the steered layers are averaged over the reply's tokens
and projected onto the unit steering direction; the score is the mean over replies and
layers. Reading unsteered makes the score a property of the text, so replies of the
base, the steered and the trained model are comparable on one scale.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from behaviorc.engine.protocol import Engine

REPLY_TOKENS = 24  # short: the replies are read, and generating is the slow part


def projections(engine: Engine, directions: Mapping[int, torch.Tensor], prompts: Sequence[str],
                texts: Sequence[str]) -> list[float]:
    """Each text's projection after its prompt: its hidden states averaged over its own
    tokens, projected on the unit direction, averaged over the layers. Every text needs
    tokens; the engine must be unsteered and read hidden states."""
    layers = list(directions)
    states = engine.hidden_states(list(prompts), list(texts), layers, "mean")
    total = torch.zeros(len(texts), dtype=torch.float64)
    for layer in layers:
        direction = directions[layer].double()
        unit = direction / direction.norm() if direction.norm() > 0 else direction
        total += states[layer].double() @ unit
    return (total / len(layers)).tolist()


def projection_score(engine: Engine, directions: Mapping[int, torch.Tensor], prompts: Sequence[str],
                     replies: Sequence[str]) -> float | None:
    """The mean projection of `replies` to `prompts`: None when every reply is empty, or
    from an engine that cannot read hidden states (a live vLLM server). The engine must
    be unsteered."""
    kept = [(p, r) for p, r in zip(prompts, replies) if r]
    if not kept or not getattr(engine, "reads_hidden_states", True):
        return None
    values = projections(engine, directions, [p for p, _ in kept], [r for _, r in kept])
    return sum(values) / len(values)
