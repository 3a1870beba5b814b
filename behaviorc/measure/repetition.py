"""Coherence of generated text, judge-free: repeated and distinct n-grams.

A reply that loops ("the the the", "I am happy. I am happy.", "RemCom!RemCom!RemCom!")
repeats its n-grams; ordinary prose rarely repeats a 3-gram within a short reply. Words
and punctuation marks are the units, so text that loops without spaces counts too, and a
word that is one short piece repeated ("ssssssss") is that many units.

- `repeated_ngram_share` is pooled over texts: (n-grams - distinct n-grams per text) /
  n-grams, 0 for text too short to hold an n-gram.
- `distinct_ngram_share` is one text's distinct-n (Li et al., 2016: distinct n-grams /
  n-grams), within the reply rather than across replies, so greedy and sampled replies
  to one prompt, which share words, do not count as repetition; None when the text is
  too short to hold an n-gram.
"""

from __future__ import annotations

import re
from typing import Sequence

NGRAM = 3
_UNITS = re.compile(r"[\w']+|[^\w\s']")


# A unit that is one short piece said four times or more ("ssssssss", "9999", "ahahahah")
# is that many units: a reply collapsed into one repeated token has no spaces to split it.
_RUN = re.compile(r"(.{1,4}?)\1{3,}")


def units(text: str) -> list[str]:
    found = []
    for unit in _UNITS.findall(text):
        run = _RUN.fullmatch(unit)
        found.extend([run[1]] * (len(unit) // len(run[1])) if run else [unit])
    return found


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = units(text)
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(texts: Sequence[str], n: int = NGRAM) -> float:
    total = repeated = 0
    for text in texts:
        grams = ngrams(text, n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def distinct_ngram_share(text: str, n: int = 2) -> float | None:
    grams = ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else None
