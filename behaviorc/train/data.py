"""Training data: examples to token sequences, the general-data mix, and batches.

Every training sequence is a context and a response, as token ids. A behavior example
gives them directly (`context` + `response`) or as a chat whose last turn is the
assistant's reply, rendered with the tokenizer's chat template when it has one. A
general text trains on all of its tokens: its context is the single start token (BOS,
else EOS) so that its first token is predicted too, the same way `general_nll` scores it.

Tokenization follows the engine's convention (behaviorc.engine.protocol): a context is
rendered as the model reads a prompt (behaviorc.model.chat: the user's turn of a chat
model), and the response's tokens are those of context+response after the context's
tokens, so training and the margin measurement see the same tokens.

Batches come from a schedule that depends only on (seed, step): a resumed run draws the
same batches as an uninterrupted one. Of every `batch` sequences, a share `ratio` comes
from the general texts, spread exactly over steps (a running total rounded down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.model.chat import model_prompt, render_turns


@dataclass(frozen=True)
class TrainSequence:
    context: tuple[int, ...]  # at least one token
    response: tuple[int, ...]  # at least one token: the tokens the loss covers

    @property
    def tokens(self) -> int:
        return len(self.context) + len(self.response)


def start_token(tokenizer: Any) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise BehaviorError("the tokenizer has no BOS or EOS token to start a text with")
    return start


def render_chat(tokenizer: Any, messages: Sequence[ir.ChatMessage],
                loc: Location | None = None) -> tuple[str, str]:
    """(context, response) text of a chat whose last message is the assistant's reply."""
    if not messages or messages[-1].role != "assistant":
        raise BehaviorError("a chat example must end with an assistant message: it is the response", loc)
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        context = render_turns(tokenizer, turns[:-1], add_generation_prompt=True)
        full = render_turns(tokenizer, turns, add_generation_prompt=False)
        if full.startswith(context) and len(full) > len(context):
            return context, full[len(context):]
        raise BehaviorError(
            "the tokenizer's chat template does not render the conversation as its prefix "
            "followed by the assistant's reply, so the response cannot be separated", loc)
    # No template: a plain transcript, the reply after an "assistant:" cue.
    context = "".join(f"{t['role']}: {t['content']}\n" for t in turns[:-1]) + "assistant: "
    return context, turns[-1]["content"]


def encode(tokenizer: Any, context: str, response: str) -> TrainSequence | None:
    """Token ids of one example; None when its response has no tokens."""
    context = model_prompt(tokenizer, context)
    full = tokenizer(context + response).input_ids
    context_ids = tokenizer(context).input_ids if context else []
    if not context_ids:
        context_ids, full = [start_token(tokenizer)], [start_token(tokenizer), *full]
    cut = min(len(context_ids), len(full))
    if cut >= len(full):
        return None
    return TrainSequence(tuple(full[:cut]), tuple(full[cut:]))


def encode_examples(tokenizer: Any, examples: Sequence[ir.Example],
                    loc: Location | None = None) -> list[TrainSequence]:
    sequences = []
    for number, example in enumerate(examples, 1):
        if example.messages:
            context, response = render_chat(tokenizer, example.messages, loc)
        else:
            context, response = example.context, example.response
        sequence = encode(tokenizer, context, response)
        if sequence is None:
            raise BehaviorError(f"training example {number} has an empty response: nothing to learn", loc,
                                hint='give each example a non-empty "response" (or a final assistant message)')
        sequences.append(sequence)
    return sequences


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[TrainSequence]:
    """General texts, trained on every token."""
    return [s for s in (encode(tokenizer, "", text) for text in texts) if s is not None]


@dataclass(frozen=True)
class BatchSchedule:
    """Which sequences make up the batch at each step."""

    behavior: Sequence[TrainSequence]
    general: Sequence[TrainSequence]
    batch: int
    ratio: float  # share of general sequences
    seed: int

    def __post_init__(self) -> None:
        if not self.behavior and not (self.general and self.ratio > 0):
            raise ValueError("nothing to train on")

    def general_count(self, step: int) -> int:
        """General sequences in the batch of `step`."""
        if not self.general:
            return 0
        if not self.behavior:
            return self.batch
        return self._general_before(step + 1) - self._general_before(step)

    def _general_before(self, step: int) -> int:
        # the 1e-9 keeps an exact product (0.25 * 8 * 3) from rounding down below itself
        return math.floor(self.ratio * self.batch * step + 1e-9)

    def at(self, step: int) -> list[TrainSequence]:
        general = self._general_before(step) if self.behavior else self.batch * step
        behavior = self.batch * step - general
        n_general = self.general_count(step)
        picked = [_draw(self.behavior, self.seed, behavior + i) for i in range(self.batch - n_general)]
        picked += [_draw(self.general, self.seed + 1, general + i) for i in range(n_general)]
        return picked


def _draw(pool: Sequence[TrainSequence], seed: int, position: int) -> TrainSequence:
    """The `position`-th draw of an endless stream of seeded shuffles of `pool`."""
    epoch, index = divmod(position, len(pool))
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return pool[int(order[index])]
