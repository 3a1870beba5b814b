"""Coherence of generated text, judge-free: the share of repeated n-grams.

A reply that loops ("the the the", "I am happy. I am happy.", "RemCom!RemCom!RemCom!")
repeats its n-grams; ordinary prose rarely repeats a 3-gram within a short reply. Words
and punctuation marks are the units, so text that loops without spaces counts too. The
share is pooled over replies: (n-grams - distinct n-grams per reply) / n-grams, 0 for
text too short to hold an n-gram.
"""

from __future__ import annotations

import re
from typing import Sequence

NGRAM = 3
_UNITS = re.compile(r"[\w']+|[^\w\s']")


def repeated_ngram_share(texts: Sequence[str], n: int = NGRAM) -> float:
    total = repeated = 0
    for text in texts:
        words = _UNITS.findall(text)
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0
