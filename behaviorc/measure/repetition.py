"""Coherence of generated text, judge-free: the share of repeated word n-grams.

A reply that loops ("the the the", "I am happy. I am happy.") repeats its n-grams;
ordinary prose rarely repeats a 3-gram within a short reply. The share is pooled over
replies: (n-grams - distinct n-grams per reply) / n-grams, 0 for text too short to hold
an n-gram.
"""

from __future__ import annotations

from typing import Sequence

NGRAM = 3


def repeated_ngram_share(texts: Sequence[str], n: int = NGRAM) -> float:
    total = repeated = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0
