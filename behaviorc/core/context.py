"""What a model's context admits, decided from its config and vocabulary alone: the
embedded engine refuses with it before tokenizing, `behaviorc check` before any model
loads (neither needs torch for it)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

TOO_LONG_HINT = "shorten it, or split it into several records"


def positions_in(config: Mapping[str, Any]) -> int | None:
    """How many token positions a model's config.json (as a mapping) says it takes;
    None when it does not say."""
    text_config = config.get("text_config")
    config = text_config if isinstance(text_config, Mapping) and text_config else config
    positions = config.get("max_position_embeddings")
    return positions if isinstance(positions, int) and positions > 0 else None


def longest_piece(vocabulary: Iterable[str]) -> int:
    """The most characters one token of the vocabulary spells."""
    return max(map(len, vocabulary), default=1) or 1


def over_context(tokens: int, positions: int | None) -> str | None:
    """Why `tokens` do not fit `positions`, or None when they do."""
    if positions is None or tokens <= positions:
        return None
    return f"is {tokens} tokens long, more than the model's context of {positions} positions"


def surely_too_long(chars: int, positions: int | None, longest: int) -> str | None:
    """Why a text of `chars` characters cannot fit `positions` whatever its
    tokenization, or None when it might: no token spells more than `longest`
    characters, so it has at least chars / longest tokens. Tokenizing a megabyte takes
    seconds and hundreds of MB only to be refused."""
    if positions is None or chars <= positions * longest:
        return None
    return (f"is at least {-(-chars // longest)} tokens long ({chars} characters), "
            f"more than the model's context of {positions} positions")


def shown(text: str) -> str:
    """A text short enough for a message."""
    return text if len(text) <= 60 else text[:57] + "..."
