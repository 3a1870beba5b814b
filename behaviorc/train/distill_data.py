"""Distillation data: what the steered model says, kept where the steering shows most.

Each prompt is answered `samples` times with the behavior's steering on at its spec
strength. Generation is batched: one `engine.generate` call per sample round over a
batch of prompts, each round with its own seed, so a server that seeds every request
alike (vLLM) still gives different samples of the same prompt.

Every sample is scored by how much the steering made it likely: the mean per-token
log-prob of the sample under the steered model minus under the unsteered one (both
measured through the same engine, so on the same weights). A high score means the
sample says what the steering adds and the plain model would not; training the plain
model on those samples moves that difference into the weights. The best `keep`
distinct, non-empty samples of each prompt become training examples whose context is
the prompt (frozen during training) and whose response is the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.engine.protocol import Engine, steered

PROMPTS_PER_BATCH = 32


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    score: float  # mean log-prob per token, steered minus unsteered


@dataclass(frozen=True)
class DistillData:
    kept: tuple[Sample, ...]  # the best `keep` of each prompt, prompt order
    generated: int  # samples generated in all
    empty: int  # samples with no tokens of their own, never kept

    @property
    def examples(self) -> tuple[ir.Example, ...]:
        return tuple(ir.Example(context=s.prompt, response=s.response) for s in self.kept)

    @property
    def mean_score(self) -> float:
        return sum(s.score for s in self.kept) / len(self.kept) if self.kept else float("nan")


def generate_samples(engine: Engine, prompts: Sequence[str], distill: ir.Distill,
                     seed: int) -> list[list[str]]:
    """`distill.samples` responses per prompt, in prompt order. The caller has set the
    engine's steering."""
    responses: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(prompts), PROMPTS_PER_BATCH):
        batch = list(prompts[start:start + PROMPTS_PER_BATCH])
        for round_ in range(distill.samples):
            texts = engine.generate(batch, max_new_tokens=distill.max_tokens,
                                    temperature=distill.temperature,
                                    seed=seed + start * distill.samples + round_)
            for offset, text in enumerate(texts):
                responses[start + offset].append(text)
    return responses


def score_samples(engine: Engine, prompts: Sequence[str], responses: Sequence[Sequence[str]],
                  directions: Mapping[int, torch.Tensor], strength: float) -> list[list[float | None]]:
    """Steered minus unsteered mean log-prob of every response; None for one without
    tokens. Leaves the engine unsteered."""
    flat_prompts = [p for p, rs in zip(prompts, responses) for _ in rs]
    flat_responses = [r for rs in responses for r in rs]
    with steered(engine, directions, strength):
        with_steering = engine.completion_logprobs(flat_prompts, flat_responses)
    plain = engine.completion_logprobs(flat_prompts, flat_responses)
    flat = [(sum(s) / len(s) - sum(p) / len(p)) if s else None
            for s, p in zip(with_steering, plain)]
    scores, at = [], 0
    for rs in responses:
        scores.append(flat[at:at + len(rs)])
        at += len(rs)
    return scores


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
                 loc: Location | None = None) -> DistillData:
    """Sample the prompts from `generator`, which serves the steered model (the caller
    has set its steering, or a live server serves it), score the samples on `scorer`
    (the same base weights, steering toggled here and left off), keep the best."""
    if strength == 0:
        raise BehaviorError("distilling steering at strength 0 samples the plain model",
                            loc, hint="give the steer section a non-zero `strength`")
    prompts = list(distill.prompts)
    responses = generate_samples(generator, prompts, distill, seed)
    scores = score_samples(scorer, prompts, responses, directions, strength)
    kept = keep_best(prompts, responses, scores, distill.keep)
    generated = sum(len(rs) for rs in responses)
    empty = sum(score is None for ss in scores for score in ss)
    if not kept:
        raise BehaviorError(
            f"the steered model answered none of the {len(prompts)} distill prompts with any "
            f"text ({generated} samples, all empty)", loc,
            hint="raise `max_tokens`, or check the prompts")
    return DistillData(tuple(kept), generated, empty)
