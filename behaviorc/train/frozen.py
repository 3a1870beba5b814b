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

A batch's contexts run in one forward without gradient (`freeze_batch`) and their
states stay batched on the device as they come out (`FrozenContexts`: attention keys
left-padded with masked zeros, GDN states stacked; GDN states need no padding, they have
no sequence axis); `collate` puts the segments on top in one upload, with masks and
positions made on the device, and the loss's token count is known on the host: a step
has no loop over its examples and reads nothing back. Kept contexts (reuse across
epochs) are rows of one such batch, gathered by one index per layer (`FrozenContexts.
gather`). `freeze_contexts` splits a batch into single, unpadded contexts
(`FrozenContext`) where one context at a time is wanted.
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


@dataclass(frozen=True)
class FrozenContexts:
    """A batch's context states, batched on the device, per decoder layer: attention
    keys and values [B, heads, longest, dim] left-padded with zeros (masked out), GDN
    states stacked (they have no sequence axis; a row without context holds zeros,
    exactly a fresh start). `states` is empty when no row has a context."""

    lengths: tuple[int, ...]  # context tokens of each row
    kinds: tuple[LayerKind, ...]
    states: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)

    def gather(self, rows: Sequence[int]) -> "FrozenContexts":
        """These rows, as a batch: one index per layer, on the device (no loop over rows)."""
        lengths = tuple(self.lengths[r] for r in rows)
        if not self.states:
            return FrozenContexts(lengths, (), ())
        index = upload_longs(list(rows), self.states[0][0].device)
        cut = self.longest - max(lengths)
        states = tuple(
            (a.index_select(0, index)[:, :, cut:], b.index_select(0, index)[:, :, cut:]) if kind == "attention"
            else (a.index_select(0, index), b.index_select(0, index))
            for kind, (a, b) in zip(self.kinds, self.states))
        return FrozenContexts(lengths, self.kinds, states)

    def extended(self, other: "FrozenContexts") -> "FrozenContexts":
        """These rows followed by `other`'s (keys re-padded to the longer of the two)."""
        if not other.states or not self.states:
            if not other.states and not self.states:
                return FrozenContexts(self.lengths + other.lengths, (), ())
            template = self if self.states else other
            first = self if self.states else _zero_contexts(template, self.lengths)
            second = other if other.states else _zero_contexts(template, other.lengths)
            return first.extended(second)
        longest = max(self.longest, other.longest)
        states = []
        for kind, mine, theirs in zip(self.kinds, self.states, other.states):
            if kind == "attention":
                mine = tuple(_left_pad(t, longest) for t in mine)
                theirs = tuple(_left_pad(t, longest) for t in theirs)
            states.append((torch.cat([mine[0], theirs[0]]), torch.cat([mine[1], theirs[1]])))
        return FrozenContexts(self.lengths + other.lengths, self.kinds, tuple(states))


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - states.shape[-2]
    return torch.nn.functional.pad(states, (0, 0, pad, 0)) if pad else states


def _zero_contexts(template: FrozenContexts, lengths: tuple[int, ...]) -> FrozenContexts:
    """Rows without context, shaped like the template's layers."""
    states = tuple(
        tuple(t.new_zeros((len(lengths), *t.shape[1:2], 0, *t.shape[3:]) if kind == "attention"
                          else (len(lengths), *t.shape[1:])) for t in pair)
        for kind, pair in zip(template.kinds, template.states))
    return FrozenContexts(lengths, template.kinds, states)


