"""Distillation data: what the teacher says, kept where the teacher shows most.

The teacher is the base model with the behavior's steering on at its spec strength, or
reading a system prompt before each prompt (a prompt teacher; the student never sees
it), or both. Each prompt is answered `samples` times by the teacher. Generation is
batched: one `engine.generate` call per sample round over a batch of prompts, each
round with its own seed, so a server that seeds every request alike (vLLM) still gives
different samples of the same prompt.

A teacher that loops is no teacher: a sample whose own 3-grams repeat (at least
`LOOP_SHARE` of them, as the reply table counts a reply that loops: "Ahoy! Ahoy!
Ahoy!") or that reads as broken text to the base model (its NLL per token under the
plain model above `BROKEN` times that of the plain model's own replies to the same
prompts) is dropped with its reason counted, and when
fewer than half of the samples remain the teacher is refused, with examples, before any
training: a student learns a looping teacher's loops. With `no_repeat` (`keep_looping`)
a looping sample is kept instead, though it still counts toward the refusal: the
teacher's distribution over it, read with every repeating token at probability 0
(behaviorc.train.teacher), is where the student learns how the teacher goes on instead
of repeating itself, and where it loops is where that lesson is needed.

Every other sample is scored by how much the teacher made it likely: the mean per-token
log-prob of the sample under the teacher minus under the plain model, on the student's
prompt (both measured through the same engine, so on the same weights). A high score
means the sample says what the teacher adds and the plain model would not; training the
plain model on those samples moves that difference into the weights. The best `keep`
distinct samples of each prompt become training examples whose context is the prompt
(frozen during training) and whose response is the sample.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.core.vocabulary import SteerPositions
from behaviorc.engine.protocol import Engine, steered
from behaviorc.measure.repetition import repeated_ngram_share
from behaviorc.measure.replies import LOOP_SHARE

PROMPTS_PER_BATCH = 32
# A sample whose NLL under the plain model is this many times its own replies' is broken.
# The broken pirate replies of a looping steered teacher on smollm2-135m read at 2.58
# nats a token against 0.80 for the base's own replies (3.2x); fluent replies in an
# unusual style sit lower, and a prompt teacher is the base model itself.
BROKEN = 3.0
KEPT_AT_LEAST = 0.5  # of the non-empty samples, else the teacher is refused


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    score: float  # mean log-prob per token, teacher minus plain model


@dataclass(frozen=True)
class DistillData:
    kept: tuple[Sample, ...]  # the best `keep` of each prompt, prompt order
    generated: int  # samples generated in all
    empty: int  # samples with no tokens of their own, never kept
    looping: int  # samples dropped for repeating themselves
    broken: int  # samples dropped for reading as broken text to the plain model
    plain: tuple[Sample, ...]  # the plain model's own reply to each prompt (score 0)
    plain_nll: float  # their mean NLL per token under the plain model
    looping_kept: int = 0  # samples that repeat themselves, kept for a no-repeat teacher

    @property
    def examples(self) -> tuple[ir.Example, ...]:
        return tuple(ir.Example(context=s.prompt, response=s.response) for s in self.kept)

    @property
    def mean_score(self) -> float:
        return sum(s.score for s in self.kept) / len(self.kept) if self.kept else float("nan")

    @property
    def dropped(self) -> str | None:
        """Which samples were dropped and why, in words; None when none was."""
        reasons = [f"{n} {why}" for n, why in ((self.looping, "looping (at least "
                                                f"{LOOP_SHARE:.0%} of their 3-grams repeat)"),
                                               (self.broken, f"broken (NLL under the plain model above "
                                                f"{BROKEN:g}x its own replies' {self.plain_nll:.2f})"))
                   if n]
        return " and ".join(reasons) if reasons else None

    @property
    def kept_looping(self) -> str | None:
        """The looping samples kept for a no-repeat teacher, in words; None when none was."""
        return (f"{self.looping_kept} looping (at least {LOOP_SHARE:.0%} of their 3-grams repeat) "
                "kept, to be read with their repeats banned" if self.looping_kept else None)

    @property
    def flawed(self) -> int:
        """Samples that loop or break, dropped or kept: what refuses a teacher."""
        return self.looping + self.broken + self.looping_kept

    @property
    def flaws(self) -> str:
        """Those samples and what became of them, in words."""
        return "; ".join(filter(None, (self.dropped and f"dropped {self.dropped}", self.kept_looping)))


def generate_samples(engine: Engine, prompts: Sequence[str], distill: ir.Distill,
                     seed: int, samples: int | None = None) -> list[list[str]]:
    """`samples` (default `distill.samples`) responses per prompt, in prompt order. The
    caller has set the engine's steering."""
    rounds = distill.samples if samples is None else samples
    responses: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(prompts), PROMPTS_PER_BATCH):
        batch = list(prompts[start:start + PROMPTS_PER_BATCH])
        for round_ in range(rounds):
            texts = engine.generate(batch, max_new_tokens=distill.max_tokens,
                                    temperature=distill.temperature,
                                    seed=seed + start * rounds + round_)
            for offset, text in enumerate(texts):
                responses[start + offset].append(text)
    return responses


