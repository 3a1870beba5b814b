"""A small capability probe: multiple-choice questions scored by log-prob.

Steering papers report what a strength costs against MMLU; this is the same measure
at a size a CPU build can afford. Each question ships with the package
(`capability_probe.json`, written for behaviorc: general knowledge and arithmetic),
four options, one right. An option's score is the total log-prob of " option" after
"Question: ...\\nAnswer:"; the model answers with the highest-scoring option, and the
accuracy is the share of questions it answers right. Chance is 0.25.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from behaviorc.engine.protocol import Engine

PROBE_FILE = Path(__file__).with_name("capability_probe.json")


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, ...]
    answer: int  # index into options

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"


@lru_cache(maxsize=1)
def probe_questions() -> tuple[Question, ...]:
    rows = json.loads(PROBE_FILE.read_text(encoding="utf-8"))
    return tuple(Question(r["question"], tuple(r["options"]), int(r["answer"])) for r in rows)


def default_questions() -> tuple[Question, ...]:
    """Every other question of the probe: both kinds (knowledge, arithmetic) at half the
    cost. The probe was ~75% of a steering verification's time on smollm2-135m, and a
    strength that costs the model its capability moves half the questions as surely."""
    return probe_questions()[::2]


def capability_accuracy(engine: Engine, questions: Sequence[Question] | None = None) -> float:
    """The share of `questions` (default: `default_questions`) whose right option has the
    highest total log-prob, all options scored in one batch."""
    questions = default_questions() if questions is None else questions
    prompts = [q.prompt for q in questions for _ in q.options]
    completions = [f" {option}" for q in questions for option in q.options]
    scores = [sum(values) for values in engine.completion_logprobs(prompts, completions)]
    right, start = 0, 0
    for q in questions:
        chosen = max(range(len(q.options)), key=lambda i: scores[start + i])
        right += chosen == q.answer
        start += len(q.options)
    return right / len(questions)
