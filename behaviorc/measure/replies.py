"""Replies: what a person reads to judge a behavior, generated and scored in one place.

The API (steering, training and the reply table call these):

    replies = answer(engine, prompts, samples=2, system=None, steering=None, strength=0.0,
                     positions="all")
        # per prompt: one greedy reply, then `samples` sampled ones (seeded), as `Reply`s;
        # `system` asks with a system prompt, `steering` ({layer: vector}) steers at
        # `positions` (the vectors' own)
    replies = read_by(base_engine, replies)
        # each reply's length in tokens and mean per-token NLL under `base_engine`
        # (unsteered), read after its plain prompt, so every model is read alike
    scorer = Markers(pattern="...") | Markers(words=(...)) | Projection.calibrate(engine,
             directions, pairs) | measure.judge.Judge(url, model, rubric)
    scores = scorer.scores(replies)   # one float in 0..1 per reply; empty replies 0
    stats = summarize(replies, scores)        # ReplyStats: rate, score, distinct-2,
                                              # repeated share, NLL, with intervals
    reasons = text_broke(stats, base_stats)   # why the text broke, [] when it did not
    versus(replies_a, scores_a, scores_b)     # interval of a's rate minus b's, paired

A reply *shows* the behavior when its score is at least `SHOWS` (0.5); the behavior
rate is the share of replies that do. Intervals are bootstrap (measure.intervals) over
prompts, each with all its replies, with a fixed seed. `sample_replies` and
`reply_prompts` are the greedy shortcuts the steerability report uses.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Mapping, Protocol, Sequence

import torch

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.vocabulary import SteerPositions
from behaviorc.engine.protocol import Engine, steered
from behaviorc.measure.intervals import Interval, bootstrap_mean
from behaviorc.measure.margin import PairLike
from behaviorc.measure.projection import projections
from behaviorc.measure.repetition import distinct_ngram_share, repeated_ngram_share

REPLY_TOKENS = 40  # long enough for a sentence or two of tone, short enough to read
REPLY_PROMPTS = 3
SAMPLES = 2  # sampled replies per prompt beside the greedy one
SAMPLE_TEMPERATURE = 0.7
SHOWS = 0.5  # a reply scored at least this shows the behavior

# When text broke, whatever the margin: a reply loops when this share of its 3-grams
# repeats (ordinary replies of 40 tokens: 0 to 0.05; "I can help! I can help! ..." 0.6).
LOOP_SHARE = 0.25
# More of the replies looping than the base model's, by this share: above 1 in 20. The
# demo's steered model (strength 2, layer 23) loops in 2 of its 24 replies ("I can help
# with anything! I can help with anything! ..."), which 0.10 let pass.
LOOP_RISE = 0.05
DISTINCT_DROP = 0.05  # mean distinct-2 this far below the base model's


@dataclass(frozen=True)
class Reply:
    prompt: str  # the user's prompt (without any system prompt)
    text: str  # as generated (the engines score it as the prompt's continuation)
    sampled: bool  # False: the greedy reply
    tokens: int = 0  # set by read_by
    nll: float | None = None  # mean per-token NLL under the reading model; None: empty

    @property
    def distinct_2(self) -> float | None:
        return distinct_ngram_share(self.text, 2)

    @property
    def repeated_share(self) -> float:
        return repeated_ngram_share([self.text])

    @property
    def loops(self) -> bool:
        return self.repeated_share >= LOOP_SHARE

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "sampled": self.sampled,
                "tokens": self.tokens, "nll": self.nll}

    @classmethod
    def from_dict(cls, row: Mapping) -> "Reply":
        return cls(prompt=row["prompt"], text=row["text"], sampled=bool(row["sampled"]),
                   tokens=int(row.get("tokens", 0)), nll=row.get("nll"))


def reply_prompts(pairs: Sequence[PairLike], count: int = REPLY_PROMPTS) -> list[str]:
    """The first `count` distinct prompts of held-out pairs."""
    return list(dict.fromkeys(p.prompt for p in pairs if p.prompt.strip()))[:count]


def sample_replies(engine: Engine, prompts: Sequence[str], max_new_tokens: int = REPLY_TOKENS,
                   steering: Mapping[int, object] | None = None, strength: float = 0.0,
                   positions: SteerPositions = "all") -> list[str]:
    """Greedy replies to `prompts` as generated, steered by `steering` at `strength` and
    `positions` when given (the steering is cleared afterwards)."""
    return [r.text for r in answer(engine, prompts, samples=0, max_new_tokens=max_new_tokens,
                                   steering=steering, strength=strength, positions=positions)]


def answer(engine: Engine, prompts: Sequence[str], samples: int = SAMPLES, *,
           system: str | None = None, steering: Mapping[int, object] | None = None,
           strength: float = 0.0, positions: SteerPositions = "all",
           max_new_tokens: int = REPLY_TOKENS,
           temperature: float = SAMPLE_TEMPERATURE, seed: int = 0) -> list[Reply]:
    """Per prompt, the greedy reply and then `samples` sampled ones (one seeded batch, so
    the same model gives the same replies), asked with the `system` prompt when given
    and steered by `steering` at `strength` and `positions` (cleared afterwards)."""
    asked = [engine.with_system(system, p) for p in prompts] if system else list(prompts)
    with steered(engine, steering, strength, positions) if steering else nullcontext():
        greedy = engine.generate(asked, max_new_tokens=max_new_tokens, temperature=0.0)
        drawn = engine.generate([p for p in asked for _ in range(samples)], max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=seed) if samples else []
    replies = []
    for i, prompt in enumerate(prompts):
        replies.append(Reply(prompt, greedy[i], sampled=False))
        replies += [Reply(prompt, text, sampled=True) for text in drawn[i * samples:(i + 1) * samples]]
    return replies


def read_by(engine: Engine, replies: Sequence[Reply]) -> list[Reply]:
    """`replies` with their length in tokens and mean per-token NLL under `engine`,
    each read after its plain prompt (no system prompt, no steering)."""
    logprobs = engine.completion_logprobs([r.prompt for r in replies], [r.text for r in replies])
    return [replace(r, tokens=len(values), nll=-sum(values) / len(values) if values else None)
            for r, values in zip(replies, logprobs)]


# ---------------------------------------------------------------- behavior scorers


class Scorer(Protocol):
    name: str  # markers | projection | judge

    def scores(self, replies: Sequence[Reply]) -> list[float]:
        """One score in 0..1 per reply (an empty reply scores 0)."""


class Markers:
    """A reply shows the behavior when it holds a marker: a match of `pattern` (a
    regular expression), or one of `words` as a whole word; both case-insensitive."""

    name = "markers"

    def __init__(self, pattern: str | None = None, words: Sequence[str] = ()):
        if (pattern is None) == (not words):
            raise BehaviorError("markers take a pattern or a list of words")
        source = pattern if pattern is not None else \
            r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
        try:
            self.pattern = re.compile(source, re.IGNORECASE)
        except re.error as err:
            raise BehaviorError(f"the marker pattern {source!r} is not a regular expression: {err}") from None

    def scores(self, replies: Sequence[Reply]) -> list[float]:
        return [1.0 if self.pattern.search(r.text) else 0.0 for r in replies]


class Projection:
    """How far a reply's hidden states lie along the behavior's steering direction,
    read by the base model unsteered (the persona-vectors monitor), on the pairs' scale:
    0 at the negatives' mean projection, 1 at the positives'. Scores are clipped to 0..1;
    `levels` gives them unclipped."""

    name = "projection"

    def __init__(self, engine: Engine, directions: Mapping[int, torch.Tensor],
                 negative: float, positive: float):
        if not positive > negative:
            raise BehaviorError(
                f"the pairs' positives do not project above their negatives on the steering "
                f"direction ({positive:.4g} vs {negative:.4g}): a projection score would be "
                "meaningless", hint="score with `markers` or a `judge`")
        self.engine, self.directions = engine, dict(directions)
        self.negative, self.positive = negative, positive

    @classmethod
    def calibrate(cls, engine: Engine, directions: Mapping[int, torch.Tensor],
                  pairs: Sequence[PairLike]) -> "Projection":
        if not pairs:
            raise BehaviorError("no pairs to calibrate the projection score on")
        prompts = [p.prompt for p in pairs]
        positive = projections(engine, directions, prompts, [p.positive for p in pairs])
        negative = projections(engine, directions, prompts, [p.negative for p in pairs])
        return cls(engine, directions, sum(negative) / len(negative), sum(positive) / len(positive))

    def levels(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        raw = projections(self.engine, self.directions, prompts, texts)
        return [(value - self.negative) / (self.positive - self.negative) for value in raw]

    def scores(self, replies: Sequence[Reply]) -> list[float]:
        kept = [i for i, r in enumerate(replies) if r.text]
        scores = [0.0] * len(replies)
        if kept:
            levels = self.levels([replies[i].prompt for i in kept], [replies[i].text for i in kept])
            for i, level in zip(kept, levels):
                scores[i] = min(1.0, max(0.0, level))
        return scores


# ---------------------------------------------------------------- figures


@dataclass(frozen=True)
class ReplyStats:
    """A reply set's figures; each interval is over prompts (measure.intervals)."""

    replies: int
    rate: Interval  # share of replies scored at least SHOWS
    score: Interval  # mean score
    distinct_2: Interval  # mean distinct-2 of the replies long enough to hold a bigram
    repeated_share: Interval  # mean share of repeated 3-grams per reply
    nll: Interval  # mean per-token NLL under the base model, non-empty replies
    tokens: float  # mean length in tokens
    looping: float  # share of replies that loop

    def as_dict(self) -> dict:
        return {"replies": self.replies, "rate": self.rate.as_dict(), "score": self.score.as_dict(),
                "distinct_2": self.distinct_2.as_dict(),
                "repeated_share": self.repeated_share.as_dict(), "nll": self.nll.as_dict(),
                "tokens": self.tokens, "looping": self.looping}


