"""Forward hooks on decoder layers: add a steering vector, read the residual stream.

A transformers decoder layer returns its output hidden states (a tensor, or a tuple
whose first item is the tensor in older layers); both hooks here handle either form.
A vLLM decoder layer returns `(hidden, residual)` and the next layer's fused add-norm
makes `hidden + residual` the residual stream, so adding to the first item adds to the
residual stream at that layer's output there too: the embedded engine and behaviorc's
vLLM worker steer with the same hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from behaviorc.core.vocabulary import SteerPositions


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


# What a steering hook adds: one tensor at every position, or a function of the layer's
# output hidden states giving the addition for this forward pass (None: nothing).
Addition = Union[torch.Tensor, Callable[[torch.Tensor], Union[torch.Tensor, None]]]


def add_to_output(delta: Addition):
    """A forward hook adding `delta` to a layer's output hidden states."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        added = delta(hidden) if callable(delta) else delta
        if added is None:
            return None
        if isinstance(output, tuple):
            return (hidden + added, *output[1:])
        return hidden + added

    return hook


def added_from(delta: torch.Tensor, hidden: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """What `generated` steering adds to `hidden` [batch, positions, hidden]: `delta` at
    positions `first[row]` and later of each row, exact zeros before them (so those
    positions keep their unsteered values bit for bit)."""
    columns = torch.arange(hidden.shape[1], device=hidden.device)
    steered = columns[None, :] >= first.to(hidden.device)[:, None]
    return steered[..., None].to(hidden.dtype) * delta


def steering_addition(delta: torch.Tensor, positions: SteerPositions, first: torch.Tensor) -> Addition:
    """What steering at `positions` adds in a forward pass whose rows' last prompt tokens
    sit at `first[row]` (behaviorc.engine.protocol defines the positions)."""
    return delta if positions == "all" else (lambda hidden: added_from(delta, hidden, first))


class _StopForward(Exception):
    """Raised from the deepest capture hook: nothing after that layer is computed."""


@contextmanager
def capture_outputs(layers: Sequence[torch.nn.Module], indices: Sequence[int],
                    stop_after_deepest: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the outputs of `layers[i]` for each i in `indices` during the forward run
    inside the block. With `stop_after_deepest`, the forward ends as soon as the deepest
    of them has run (the block swallows that early stop), which is what makes reading a
    middle layer cost about half a forward."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(indices)

    def hook_for(index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[index] = _hidden(output)
            if stop_after_deepest and index == deepest:
                raise _StopForward

        return hook

    handles = [layers[i].register_forward_hook(hook_for(i)) for i in sorted(set(indices))]
    try:
        yield captured
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