def _flat(prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    return [p for p, rs in zip(prompts, responses) for _ in rs], [r for rs in responses for r in rs]


def _nested(flat: list, responses: Sequence[Sequence[str]]) -> list[list]:
    nested, at = [], 0
    for rs in responses:
        nested.append(flat[at:at + len(rs)])
        at += len(rs)
    return nested


def score_samples(engine: Engine, prompts: Sequence[str], responses: Sequence[Sequence[str]],
                  directions: Mapping[int, torch.Tensor], strength: float,
                  teacher_prompts: Sequence[str] | None = None, positions: SteerPositions = "all"
                  ) -> tuple[list[list[float | None]], list[list[float | None]]]:
    """For every response: teacher minus plain mean log-prob per token, and its NLL per
    token under the plain model; None for one without tokens. The teacher reads
    `teacher_prompts` (default `prompts`) steered by `directions` at `positions` (none:
    unsteered).
    Leaves the engine unsteered."""
    flat_prompts, flat_responses = _flat(prompts, responses)
    flat_teacher, _ = _flat(teacher_prompts or prompts, responses)
    with steered(engine, directions, strength, positions) if directions else nullcontext():
        with_teacher = engine.completion_logprobs(flat_teacher, flat_responses)
    plain = engine.completion_logprobs(flat_prompts, flat_responses)
    scores = [(sum(t) / len(t) - sum(p) / len(p)) if t else None for t, p in zip(with_teacher, plain)]
    nll = [-sum(p) / len(p) if p else None for p in plain]
    return _nested(scores, responses), _nested(nll, responses)


def keep_best(prompts: Sequence[str], responses: Sequence[Sequence[str]],
              scores: Sequence[Sequence[float | None]], keep: int) -> list[Sample]:
    """The `keep` best-scoring distinct responses of each prompt (ties: first sampled)."""
    kept: list[Sample] = []
    for prompt, rs, ss in zip(prompts, responses, scores):
        best: dict[str, float] = {}
        for response, score in zip(rs, ss):
            if score is not None and response not in best:
                best[response] = score
        ranked = sorted(best.items(), key=lambda item: -item[1])[:keep]
        kept.extend(Sample(prompt, response, score) for response, score in ranked)
    return kept


def distill_data(generator: Engine, scorer: Engine, directions: Mapping[int, torch.Tensor],
                 strength: float, distill: ir.Distill, seed: int,
                 loc: Location | None = None, teacher_prompts: Sequence[str] | None = None,
                 positions: SteerPositions = "all", keep_looping: bool = False) -> DistillData:
    """Sample the teacher from `generator` (the caller has set its steering, or a live
    server serves it), which reads `teacher_prompts` (default the prompts: a steered
    teacher without a system prompt); score the samples on `scorer` (the same base
    weights, steering toggled here and left off), drop looping and broken ones, keep the
    best. The plain model's own replies come from `scorer`, unsteered."""
    if directions and strength == 0:
        raise BehaviorError("distilling steering at strength 0 samples the plain model",
                            loc, hint="give the steer section a non-zero `strength`")
    prompts = list(distill.prompts)
    responses = generate_samples(generator, teacher_prompts or prompts, distill, seed)
    scores, nll = score_samples(scorer, prompts, responses, directions, strength, teacher_prompts, positions)
    plain_replies = generate_samples(scorer, prompts, distill, seed, samples=1)
    _, plain_nll_nested = score_samples(scorer, prompts, plain_replies, {}, 0.0)
    plain_nll_values = [v for vs in plain_nll_nested for v in vs if v is not None]
    plain_nll = sum(plain_nll_values) / len(plain_nll_values) if plain_nll_values else float("nan")
    looping = broken = looping_kept = 0
    examples: list[str] = []
    for ss, ns, rs in zip(scores, nll, responses):
        for i, (score, sample_nll, response) in enumerate(zip(ss, ns, rs)):
            if score is None:
                continue
            loops = repeated_ngram_share([response]) >= LOOP_SHARE
            if loops and not keep_looping:
                looping += 1
            elif plain_nll_values and sample_nll > BROKEN * plain_nll:
                broken += 1
            else:
                if loops:
                    looping_kept += 1
                    examples.append(response.strip())
                continue
            ss[i] = None
            examples.append(response.strip())
    kept = keep_best(prompts, responses, scores, distill.keep)
    generated = sum(len(rs) for rs in responses)
    empty = sum(score is None for ss in scores for score in ss) - looping - broken
    data = DistillData(tuple(kept), generated, empty, looping, broken,
                       tuple(Sample(p, rs[0], 0.0) for p, rs in zip(prompts, plain_replies) if rs[0].strip()),
                       plain_nll, looping_kept)
    spoken = generated - empty
    if spoken and data.flawed > (1 - KEPT_AT_LEAST) * spoken:
        quoted = "; ".join(repr(text[:80]) for text in examples[:2])
        raise BehaviorError(
            f"the teacher loops or breaks: {data.flawed} of its {spoken} samples ({data.flaws}), "
            f"e.g. {quoted}",
            loc, hint="lower the steer section's `strength`, or choose other `layers`")
    if not kept:
        raise BehaviorError(
            f"the teacher answered none of the {len(prompts)} distill prompts with any "
            f"text ({generated} samples, all empty)", loc,
            hint="raise `max_tokens`, or check the prompts")
    return data
