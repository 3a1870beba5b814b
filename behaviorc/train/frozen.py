"""Context-frozen training: the context runs once without gradient, the response learns.

An example is a context and a response. The context's part of the network state (the
attention layers' keys and values, the Gated DeltaNet layers' conv window and recurrent
state) is computed under `no_grad` and held fixed; a gradient forward then runs only the
trainable segment (the context's last token, whose logits predict the response's first
token, followed by the response) on top of those states. The loss is the response
tokens' loss, exactly as in a full-sequence forward. The gradient differs by design: in
full-sequence training the context's keys and GDN state also carry gradient. W_q (and the
GDN projections) still learn through attention to the frozen keys.

Why not just reuse transformers' cache: its linear-attention cache layer writes new
states into its tensors with `copy_` (stable addresses for cudagraphs). In a gradient
forward, the recurrent state it overwrites is one autograd saved for the backward, which
then fails with an in-place modification error (even on a deep copy of the cache). The
cache built here holds detached clones and its linear-attention layers REBIND the new
state instead of copying into the old tensor.

Each example's frozen state is kept at batch size 1 and unpadded (`FrozenContext`), so it
can be computed once and reused every epoch; `collate` left-pads the attention keys with
masked zeros and stacks the GDN states to run a batch. GDN states need no padding: they
have no sequence axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

LayerKind = Literal["attention", "gdn"]


@dataclass(frozen=True)
class FrozenContext:
    """One example's context state, per decoder layer, batch size 1, no gradient:
    (keys, values) for attention layers, (conv_state, recurrent_state) for GDN layers."""

    length: int  # context tokens it covers
    kinds: tuple[LayerKind, ...]
    states: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.states for t in pair)


class _RebindingLinearAttentionLayer(LinearAttentionLayer):
    """A GDN cache layer that rebinds new states instead of copying into the old ones,
    so the frozen tensors that autograd saved are never modified."""

    def __init__(self, conv_state: torch.Tensor, recurrent_state: torch.Tensor):
        super().__init__(number_of_states=1)
        self.conv_states[0] = conv_state
        self.recurrent_states[0] = recurrent_state
        self.conv_kernel_size[0] = conv_state.shape[-1]
        self.is_conv_states_initialized[0] = True
        self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.dtype, self.device = conv_state.dtype, conv_state.device

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        window = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
        self.conv_states[state_idx] = window[..., -self.conv_kernel_size[state_idx]:]
        return window

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        self.recurrent_states[state_idx] = recurrent_states
        return recurrent_states


@torch.no_grad()
def freeze_contexts(model: torch.nn.Module, contexts: Sequence[Sequence[int]]) -> list[FrozenContext]:
    """Run the contexts once, as one left-padded batch without gradient, and keep each
    one's states unpadded. Left padding is exact: padded keys are masked out, and
    transformers zeroes masked inputs of GDN layers, so their state stays zero until
    the context begins (as it does for a context run alone)."""
    empty = FrozenContext(0, (), ())
    rows = [i for i, ids in enumerate(contexts) if len(ids) > 0]
    if not rows:
        return [empty] * len(contexts)
    device = next(model.parameters()).device
    longest = max(len(contexts[i]) for i in rows)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for row, i in enumerate(rows):
        n = len(contexts[i])
        input_ids[row, longest - n:] = torch.tensor(list(contexts[i]), device=device)
        mask[row, longest - n:] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    cache = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
    kinds, per_layer = _read_cache(cache)
    frozen = [empty] * len(contexts)
    for row, i in enumerate(rows):
        n = len(contexts[i])
        states = tuple(
            (a[row:row + 1, :, longest - n:].clone(), b[row:row + 1, :, longest - n:].clone())
            if kind == "attention" else (a[row:row + 1].clone(), b[row:row + 1].clone())
            for kind, (a, b) in zip(kinds, per_layer))
        frozen[i] = FrozenContext(n, kinds, states)
    return frozen


def _read_cache(cache: DynamicCache) -> tuple[tuple[LayerKind, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
    kinds: list[LayerKind] = []
    states = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionLayer):
            if isinstance(layer, DynamicLayer):  # hybrid layers carry both; none of ours do
                raise NotImplementedError("context-frozen training of hybrid cache layers")
            kinds.append("gdn")
            states.append((layer.conv_states[0], layer.recurrent_states[0]))
        elif isinstance(layer, DynamicLayer) and type(layer) is DynamicLayer:
            kinds.append("attention")
            states.append((layer.keys, layer.values))
        else:
            raise NotImplementedError(f"context-frozen training with a {type(layer).__name__} cache layer")
    return tuple(kinds), states


@dataclass
class FrozenBatch:
    """Inputs of one gradient forward over trainable segments on frozen contexts."""

    input_ids: torch.Tensor  # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, C + S]: left-padded contexts, then the segments
    position_ids: torch.Tensor  # [B, S]: each segment continues its own context
    cache: DynamicCache | None  # None when no example has a context
    segment_mask: torch.Tensor  # [B, S]: 1 on real segment tokens


def collate(model: torch.nn.Module, contexts: Sequence[FrozenContext],
            segments: Sequence[Sequence[int]], pad_id: int = 0) -> FrozenBatch:
    """Batch segments over their contexts' frozen states (fresh cache, shared tensors:
    the frozen states are read, never written)."""
    device = next(model.parameters()).device
    width = max(len(s) for s in segments)
    if width < 2:
        # transformers' one-token decode path updates the GDN conv state in place
        raise ValueError("trainable segments need at least two tokens (a context token and a response)")
    input_ids = torch.full((len(segments), width), pad_id, dtype=torch.long, device=device)
    segment_mask = torch.zeros(len(segments), width, dtype=torch.long, device=device)
    for row, seg in enumerate(segments):
        input_ids[row, :len(seg)] = torch.tensor(list(seg), device=device)
        segment_mask[row, :len(seg)] = 1

    longest = max(c.length for c in contexts)
    context_mask = torch.zeros(len(contexts), longest, dtype=torch.long, device=device)
    for row, ctx in enumerate(contexts):
        context_mask[row, longest - ctx.length:] = 1
    offsets = torch.tensor([c.length for c in contexts], device=device)
    position_ids = offsets[:, None] + torch.arange(width, device=device)[None, :]
    attention_mask = torch.cat([context_mask, segment_mask], dim=1)
    cache = _build_cache(model, contexts, longest) if longest > 0 else None
    return FrozenBatch(input_ids, attention_mask, position_ids, cache, segment_mask)


def _build_cache(model: torch.nn.Module, contexts: Sequence[FrozenContext], longest: int) -> DynamicCache:
    template = next(c for c in contexts if c.length > 0)
    cache = DynamicCache(config=model.config)
    for index, kind in enumerate(template.kinds):
        firsts, seconds = [], []
        for ctx in contexts:
            if ctx.length > 0:
                first, second = ctx.states[index]
            else:  # no context: zero states are exactly a fresh start, masked keys are unseen
                first, second = (torch.zeros_like(t) for t in template.states[index])
                if kind == "attention":
                    first, second = first[..., :0, :], second[..., :0, :]
            if kind == "attention":
                pad = longest - first.shape[-2]
                first = torch.nn.functional.pad(first, (0, 0, pad, 0))
                second = torch.nn.functional.pad(second, (0, 0, pad, 0))
            firsts.append(first)
            seconds.append(second)
        first, second = torch.cat(firsts), torch.cat(seconds)
        if kind == "gdn":
            cache.layers[index] = _RebindingLinearAttentionLayer(first, second)
        else:
            layer = DynamicLayer()
            layer.update(first, second)
            cache.layers[index] = layer
    return cache


def segment_logits(model: torch.nn.Module, batch: FrozenBatch) -> torch.Tensor:
    """Logits over the trainable segments, [B, S, vocab], with gradient."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        past_key_values=batch.cache,
        use_cache=batch.cache is not None,
    ).logits


def segment_loss_sum(logits: torch.Tensor, batch: FrozenBatch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each segment's next tokens (the response tokens), and how
    many tokens that covers."""
    targets = batch.input_ids[:, 1:].masked_fill(batch.segment_mask[:, 1:] == 0, -100)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        targets.reshape(-1),
        ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())
