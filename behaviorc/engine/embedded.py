"""The embedded engine: a transformers model in this process (the default engine).

It wraps any in-memory model (one just loaded, or one being trained) and implements
`behaviorc.engine.protocol.Engine`.

How sequences are batched: scoring and reading hidden states right-pad each batch and
pass the attention mask. Every position only sees earlier positions (attention is
causal; Gated DeltaNet's convolution and recurrence run forward in time and transformers
zeroes masked inputs), so right padding never changes a real token's result: batched
log-probs equal unbatched ones to float rounding. Generation left-pads (new tokens must
follow every prompt directly); masked inputs reach the GDN state as zeros, so the
state stays exactly zero across padding.

`generated` steering (behaviorc.engine.protocol defines it) needs each forward pass's
first steered position of every row: generation steers each pass's last position (the
prompt's pass is then its last token, each later pass is one new token), scoring and
reading steer from each row's last prompt token. The method running the pass says
which (`_steering_from`); a forward pass of the model outside them while `generated`
steering is set is refused rather than steered at the wrong positions.

Tokenization: a prompt is first rendered as the model reads it (behaviorc.model.chat:
the user's turn of a chat model's template, plain text otherwise); a completion's tokens
are those of prompt+completion after the prompt's tokens. An empty prompt is scored
after one start token (BOS, else EOS), so the first token of a text has a prediction too.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from behaviorc.core.vocabulary import READ_POSITIONS, STEER_POSITIONS, ReadPosition, SteerPositions
from behaviorc.core.diagnostics import BehaviorError, did_you_mean
from behaviorc.core.context import TOO_LONG_HINT, longest_piece, shown, surely_too_long
from behaviorc.engine.hooks import add_to_output, added_from, capture_outputs
from behaviorc.engine.protocol import ModelInfo
from behaviorc.model.adapter import ArchitectureAdapter
from behaviorc.model.chat import PromptFormat, model_prompt, prompt_format, system_prompted


class EmbeddedEngine:
    def __init__(self, model: Any, tokenizer: Any, name: str = "", path: str = "",
                 batch_size: int = 16):
        from behaviorc.model.loading import quiet_transformers

        quiet_transformers()
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = ArchitectureAdapter.for_model(model)
        self.batch_size = batch_size
        self._layers = self.adapter.decoder_layers(model)
        self._steering: list[Any] = []
        # each row's first steered position for the pass about to run (None: no pass
        # of this engine's is running); read only by `generated` steering
        self._first_steered: Callable[[torch.Tensor], torch.Tensor] | None = None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if pad is None or start is None:
            raise BehaviorError("the tokenizer has no pad, BOS or EOS token to pad and start with")
        self._pad_id, self._start_id = pad, start
        from behaviorc.model.loading import context_positions
        self._positions = context_positions(model.config)
        self._info = ModelInfo(
            name=name or str(path), path=str(path), architecture=self.adapter.architecture,
            num_layers=self.adapter.num_layers, hidden_size=self.adapter.hidden_size,
            layer_kinds=self.adapter.layer_kinds)

    @classmethod
    def load(cls, path: Path | str, dtype: str = "float32", device: str = "auto",
             name: str = "") -> "EmbeddedEngine":
        from behaviorc.model.loading import load_model

        model, tokenizer = load_model(path, dtype=dtype, device=device)
        return cls(model, tokenizer, name=name or str(path), path=str(path))

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def prompt_format(self) -> PromptFormat:
        return prompt_format(self.tokenizer)

    def with_system(self, system: str, prompt: str) -> str:
        return system_prompted(self.tokenizer, system, prompt)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- tokenization

    def _prompt_ids(self, prompt: str) -> list[int]:
        self._fits_unread(prompt)
        ids = self.tokenizer(model_prompt(self.tokenizer, prompt)).input_ids
        self._fits(len(ids), prompt)
        return ids if ids else [self._start_id]

    def _encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """Token ids of prompt+completion and how many of them belong to the prompt."""
        self._fits_unread(prompt + completion)
        rendered = model_prompt(self.tokenizer, prompt)
        prompt_ids = self.tokenizer(rendered).input_ids
        full = self.tokenizer(rendered + completion).input_ids
        self._fits(len(full) + (not prompt_ids), prompt + completion)  # the text as the user wrote it
        if not prompt_ids:
            return [self._start_id, *full], 1
        return full, min(len(prompt_ids), len(full))

    def _fits(self, tokens: int, text: str) -> None:
        """Every call tokenizes all its texts before its first forward pass, so a text
        too long for the model is refused before any work."""
        from behaviorc.model.loading import refuse_over_context

        refuse_over_context(tokens, self._positions, f"the text {shown(text)!r}")

    def _fits_unread(self, text: str) -> None:
        """Refuse a text before tokenizing it when its length alone shows it cannot fit."""
        reason = surely_too_long(len(text), self._positions, self._longest_piece)
        if reason:
            raise BehaviorError(f"the text {shown(text)!r} {reason}", hint=TOO_LONG_HINT)

    @functools.cached_property
    def _longest_piece(self) -> int:
        return longest_piece(self.tokenizer.get_vocab())

    def _batches(self, rows: Sequence[list[int]]) -> list[list[int]]:
        """Row indices grouped into batches of similar length (less padding)."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _right_padded(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _left_padded(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        from transformers import GenerationConfig

        if temperature < 0:
            raise BehaviorError(f"temperature must be 0 or more, not {temperature}")
        # Plain temperature sampling: no top-k / top-p unless a caller adds them.
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 \
            else {"do_sample": False}
        config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=self._pad_id,
                                  eos_token_id=self.tokenizer.eos_token_id, **sampling)
        rows = [self._prompt_ids(p) for p in prompts]
        texts: list[str] = [""] * len(rows)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in self._batches(rows):
                ids, mask = self._left_padded([rows[i] for i in batch])
                with self._steering_from(_last_position):
                    out = self.model.generate(input_ids=ids, attention_mask=mask,
                                              generation_config=config)
                new = out[:, ids.shape[1]:].tolist()
                for i, tokens in zip(batch, new):
                    texts[i] = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return texts

    # ---------------------------------------------------------------- scoring

    @torch.inference_mode()
    def completion_logprobs(self, prompts: Sequence[str],
                            completions: Sequence[str]) -> list[list[float]]:
        _same_length(prompts, completions)
        encoded = [self._encode(p, c) for p, c in zip(prompts, completions)]
        rows = [ids for ids, _ in encoded]
        result: list[list[float]] = [[] for _ in rows]
        decoder = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        for batch in self._batches(rows):
            ids, mask = self._right_padded([rows[i] for i in batch])
            with self._steering_from(self._last_prompt_token([encoded[i] for i in batch])):
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            for row, i in enumerate(batch):
                full, prompt_len = encoded[i]
                if len(full) <= prompt_len:
                    continue
                # Position t predicts token t+1: completion tokens are predicted from
                # positions prompt_len-1 .. len-2. Only those positions reach the head.
                logits = head(hidden[row, prompt_len - 1:len(full) - 1]).float()
                targets = torch.tensor(full[prompt_len:], device=logits.device)
                logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
                result[i] = logprobs.cpu().tolist()
        return result

    # ---------------------------------------------------------------- hidden states

    @torch.inference_mode()
    def hidden_states(self, prompts: Sequence[str], completions: Sequence[str],
                      layers: Sequence[int],
                      read: ReadPosition = "mean",
                      after_final_norm: bool = False) -> dict[int, torch.Tensor]:
        _same_length(prompts, completions)
        wanted = sorted(set(self._check_layers(layers)))
        if read not in READ_POSITIONS:
            raise BehaviorError(f"unknown read `{read}`", hint="`last` or `mean`")
        encoded = [self._encode(p, c) for p, c in zip(prompts, completions)]
        if read == "mean":
            for (full, prompt_len), completion in zip(encoded, completions):
                if len(full) <= prompt_len:
                    raise BehaviorError(
                        f"completion {completion!r} has no tokens of its own to average over",
                        hint="give it text, or read the last token (`read last`)")
        rows = [ids for ids, _ in encoded]
        out = {layer: torch.empty(len(rows), self.adapter.hidden_size) for layer in wanted}
        decoder = self.model.get_decoder()
        last = self.adapter.num_layers - 1
        final_norm = getattr(decoder, "norm", None)
        if after_final_norm and last in wanted and final_norm is None:
            raise BehaviorError("this model has no final norm (`norm` of the "
                                "decoder) to read the last layer after",
                                hint="read it before the final norm (the default)")
        for batch in self._batches(rows):
            ids, mask = self._right_padded([rows[i] for i in batch])
            with self._steering_from(self._last_prompt_token([encoded[i] for i in batch])), \
                    capture_outputs(self._layers, wanted) as captured:
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer in wanted:
                states = captured[layer]
                if after_final_norm and layer == last:
                    states = final_norm(states)
                for row, i in enumerate(batch):
                    full, prompt_len = encoded[i]
                    span = slice(len(full) - 1, len(full)) if read == "last" else slice(prompt_len, len(full))
                    out[layer][i] = states[row, span].float().mean(dim=0).cpu()
        return out

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        layers = list(layers)
        if not layers:
            raise BehaviorError("no layers asked for")
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer < self.adapter.num_layers:
                raise BehaviorError(
                    f"layer {layer} does not exist: the model has layers "
                    f"0..{self.adapter.num_layers - 1}")
        return layers

    # ---------------------------------------------------------------- steering

    def set_steering(self, vectors: Mapping[int, torch.Tensor], strength: float,
                     positions: SteerPositions = "all") -> None:
        if positions not in STEER_POSITIONS:
            raise BehaviorError(f"unknown steered positions `{positions}`",
                                hint=did_you_mean(str(positions), STEER_POSITIONS)
                                or f"one of {', '.join(STEER_POSITIONS)}")
        deltas: dict[int, torch.Tensor] = {}
        for layer in self._check_layers(list(vectors)):
            vector = torch.as_tensor(vectors[layer])
            if vector.shape != (self.adapter.hidden_size,):
                raise BehaviorError(
                    f"steering vector for layer {layer} has shape {tuple(vector.shape)}, "
                    f"the model's hidden size is {self.adapter.hidden_size}")
            if not torch.isfinite(vector).all():
                raise BehaviorError(f"steering vector for layer {layer} has NaN or inf values")
            param = next(self.model.parameters())
            deltas[layer] = (float(strength) * vector.float()).to(param.device, param.dtype)
        self.clear_steering()
        self._steering = [self._layers[layer].register_forward_hook(add_to_output(
            delta if positions == "all" else self._generated(delta)))
            for layer, delta in deltas.items()]

    def _generated(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def addition(hidden: torch.Tensor) -> torch.Tensor:
            if self._first_steered is None:
                raise BehaviorError(
                    "`generated` steering is added by the engine's own passes (generate, "
                    "completion_logprobs, hidden_states, gdn_state); a forward pass of the "
                    "model outside them cannot tell which positions choose the reply",
                    hint="run the model through the engine, or steer `all` positions")
            return added_from(delta, hidden, self._first_steered(hidden))

        return addition

    @contextmanager
    def _steering_from(self, first: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """The block's forward passes steer (if `generated` steering is set) each row
        from position `first(hidden)[row]` on."""
        self._first_steered = first
        try:
            yield
        finally:
            self._first_steered = None

    @staticmethod
    def _last_prompt_token(encoded: Sequence[tuple[list[int], int]]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Right-padded rows of (ids, prompt length): each row from its last prompt token."""
        first = torch.tensor([prompt_len - 1 for _, prompt_len in encoded])
        return lambda hidden: first

    def clear_steering(self) -> None:
        for handle in self._steering:
            handle.remove()
        self._steering = []

    # ---------------------------------------------------------------- weights

    def load_weights(self, source: Path | str | Mapping[str, torch.Tensor]) -> None:
        state = _read_weights_folder(Path(source), self.adapter) if isinstance(source, (str, Path)) \
            else dict(source)
        views = self.adapter.checkpoint_tensors(self.model)
        problems = []
        for name, tensor in state.items():
            view = views.get(name)
            if view is None:
                hint = did_you_mean(name, views)
                problems.append(f"unknown weight `{name}`" + (f" ({hint})" if hint else ""))
            elif not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(view.shape):
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                problems.append(f"`{name}` has shape {shape}, the model's is {tuple(view.shape)}")
            elif not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
                problems.append(f"`{name}` has NaN, inf or non-float values")
        if problems:
            listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise BehaviorError(f"weights not loaded (the model is unchanged): {listed}")
        with torch.no_grad():
            for name, tensor in state.items():
                views[name].copy_(tensor.to(device=views[name].device, dtype=views[name].dtype))

    # ---------------------------------------------------------------- GDN state

    @torch.inference_mode()
    def gdn_state(self, prompt: str, layer: int) -> torch.Tensor:
        """The recurrent state of GDN layer `layer` after reading `prompt`:
        [value heads, key dim, value dim], float32 on the CPU."""
        self._check_layers([layer])
        if self.adapter.layer_kinds[layer] != "gdn":
            gdn = [i for i, kind in enumerate(self.adapter.layer_kinds) if kind == "gdn"]
            raise BehaviorError(
                f"layer {layer} is a full-attention layer and has no recurrent state",
                hint=f"GDN layers: {', '.join(map(str, gdn))}" if gdn else "this model has no GDN layers")
        ids = torch.tensor([self._prompt_ids(prompt)], device=self.device)
        with self._steering_from(_last_position):  # as the prompt's pass of generation
            cache = self.model.get_decoder()(input_ids=ids, use_cache=True).past_key_values
        return cache.layers[layer].recurrent_states[0][0].float().cpu()


def _last_position(hidden: torch.Tensor) -> torch.Tensor:
    """A generation pass steers its last position: the prompt's pass its last token (the
    prompts are left-padded), each later pass its one new token."""
    return torch.full((hidden.shape[0],), hidden.shape[1] - 1)


def _same_length(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise BehaviorError(f"{len(prompts)} prompts but {len(completions)} completions")


def _read_weights_folder(folder: Path, adapter: ArchitectureAdapter) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (checkpoint names), after checking that its files
    are whole (`validate_model_folder`) and that it is the same architecture and size as the running model."""
    from safetensors.torch import load_file

    from behaviorc.model.loading import validate_model_folder

    other = validate_model_folder(folder)
    if (other.family, other.num_layers, other.hidden_size) != (
            adapter.family, adapter.num_layers, adapter.hidden_size):
        raise BehaviorError(
            f"`{folder}` holds a {other.family} model with {other.num_layers} layers of "
            f"width {other.hidden_size}; the engine runs a {adapter.family} model with "
            f"{adapter.num_layers} layers of width {adapter.hidden_size}")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state
