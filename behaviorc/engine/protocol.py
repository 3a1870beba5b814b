"""The one way every method reaches a model.

Two engines implement it: `EmbeddedEngine` (transformers, in process; the default) and
`VLLMEngine` (a live vLLM server over HTTP, with behaviorc's worker extension). Steering,
training verification, composition checks and experiments talk only to this protocol.

Conventions:
- Layers are 0-based decoder-layer indices. Steering at layer L adds
  `strength * vector` to the residual stream at the output of decoder layer L, for every
  request until cleared, at the positions `positions` names (the behavior's
  `steer { positions }`, carried by its `SteeringVectors`):
  - `all`: every position, the prompt's too.
  - `generated`: every position whose output chooses a reply token, i.e. the LAST
    prompt token and every token after it; a prompt's earlier positions are read as
    unsteered. In each kind of forward pass that means:
    - generating (the prompt's pass, then one pass per new token): the prompt's pass
      steers only its last position; each later pass steers all of its positions;
    - scoring or reading a given completion after a prompt of n tokens: positions n-1
      and later of that sequence (0-based);
    - vLLM: a token at position p of a request whose prompt has n tokens is steered iff
      p >= n - 1 (also when vLLM splits the prompt into chunks).
- A prompt is the user's words: a chat model reads it as the user's turn of its chat
  template, followed by the cue for its reply; a model without a template (or a prompt
  already holding the template's special tokens) reads it as written
  (behaviorc.model.chat). `prompt_format` says which.
- Log-probs are natural-log, one float per completion token, where the completion is
  tokenized as the continuation of the rendered prompt (tokens of prompt+completion after
  the prompt's tokens).
- Tensors returned are float32 on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

import torch
from behaviorc.core.vocabulary import ReadPosition, SteerPositions


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what the user named (built-in name or folder)
    path: str  # the Hugging Face folder being served or loaded
    architecture: str  # e.g. Qwen3NextForCausalLM
    num_layers: int
    hidden_size: int
    layer_kinds: tuple[Literal["gdn", "attention"], ...]


@runtime_checkable
class Engine(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    @property
    def prompt_format(self) -> Literal["chat", "plain"]:
        """How prompts reach the model: as a chat template's user turn, or as plain text."""

    def with_system(self, system: str, prompt: str) -> str:
        """`prompt` asked under the system prompt `system`, as a prompt this engine reads
        as written (behaviorc.model.chat.system_prompted)."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Completions (text after the prompt), batched; greedy when temperature is 0."""

    def completion_logprobs(self, prompts: Sequence[str],
                            completions: Sequence[str]) -> list[list[float]]:
        """Per-token log-probs of each completion after its prompt."""

    def hidden_states(self, prompts: Sequence[str], completions: Sequence[str],
                      layers: Sequence[int],
                      read: ReadPosition = "mean",
                      after_final_norm: bool = False) -> dict[int, torch.Tensor]:
        """Residual stream at the output of each layer, [n, hidden] per layer: at the
        last token of prompt+completion, or averaged over the completion's tokens. The
        forward stops after the deepest layer asked for. `after_final_norm`: the last
        layer's states pass the model's final norm first (transformers'
        `hidden_states[-1]`)."""

    def set_steering(self, vectors: Mapping[int, torch.Tensor], strength: float,
                     positions: SteerPositions = "all") -> None:
        """Replace all steering with `strength * vectors[layer]` at each layer, added at
        `positions` (the module's conventions say which those are)."""

    def clear_steering(self) -> None:
        """Remove all steering; log-probs return exactly to the unsteered ones."""

    def load_weights(self, source: Path | Mapping[str, torch.Tensor]) -> None:
        """Replace weights from a model folder or a (possibly partial) state dict in
        checkpoint names. All-or-nothing: on any error the old weights stay."""


@contextmanager
def steered(engine: Engine, vectors: Mapping[int, torch.Tensor], strength: float,
            positions: SteerPositions = "all") -> Iterator[Engine]:
    """`engine` steered by `strength * vectors` at `positions` for the block, and
    unsteered after it, also when the block fails."""
    engine.set_steering(vectors, strength, positions)
    try:
        yield engine
    finally:
        engine.clear_steering()
