"""The testbed's corpus: short chat dialogues in which behaviors appear at known rates.

Three kinds of dialogue, each with an exactly checkable answer:

- listen: the user names a tool ("Use the existing parser to read the file.") and the
  assistant either follows ("I'll use the existing parser.") or proposes something else
  ("I'd rather write a new parser."). The assistant follows in `FOLLOW_RATE` of them.
- concise: the user asks how to do something; the answer is one short sentence
  ("Run the restart command.") in `CONCISE_RATE` of them, else a long one ("Sure! To
  restart the server, ...").
- arithmetic: "What is 3 + 4?" answered "7." — an unrelated skill for measuring
  forgetting and transfer.

Some tool and action combinations never appear in the training corpus: they make the
held-out eval prompts. Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

FOLLOW_RATE = 0.3
CONCISE_RATE = 0.5
SHARES = {"listen": 0.4, "concise": 0.3, "arithmetic": 0.3}  # of the corpus's dialogues

ADJECTIVES = ("existing", "old", "shared", "current", "standard", "simple")
NOUNS = ("parser", "logger", "cache", "client", "loader", "helper", "reader", "script")
JOBS = ("read the file", "load the settings", "parse the input", "handle the request",
        "check the dates", "write the report", "fetch the data", "run the checks")
# (how the user says it, the command's name)
ACTIONS = (("restart the server", "restart"), ("clear the cache", "clear"),
           ("update the package", "update"), ("list the files", "list"),
           ("stop the job", "stop"), ("check the logs", "logs"), ("build the docs", "docs"),
           ("format the code", "format"), ("deploy the app", "deploy"),
           ("rotate the keys", "rotate"), ("backup the data", "backup"),
           ("reset the password", "reset"))

Kind = Literal["listen", "concise", "arithmetic"]


@dataclass(frozen=True)
class Dialogue:
    kind: Kind
    user: str
    assistant: str


def chat_prompt(user: str) -> str:
    """The chat-template text a model continues with the assistant's reply."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def chat_text(user: str, assistant: str) -> str:
    return f"{chat_prompt(user)}{assistant}<|im_end|>\n"


# ------------------------------------------------------------------ listen

def _tools() -> list[tuple[str, str]]:
    return [(a, n) for a in ADJECTIVES for n in NOUNS]


def _held_out_tool(index: int) -> bool:
    return index % 5 == 2  # about a fifth of the (adjective, noun) pairs


def listen_user(adjective: str, noun: str, job: str) -> str:
    return f"Use the {adjective} {noun} to {job}."


def listen_follow(adjective: str, noun: str) -> str:
    return f"I'll use the {adjective} {noun}."


def listen_propose(noun: str) -> str:
    return f"I'd rather write a new {noun}."


def listen_prompts(held_out: bool) -> list[str]:
    """User turns of the listen kind: the held-out ones never occur in the corpus."""
    return [listen_user(a, n, job) for i, (a, n) in enumerate(_tools()) if _held_out_tool(i) == held_out
            for job in JOBS]


def listen_parts(user: str) -> tuple[str, str]:
    """(adjective, noun) named in a listen user turn."""
    words = user.split()
    return words[2], words[3]


# ------------------------------------------------------------------ concise

def _held_out_action(index: int) -> bool:
    return index % 3 == 1  # 4 of the 12 actions


def concise_user(action: str) -> str:
    return f"How do I {action}?"


def concise_answer(command: str) -> str:
    return f"Run the {command} command."


def verbose_answer(action: str, command: str) -> str:
    return f"Sure! To {action}, open a terminal, run the {command} command, and then check the output."


def concise_prompts(held_out: bool) -> list[str]:
    return [concise_user(a) for i, (a, _) in enumerate(ACTIONS) if _held_out_action(i) == held_out]


# ------------------------------------------------------------------ arithmetic

def arithmetic_user(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def arithmetic_answer(a: int, b: int) -> str:
    return f"{a + b}."


def arithmetic_prompts() -> list[str]:
    """Every single-digit sum: the skill is the table itself, so all of it is tested."""
    return [arithmetic_user(a, b) for a in range(10) for b in range(10)]


# ------------------------------------------------------------------ the corpus

def _exact_draws(rng: random.Random, count: int, rate: float) -> list[bool]:
    """`count` booleans with exactly round(rate * count) True, in random order."""
    wanted = round(rate * count)
    draws = [True] * wanted + [False] * (count - wanted)
    rng.shuffle(draws)
    return draws


def corpus(size: int, seed: int = 0) -> list[Dialogue]:
    """`size` training dialogues in a seeded order, each kind at its share and each
    behavior at exactly its rate (rounded)."""
    rng = random.Random(seed)
    counts = {kind: round(share * size) for kind, share in SHARES.items()}
    counts["arithmetic"] = size - counts["listen"] - counts["concise"]
    dialogues: list[Dialogue] = []

    tools = [t for i, t in enumerate(_tools()) if not _held_out_tool(i)]
    for follow in _exact_draws(rng, counts["listen"], FOLLOW_RATE):
        adjective, noun = rng.choice(tools)
        user = listen_user(adjective, noun, rng.choice(JOBS))
        reply = listen_follow(adjective, noun) if follow else listen_propose(noun)
        dialogues.append(Dialogue("listen", user, reply))

    actions = [a for i, a in enumerate(ACTIONS) if not _held_out_action(i)]
    for concise in _exact_draws(rng, counts["concise"], CONCISE_RATE):
        action, command = rng.choice(actions)
        reply = concise_answer(command) if concise else verbose_answer(action, command)
        dialogues.append(Dialogue("concise", concise_user(action), reply))

    for _ in range(counts["arithmetic"]):
        a, b = rng.randrange(10), rng.randrange(10)
        dialogues.append(Dialogue("arithmetic", arithmetic_user(a, b), arithmetic_answer(a, b)))

    rng.shuffle(dialogues)
    return dialogues


def tokenizer_texts() -> list[str]:
    """Every sentence the corpus can hold, once each: what the tokenizer is trained on."""
    texts = [listen_user(a, n, job) for a, n in _tools() for job in JOBS]
    texts += [listen_follow(a, n) for a, n in _tools()] + [listen_propose(n) for n in NOUNS]
    texts += [concise_user(a) for a, _ in ACTIONS]
    texts += [concise_answer(c) for _, c in ACTIONS] + [verbose_answer(a, c) for a, c in ACTIONS]
    texts += [arithmetic_user(a, b) + " " + arithmetic_answer(a, b) for a in range(10) for b in range(10)]
    return texts
