"""The `steer` request argument of per-request steering, shared by the server (its
middleware checks it, its workers read it) and clients (`behaviorc chat` writes it).

A server keeps a registry of named steering vectors (`behaviorc steer push URL FILE
--name happy`). A request names the ones it wants, with strengths, in vLLM's free-form
request arguments:

    POST /v1/chat/completions {"messages": [...], "vllm_xargs": {"steer": "happy:2,concise:-1"}}

A vector that steers `generated` positions steers a request's tokens from its prompt's
last one on; `"steer_from": N` in the same arguments moves that to position N (0-based),
for a request whose prompt already holds a reply to score (prompt log-probs).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping

STEER_ARG = "steer"  # the key in vllm_xargs
STEER_FROM_ARG = "steer_from"  # where `generated` steering starts, when not the prompt's last token
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_TERMS = 16


class SteerSpecError(ValueError):
    """A `steer` argument that cannot be read; the message says what is wrong."""


def parse_steer(text: str) -> tuple[tuple[str, float], ...]:
    """`"happy:2,concise:-1"` -> (("happy", 2.0), ("concise", -1.0)); a bare name is
    strength 1. Names are sorted (steering adds, so order carries no meaning)."""
    if not isinstance(text, str):
        raise SteerSpecError(f"`steer` must be a string like \"happy:2,concise:-1\", "
                             f"not {json.dumps(text)}")
    terms: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, colon, number = (s.strip() for s in part.partition(":"))
        if not NAME_PATTERN.fullmatch(name):
            raise SteerSpecError(f"`{part}` in steer \"{text}\": a vector name is letters, "
                                 f"digits, `_`, `.` or `-`, starting with a letter")
        try:
            strength = float(number) if colon else 1.0
        except ValueError:
            raise SteerSpecError(f"`{part}` in steer \"{text}\": the strength `{number}` "
                                 f"is not a number") from None
        if not math.isfinite(strength):
            raise SteerSpecError(f"`{part}` in steer \"{text}\": the strength must be finite")
        if name in terms:
            raise SteerSpecError(f"steer \"{text}\" names `{name}` twice")
        terms[name] = strength
    if len(terms) > MAX_TERMS:
        raise SteerSpecError(f"steer \"{text}\" names {len(terms)} vectors; at most "
                             f"{MAX_TERMS} per request")
    return tuple(sorted(terms.items()))


def steer_from(value: Any) -> int:
    """The `steer_from` argument, checked: a position, 0 or more."""
    if type(value) is not int or value < 0:
        raise SteerSpecError(f"`{STEER_FROM_ARG}` must be a token position (a whole number, 0 "
                             f"or more), not {json.dumps(value)}")
    return value


def format_steer(terms: Mapping[str, float] | tuple[tuple[str, float], ...]) -> str:
    items = terms.items() if isinstance(terms, Mapping) else terms
    return ",".join(f"{name}:{strength:g}" for name, strength in items)


def vector_digest(vectors: Mapping[int, list[float]], positions: str = "all") -> str:
    """A short content hash of a registered vector and the positions it steers (the
    cache salt changes with them)."""
    payload = json.dumps({str(k): vectors[k] for k in sorted(vectors)}, separators=(",", ":"))
    if positions != "all":  # digests of vectors steering `all` read as before positions existed
        payload += positions
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_salt(terms: tuple[tuple[str, float], ...], digests: Mapping[str, str],
               salt: Any) -> str:
    """The prefix-cache salt of a steered request: one value per steering setting (names,
    strengths, vector contents) and the client's own salt; vLLM allows 128 characters."""
    key = json.dumps([salt, [(name, digests[name], strength) for name, strength in terms]])
    return "behaviorc-steer-" + hashlib.sha256(key.encode()).hexdigest()
