"""Texts a model's context cannot hold, refused by `behaviorc check` where the model's
files are at hand (a built-in already made, a local folder): config.json says the
context, the `tokenizers` library counts tokens from tokenizer.json. No torch, no
transformers; a model without a tokenizer.json is left to the build's own check."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from behaviorc.core import ir
from behaviorc.core.catalog import builtin_path
from behaviorc.core.context import longest_piece, over_context, positions_in, surely_too_long
from behaviorc.core.textfiles import TextFileError, read_bytes


@dataclass(frozen=True)
class ModelContext:
    positions: int
    longest: int  # characters of the vocabulary's longest piece
    tokenizer: Any  # a tokenizers.Tokenizer

    @classmethod
    def of(cls, model: ir.ModelDecl) -> ModelContext | None:
        """The context of a built-in already made or a local folder; None when unknown
        without a download, a build or transformers."""
        folder = {"builtin": lambda: str(builtin_path(model.source)),
                  "folder": lambda: model.source}.get(model.kind, lambda: None)()
        if folder is None or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return None
        return _read_context(folder, model.fingerprint)

    def too_long(self, parts: tuple[str, ...]) -> str | None:
        """Why the text `parts` make cannot fit (the prompt format only adds tokens),
        or None. Joined only to be tokenized: a huge text is refused from its length."""
        reason = surely_too_long(sum(map(len, parts)), self.positions, self.longest)
        # A token spells at least one byte, so a text of fewer bytes than positions fits
        # (without tokenizing every record of every check).
        if reason or sum(len(p.encode("utf-8", "surrogatepass")) for p in parts) < self.positions:
            return reason
        return over_context(len(self.tokenizer.encode("".join(parts), add_special_tokens=False).ids),
                            self.positions)


# A model's fingerprint changes with its files; a tokenizer takes a tenth of a second to
# read, which every check of a spec would otherwise pay again (the fuzzers check thousands).
@functools.lru_cache(maxsize=8)
def _read_context(folder: str, fingerprint: str) -> ModelContext | None:  # noqa: ARG001 (a key)
    try:
        config = json.loads(read_bytes(os.path.join(folder, "config.json"), "data"))
        positions = positions_in(config) if isinstance(config, dict) else None
        if positions is None:
            return None
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    except (OSError, ValueError, TextFileError):
        return None  # reported by the model folder's own check, or at load
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
        return None
    return ModelContext(positions, longest_piece(tokenizer.get_vocab()), tokenizer)


def model_texts(behavior: ir.Behavior) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(section, what it is, the parts of the text) for each text the build gives the
    model whole."""
    sections = (("steer", behavior.steer.pairs if behavior.steer else ()),
                ("eval", behavior.eval.pairs if behavior.eval else ()))
    for section, pairs in sections:
        for pair in pairs:
            yield section, "a pair's prompt and positive", (pair.prompt, pair.positive)
            yield section, "a pair's prompt and negative", (pair.prompt, pair.negative)
    if behavior.eval:
        for prompt in behavior.eval.prompts:
            yield "eval", "the prompt", (prompt,)
        for text in behavior.eval.general:
            yield "eval", "the general text", (text,)
        if behavior.eval.system:
            yield "eval", "the system prompt", (behavior.eval.system,)
    train = behavior.train
    if train:
        for example in train.examples:
            yield "train", "the example", (example.context, example.response,
                                           *(m.content for m in example.messages))
        for prompt in train.distill.prompts if train.distill else ():
            yield "train", "the distil prompt", (prompt,)
        if train.distill and train.distill.system:
            yield "train", "the system prompt", (train.distill.system,)
        for text in train.mix.texts if train.mix else ():
            yield "train", "the general text", (text,)
