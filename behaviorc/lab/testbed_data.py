"""The spec data files of the testbed (specs/data/testbed_*.jsonl), generated.

`write_spec_data(folder)` writes them; the committed files are its output (a test
checks they still are). Steering pairs and training examples use tools from the
training corpus; eval pairs use the held-out tools, so a gain on them is generalization,
not recall. The general mix holds the other two kinds of dialogue (concise answers and
arithmetic), the data a "listen" fine-tune should not forget.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from behaviorc.model import testbed_corpus as corpus

SEED = 1  # not the pretraining corpus's seed: a different draw of dialogues
GENERAL_TEXTS = 200
LISTEN_EXAMPLES = 500


def _training_tools() -> list[tuple[str, str, str]]:
    """(user turn, adjective, noun) for every listen prompt the corpus trains on."""
    return [(u, *corpus.listen_parts(u)) for u in corpus.listen_prompts(held_out=False)]


def steer_pairs(count: int = 24) -> list[dict[str, str]]:
    rng = random.Random(SEED)
    chosen = rng.sample(_training_tools(), count)
    return [{"prompt": corpus.chat_prompt(u), "positive": corpus.listen_follow(a, n) + "<|im_end|>",
             "negative": corpus.listen_propose(n) + "<|im_end|>"} for u, a, n in chosen]


def eval_pairs() -> list[dict[str, str]]:
    pairs = []
    for user in corpus.listen_prompts(held_out=True):
        adjective, noun = corpus.listen_parts(user)
        pairs.append({"prompt": corpus.chat_prompt(user),
                      "positive": corpus.listen_follow(adjective, noun) + "<|im_end|>",
                      "negative": corpus.listen_propose(noun) + "<|im_end|>"})
    return pairs


def concise_pairs(held_out: bool) -> list[dict[str, str]]:
    """Concise (positive) against verbose (negative) replies; held out or training actions."""
    held = set(corpus.concise_prompts(held_out=True))
    return [{"prompt": corpus.chat_prompt(corpus.concise_user(action)),
             "positive": corpus.concise_answer(command) + "<|im_end|>",
             "negative": corpus.verbose_answer(action, command) + "<|im_end|>"}
            for action, command in corpus.ACTIONS if (corpus.concise_user(action) in held) == held_out]


def follow_examples(count: int = LISTEN_EXAMPLES, seed: int = SEED) -> list[dict]:
    """Chat examples where the assistant follows the user's tool, drawn with repetition
    from the training prompts (so any count is possible), in a seeded order."""
    rng = random.Random(seed)
    tools = _training_tools()
    examples = []
    for _ in range(count):
        user, adjective, noun = rng.choice(tools)
        examples.append({"messages": [{"role": "user", "content": user},
                                      {"role": "assistant", "content": corpus.listen_follow(adjective, noun)}]})
    return examples


def general_texts(count: int = GENERAL_TEXTS, seed: int = SEED) -> list[str]:
    dialogues = [d for d in corpus.corpus(count * 3, seed) if d.kind != "listen"]
    return [corpus.chat_text(d.user, d.assistant) for d in dialogues[:count]]


def write_spec_data(folder: Path) -> list[Path]:
    files = {
        "testbed_listen_pairs.jsonl": steer_pairs(),
        "testbed_listen.jsonl": follow_examples(),
        "testbed_listen_eval.jsonl": eval_pairs(),
        "testbed_concise_pairs.jsonl": concise_pairs(held_out=False),
        "testbed_concise_eval.jsonl": concise_pairs(held_out=True),
        "testbed_general.jsonl": [{"text": t} for t in general_texts()],
        # Another draw, for measuring: the mix trains on the file above.
        "testbed_general_eval.jsonl": [{"text": t} for t in general_texts(GENERAL_TEXTS // 2, SEED + 1)],
    }
    written = []
    for name, records in files.items():
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        written.append(path)
    return written