def upload_longs(values: list[int], device: torch.device) -> torch.Tensor:
    """A list of ints on the device without waiting for it: a plain copy to a GPU
    synchronises the host with the device, one from pinned memory does not."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def padded_ids(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool = False) -> torch.Tensor:
    """Token rows padded to the longest into one [B, width] tensor: one upload."""
    width = max(len(r) for r in rows)
    flat = [t for r in rows for t in ([pad_id] * (width - len(r)) + list(r) if left
                                      else list(r) + [pad_id] * (width - len(r)))]
    return upload_longs(flat, device).view(len(rows), width)


def mask_if_padded(mask: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor | None:
    """The mask, or None when the host knows no row is padded: transformers then has
    nothing to check (its check whether a mask can be skipped reads the mask back from
    the device, a host sync in every attention and GDN layer's mask preparation)."""
    return None if len(set(lengths)) == 1 else mask


def length_mask(lengths: torch.Tensor, width: int, left: bool = False) -> torch.Tensor:
    """[B, width] of 1 on each row's first `length` positions (last, if `left`)."""
    positions = torch.arange(width, device=lengths.device)[None, :]
    return (positions >= width - lengths[:, None] if left else positions < lengths[:, None]).long()


@torch.no_grad()
def freeze_batch(model: torch.nn.Module, contexts: Sequence[Sequence[int]]) -> FrozenContexts:
    """Run the contexts once, as one left-padded batch without gradient, and keep the
    states batched as they come out. Left padding is exact: padded keys are masked out,
    and transformers zeroes masked inputs of GDN layers, so their state stays zero until
    the context begins (as it does for a context run alone). Rows without context are
    not run; they get zero states."""
    lengths = tuple(len(c) for c in contexts)
    rows = [i for i, n in enumerate(lengths) if n > 0]
    if not rows:
        return FrozenContexts(lengths, (), ())
    device = next(model.parameters()).device
    input_ids = padded_ids([contexts[i] for i in rows], 0, device, left=True)
    mask = length_mask(upload_longs([lengths[i] for i in rows], device), input_ids.shape[1], left=True)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    cache = model(input_ids=input_ids, attention_mask=mask_if_padded(mask, [lengths[i] for i in rows]),
                  position_ids=positions, use_cache=True).past_key_values
    kinds, states = _read_cache(cache)
    if len(rows) < len(contexts):
        index = upload_longs(rows, device)
        states = [tuple(t.new_zeros((len(contexts), *t.shape[1:])).index_copy_(0, index, t) for t in pair)
                  for pair in states]
    return FrozenContexts(lengths, kinds, tuple(tuple(pair) for pair in states))


@torch.no_grad()
def freeze_contexts(model: torch.nn.Module, contexts: Sequence[Sequence[int]]) -> list[FrozenContext]:
    """`freeze_batch`, each row's states kept on its own, unpadded."""
    batch = freeze_batch(model, contexts)
    frozen = []
    for row, n in enumerate(batch.lengths):
        states = tuple(
            (a[row:row + 1, :, a.shape[2] - n:].clone(), b[row:row + 1, :, b.shape[2] - n:].clone())
            if kind == "attention" else (a[row:row + 1].clone(), b[row:row + 1].clone())
            for kind, (a, b) in zip(batch.kinds, batch.states)) if n > 0 else ()
        frozen.append(FrozenContext(n, batch.kinds if n > 0 else (), states))
    return frozen


def stack_contexts(contexts: Sequence[FrozenContext]) -> FrozenContexts:
    """Single contexts as one batch (keys left-padded to the longest)."""
    template = next((c for c in contexts if c.length > 0), None)
    lengths = tuple(c.length for c in contexts)
    if template is None:
        return FrozenContexts(lengths, (), ())
    one = FrozenContexts((template.length,), template.kinds, template.states)
    longest = max(lengths)
    states = []
    for index, kind in enumerate(template.kinds):
        pairs = [c.states[index] if c.length > 0 else _zero_contexts(one, (0,)).states[index] for c in contexts]
        if kind == "attention":
            pairs = [tuple(_left_pad(t, longest) for t in pair) for pair in pairs]
        states.append((torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])))
    return FrozenContexts(lengths, template.kinds, tuple(states))


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
    attention_mask: torch.Tensor | None  # [B, C + S]: left-padded contexts, then the segments;
    # None without padding
    position_ids: torch.Tensor  # [B, S]: each segment continues its own context
    cache: DynamicCache | None  # None when no example has a context
    segment_mask: torch.Tensor  # [B, S]: 1 on real segment tokens
    targets: int  # tokens the loss covers (counted on the host: no read from the device)


def collate(model: torch.nn.Module, contexts: FrozenContexts | Sequence[FrozenContext],
            segments: Sequence[Sequence[int]], pad_id: int = 0) -> FrozenBatch:
    """Batch segments over their contexts' frozen states (fresh cache, shared tensors:
    the frozen states are read, never written). The inputs go to the device in one
    upload, the masks and positions are made there."""
    if not isinstance(contexts, FrozenContexts):
        contexts = stack_contexts(contexts)
    device = next(model.parameters()).device
    if max(len(s) for s in segments) < 2:
        # transformers' one-token decode path updates the GDN conv state in place
        raise ValueError("trainable segments need at least two tokens (a context token and a response)")
    input_ids = padded_ids(segments, pad_id, device)
    lengths = upload_longs([len(s) for s in segments] + list(contexts.lengths), device)
    segment_lengths, context_lengths = lengths[:len(segments)], lengths[len(segments):]
    segment_mask = length_mask(segment_lengths, input_ids.shape[1])
    context_mask = length_mask(context_lengths, contexts.longest, left=True)
    position_ids = context_lengths[:, None] + torch.arange(input_ids.shape[1], device=device)[None, :]
    padded = len(set(contexts.lengths)) > 1 or len({len(s) for s in segments}) > 1
    attention_mask = torch.cat([context_mask, segment_mask], dim=1) if padded else None
    cache = _build_cache(model, contexts) if contexts.states else None
    targets = sum(max(len(s) - 1, 0) for s in segments)
    return FrozenBatch(input_ids, attention_mask, position_ids, cache, segment_mask, targets)


def _build_cache(model: torch.nn.Module, contexts: FrozenContexts) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for index, (kind, (first, second)) in enumerate(zip(contexts.kinds, contexts.states)):
        if kind == "gdn":
            cache.layers[index] = _RebindingLinearAttentionLayer(first, second)
        else:
            # set rather than `update`d: update concatenates onto an empty tensor (a copy)
            layer = DynamicLayer()
            layer.keys, layer.values = first, second
            layer.dtype, layer.device, layer.is_initialized = first.dtype, first.device, True
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
    return token_loss_sum(logits, segment_labels(batch)), batch.targets


def segment_labels(batch: FrozenBatch) -> torch.Tensor:
    """[B, S - 1]: the token each segment position predicts, -100 past the segment."""
    return batch.input_ids[:, 1:].masked_fill(batch.segment_mask[:, 1:] == 0, -100)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits` [B, S, vocab] against `labels` [B, S - 1] (the
    token each position predicts; -100: none)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        labels.reshape(-1), ignore_index=-100, reduction="sum")