def summarize(replies: Sequence[Reply], scores: Sequence[float], seed: int = 0) -> ReplyStats:
    if not replies or len(scores) != len(replies):
        raise BehaviorError(f"{len(replies)} replies but {len(scores)} scores")

    def over(values: list[tuple[str, float]]) -> Interval:
        if not values:
            return Interval(float("nan"), float("nan"), float("nan"))
        return bootstrap_mean([v for _, v in values], [p for p, _ in values], seed)

    pairs = list(zip(replies, scores))
    return ReplyStats(
        replies=len(replies),
        rate=over([(r.prompt, float(s >= SHOWS)) for r, s in pairs]),
        score=over([(r.prompt, float(s)) for r, s in pairs]),
        distinct_2=over([(r.prompt, r.distinct_2) for r in replies if r.distinct_2 is not None]),
        repeated_share=over([(r.prompt, r.repeated_share) for r in replies]),
        nll=over([(r.prompt, r.nll) for r in replies if r.nll is not None]),
        tokens=sum(r.tokens for r in replies) / len(replies),
        looping=sum(r.loops for r in replies) / len(replies))


def versus(replies: Sequence[Reply], scores: Sequence[float], others: Sequence[float],
           seed: int = 0) -> Interval:
    """The interval of one model's behavior rate minus another's, over the same prompts
    answered the same number of times (`scores` and `others` align reply by reply)."""
    if len(scores) != len(others) or len(scores) != len(replies):
        raise BehaviorError("the two reply sets do not answer the same prompts alike")
    differences = [float(a >= SHOWS) - float(b >= SHOWS) for a, b in zip(scores, others)]
    return bootstrap_mean(differences, [r.prompt for r in replies], seed)


def text_broke(stats: ReplyStats, base: ReplyStats | None = None) -> list[str]:
    """Why a model's text broke, whatever its margin or behavior rate: replies that loop
    (beyond the base model's share), or a distinct-2 collapsed below the base model's."""
    reasons = []
    looping_base = base.looping if base is not None else 0.0
    if stats.looping > looping_base + LOOP_RISE:
        reasons.append(f"{stats.looping:.0%} of replies loop (at least {LOOP_SHARE:.0%} of their "
                       f"3-grams repeat; base model {looping_base:.0%})")
    if base is not None and stats.distinct_2.mean < base.distinct_2.mean - DISTINCT_DROP:
        reasons.append(f"distinct-2 fell to {stats.distinct_2.mean:.2f} from the base model's "
                       f"{base.distinct_2.mean:.2f}")
    return reasons
