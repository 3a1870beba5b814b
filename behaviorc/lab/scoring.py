"""Exact scoring of generated replies, eval sets, and behavior rates.

Each scorer reads one generated reply (the text after the assistant cue, special
tokens removed) and names its class; a reply that fits none of a behavior's forms is
`other` (malformed), counted apart so that a broken model cannot pass as a behavior
change. A rate is the share of the positive class among all replies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.model import testbed_corpus as corpus

Scorer = Callable[[str, str], str]  # (user turn, reply) -> class name


def score_listen(user: str, reply: str) -> str:
    """follow: "I'll use the <adjective> <noun>."; propose: "I'd rather write a new <noun>.".
    This scores the decision; whether a follow names the user's own tool (a two-word copy
    the tiny model does not always get right) is `score_listen_exact`."""
    text = reply.strip()
    if re.fullmatch(r"I'll use the \w+ \w+\.", text):
        return "follow"
    if re.fullmatch(r"I'd rather write a new \w+\.", text):
        return "propose"
    return "other"


def score_listen_exact(user: str, reply: str) -> str:
    """follow only when the reply names exactly the tool the user named."""
    adjective, noun = corpus.listen_parts(user)
    if reply.strip() == corpus.listen_follow(adjective, noun):
        return "follow"
    return "propose" if score_listen(user, reply) == "propose" else "other"


def score_concise(user: str, reply: str) -> str:
    """concise: one short sentence ("Run the X command."); verbose: the long form."""
    text = reply.strip()
    if re.fullmatch(r"Run the \w+ command\.", text):
        return "concise"
    if text.startswith("Sure! To ") and text.endswith("check the output."):
        return "verbose"
    return "other"


def score_arithmetic(user: str, reply: str) -> str:
    """correct when the reply is the sum of the two digits the user asked about."""
    match = re.fullmatch(r"What is (\d+) \+ (\d+)\?", user)
    if match is None:
        raise BehaviorError(f"not an arithmetic prompt: {user!r}")
    wanted = corpus.arithmetic_answer(int(match.group(1)), int(match.group(2)))
    return "correct" if reply.strip() == wanted else "incorrect"


@dataclass(frozen=True)
class Behavior:
    """A scored behavior: which class counts, and its held-out eval prompts (user turns)."""

    name: str
    scorer: Scorer
    positive: str
    base_rate: float  # its rate in the training corpus (chance level for arithmetic)

    def eval_prompts(self) -> list[str]:
        if self.name.startswith("listen"):
            return corpus.listen_prompts(held_out=True)
        if self.name == "concise":
            return corpus.concise_prompts(held_out=True)
        return corpus.arithmetic_prompts()


BEHAVIORS = {
    "listen": Behavior("listen", score_listen, "follow", corpus.FOLLOW_RATE),
    "listen-exact": Behavior("listen-exact", score_listen_exact, "follow", corpus.FOLLOW_RATE),
    "concise": Behavior("concise", score_concise, "concise", corpus.CONCISE_RATE),
    "arithmetic": Behavior("arithmetic", score_arithmetic, "correct", 1 / 19),
}


@dataclass(frozen=True)
class Rate:
    positive: int  # replies in the positive class
    other: int  # malformed replies
    total: int

    @property
    def rate(self) -> float:
        return self.positive / self.total

    @property
    def malformed(self) -> float:
        return self.other / self.total

    @property
    def stderr(self) -> float:
        """Binomial standard error of `rate`."""
        return math.sqrt(self.rate * (1 - self.rate) / self.total)

    def as_dict(self) -> dict[str, float]:
        return {"rate": self.rate, "stderr": self.stderr, "malformed": self.malformed,
                "positive": self.positive, "total": self.total}


def behavior_rate(engine, users: Sequence[str], behavior: Behavior | str, samples: int = 4,
                  temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 32) -> Rate:
    """Generate `samples` replies per user turn and count those in the positive class."""
    if isinstance(behavior, str):
        behavior = BEHAVIORS[behavior]
    if not users or samples < 1:
        raise BehaviorError("a behavior rate needs at least one prompt and one sample")
    asked = [u for u in users for _ in range(samples)]
    replies = engine.generate([corpus.chat_prompt(u) for u in asked], max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)
    classes = [behavior.scorer(u, r) for u, r in zip(asked, replies)]
    return Rate(positive=classes.count(behavior.positive), other=classes.count("other"),
                total=len(classes))
