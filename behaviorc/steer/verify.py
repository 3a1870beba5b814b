"""Does the direction do what it should, and what does it cost? A steerability report.

At each strength tried (0, the spec's or the chosen one, the sweep: `DEFAULT_SWEEP`
when the spec gives none) one `SweepPoint` measures, with the vectors added at that
strength:

- the behavior margin of every held-out pair (mean per-token log-prob of the positive
  completion minus the negative one), their mean, and the shares of pairs whose margin
  rose (`right_share`) or fell (`wrong_share`: anti-steerable pairs, arXiv 2407.12404)
  against steering off;
- the general-text NLL;
- greedy sample replies to up to `SAMPLE_PROMPTS` held-out prompts (one batched call),
  their share of repeated word 3-grams (measure.repetition) and their
  activation-projection score (measure.projection: how much of the trait a reply
  expresses, read without steering).

The capability probe's accuracy (measure.capability) is measured with steering off and
at the strength used only: it costs more than the rest of a point together. Steering
off (`measure_base`) depends on no vector, so a build measures it once as its own task
(steer.task.MeasureBase) and every strength, layer and method reuses it.

A control direction (random, seeded, each layer of the same norm as the vector) is
measured the same way at the chosen strength: an effect that does not beat it (by two
standard errors of the per-pair changes) says the pairs carry no usable direction.

`strength auto` tries the sweep and keeps the strength with the
largest margin gain whose cost stays inside the budget: general NLL at most
`nll_rise` above steering off (relative), and repetition at most `repetition_rise`
above the base model's. The verdict lists, as warnings, every reason not to trust the
vectors: no gain over the control, more pairs moved the wrong way than the right way,
no strength inside the budget, a strength that costs more than the budget (naming the
sweep's strength that fits it), and a weaker strength that steers better.

Everything goes through the Engine protocol, so the same code verifies in process and
against a live vLLM server. Steering is always cleared afterwards, also on errors.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.engine.protocol import Engine, steered
from behaviorc.steering_vectors import SteeringVectors
from behaviorc.measure.margin import per_pair_margins
from behaviorc.measure.nll import general_nll
from behaviorc.measure.capability import capability_accuracy
from behaviorc.measure.projection import REPLY_TOKENS, projection_score
from behaviorc.measure.repetition import repeated_ngram_share
from behaviorc.measure.replies import (Projection, Reply, ReplyStats, read_by, reply_prompts,
                                      sample_replies, summarize, text_broke)

# Strengths measured when the spec has no sweep, and `strength auto` chooses from. A
# strength multiplies the extracted vector, whose length is the pairs' mean difference
# (see steer.extract), so 1 moves a hidden state by what separates an average negative
# from its positive. Small enough to run by default (a point costs margins, general NLL
# and one batched round of replies), wide enough that an over-budget strength has a
# weaker neighbour to fall back on.
DEFAULT_SWEEP = (1.0, 2.0, 4.0)
# Held-out prompts replied to at each strength, greedy, in one batched call: with 3
# replies the repetition share jumped about (0.14 at strength 2, 0.60 at 1.5, issue 28).
SAMPLE_PROMPTS = 8
SAMPLE_TOKENS = REPLY_TOKENS
CONTROL_SEED = 0


@dataclass(frozen=True)
class Budget:
    """What a strength may cost: the general NLL's relative rise and the repetition's
    absolute rise, both against steering off."""

    nll_rise: float = 0.10
    repetition_rise: float = 0.10

    def allows(self, point: "SweepPoint", base: "SweepPoint") -> bool:
        """Inside the budget, and text that did not break (measure.replies.text_broke)."""
        return (point.general_nll <= base.general_nll * (1 + self.nll_rise)
                and point.repetition <= base.repetition + self.repetition_rise
                and not point.broke)


@dataclass(frozen=True)
class SweepPoint:
    strength: float
    margin: float
    general_nll: float
    capability: float | None = None  # the probe's accuracy, where it was measured
    repetition: float = 0.0  # share of repeated word 3-grams in the samples
    projection: float | None = None  # None when every sample was empty
    # The replies read as a person would (measure.replies): the mean behavior score
    # (projection calibrated on the pairs: 0 the negatives, 1 the positives; None when it
    # cannot be calibrated), distinct-2, the share that loops, NLL under the base model,
    # and why the text broke against steering off (empty: it did not).
    behavior: float | None = None
    distinct_2: float | None = None
    looping: float = 0.0
    reply_nll: float | None = None
    broke: tuple[str, ...] = ()
    right_share: float = 0.0  # pairs whose margin rose against steering off
    wrong_share: float = 0.0  # pairs whose margin fell (anti-steerable)
    margins: tuple[float, ...] = ()  # per held-out pair
    samples: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SweepPoint":
        return cls(**{**data, "margins": tuple(data["margins"]), "samples": tuple(data["samples"]),
                      "broke": tuple(data.get("broke", ()))})


@dataclass(frozen=True)
class Verification:
    before: SweepPoint  # steering off
    steered: SweepPoint  # at the spec's (or the chosen) strength
    sweep: tuple[SweepPoint, ...]  # the requested (or, for auto, tried) strengths, ascending
    control: SweepPoint  # a random direction of the same norm at the same strength
    strength: float  # the strength `steered` was measured at
    choice: str = ""  # why this strength, for `strength auto`
    warnings: tuple[str, ...] = field(default=())

    @property
    def effect(self) -> float:
        return self.steered.margin - self.before.margin

    @property
    def control_effect(self) -> float:
        return self.control.margin - self.before.margin

    def metrics(self) -> dict[str, float]:
        before, steered = self.before, self.steered
        figures = {
            "margin_before": before.margin,
            "margin_steered": steered.margin,
            "general_nll_before": before.general_nll,
            "general_nll_steered": steered.general_nll,
            "steer_effect": self.effect,
            "control_effect": self.control_effect,
            "right_share": steered.right_share,
            "anti_steerable_share": steered.wrong_share,
            "repetition_before": before.repetition,
            "repetition_steered": steered.repetition,
            "strength": self.strength,
            "text_broke": float(bool(steered.broke)),
            "steer_warnings": float(len(self.warnings)),
        }
        if before.capability is not None and steered.capability is not None:
            figures["capability_before"] = before.capability
            figures["capability_steered"] = steered.capability
        if before.projection is not None and steered.projection is not None:
            figures["projection_before"] = before.projection
            figures["projection_steered"] = steered.projection
        return figures


def check_fits(engine: Engine, vectors: SteeringVectors, loc: Location | None = None) -> None:
    """The vectors must match the model's layers and hidden size."""
    info = engine.info
    if vectors.hidden_size != info.hidden_size:
        raise BehaviorError(f"steering vectors have hidden size {vectors.hidden_size}, "
                            f"the model `{info.name}` has {info.hidden_size}", loc)
    for layer in vectors.layers:
        if not 0 <= layer < info.num_layers:
            raise BehaviorError(f"steering vector at layer {layer}, but the model `{info.name}` "
                                f"has layers 0..{info.num_layers - 1}", loc)


def control_vectors(vectors: SteeringVectors, seed: int = CONTROL_SEED) -> SteeringVectors:
    """A random direction at each of the vectors' layers, of the same norm (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    random = {}
    for layer, vector in vectors.directions.items():
        noise = torch.randn(vector.numel(), generator=generator, dtype=torch.float64)
        random[layer] = (noise / noise.norm() * vector.double().norm()).float()
    return vectors.with_directions(random)


def measure_at(engine: Engine, vectors: SteeringVectors | None, strength: float,
               pairs: Sequence[ir.Pair], general: Sequence[str],
               base: SweepPoint | None = None, prompts: Sequence[str] = (),
               sample_tokens: int = SAMPLE_TOKENS, full: bool = True, probe: bool = False,
               scorer: Projection | None = None, base_replies: ReplyStats | None = None,
               ) -> SweepPoint:
    """One strength's figures (`vectors` None or strength 0: steering off); `base`,
    steering off's point, gives the per-pair shares, and `base_replies` its replies'
    figures, which say whether the text broke. `full` False measures the margins only
    (the control); `probe` adds the capability probe, which costs more than all the rest
    of a point together, so it runs only where a strength is used. `scorer` scores the
    replies for the behavior."""
    engine.clear_steering()
    on = vectors is not None and strength != 0
    with steered(engine, vectors.directions, strength, vectors.positions) if on else nullcontext(engine):
        margins = per_pair_margins(engine, pairs)
        if full:
            nll = general_nll(engine, general)
            capability = capability_accuracy(engine) if probe else None
            replies = sample_replies(engine, prompts, sample_tokens) if prompts else []
    mean = sum(margins) / len(margins)
    shares = {}
    if base is not None:
        changes = [m - b for m, b in zip(margins, base.margins)]
        shares = {"right_share": sum(c > 0 for c in changes) / len(changes),
                  "wrong_share": sum(c < 0 for c in changes) / len(changes)}
    if not full:
        return SweepPoint(strength, mean, math.nan, margins=tuple(margins), **shares)
    point = SweepPoint(strength, mean, nll, capability=capability,
                       repetition=repeated_ngram_share(replies), margins=tuple(margins),
                       samples=tuple(replies), **shares)
    if not replies:
        return point
    return with_replies_read(engine, point, prompts, vectors, scorer, base_replies)[0]


def with_replies_read(engine: Engine, point: SweepPoint, prompts: Sequence[str],
                      vectors: SteeringVectors | None, scorer: Projection | None,
                      base_replies: ReplyStats | None) -> tuple[SweepPoint, ReplyStats]:
    """`point` with its replies read back unsteered (measure.replies): behavior score,
    coherence, whether the text broke against `base_replies`; and their figures."""
    replies = read_by(engine, [Reply(p, text, sampled=False) for p, text in zip(prompts, point.samples)])
    stats = summarize(replies, scorer.scores(replies) if scorer else [0.0] * len(replies))
    projection = None
    if vectors is not None:
        # Read back unsteered: the score is a property of the text (measure.projection).
        projection = projection_score(engine, vectors.directions, prompts, point.samples)
    return replace(point, projection=projection,
                   behavior=stats.score.mean if scorer else None,
                   distinct_2=_number(stats.distinct_2.mean), looping=stats.looping,
                   reply_nll=_number(stats.nll.mean),
                   broke=tuple(text_broke(stats, base_replies)) if base_replies else ()), stats


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def behavior_scorer(engine: Engine, vectors: SteeringVectors, pairs: Sequence[ir.Pair]) -> Projection | None:
    """The reply scorer verification chooses with: the projection on the vectors,
    calibrated on the held-out pairs; None where it cannot be (an engine that does not
    read hidden states, pairs whose positives do not project above their negatives)."""
    if not getattr(engine, "reads_hidden_states", True):
        return None
    try:
        return Projection.calibrate(engine, vectors.directions, pairs)
    except BehaviorError:
        return None


def measure_base(engine: Engine, pairs: Sequence[ir.Pair], general: Sequence[str],
                 sample_tokens: int = SAMPLE_TOKENS) -> SweepPoint:
    """Steering off: everything a verification compares against, the capability probe
    included, and nothing that depends on the vectors, so one measurement serves every
    strength, layer and method (steer.task.MeasureBase caches it). Its projection and
    behavior score are None: those read the replies along a direction, which `verify`
    adds."""
    return measure_at(engine, None, 0.0, pairs, general, None,
                      reply_prompts(pairs, SAMPLE_PROMPTS), sample_tokens, probe=True)


def choose_strength(points: Sequence[SweepPoint], base: SweepPoint, budget: Budget) -> tuple[float | None, str]:
    """The strength whose replies show the behavior most (the reply behavior score; the
    margin where replies were not scored) among those inside the budget whose text did
    not break, and why; None when no strength fits."""
    fitting = [p for p in points if p.strength != 0 and budget.allows(p, base)]
    if not fitting:
        return None, "no strength kept inside the budget"
    cost = (f"general NLL rose at most {budget.nll_rise:.0%} and repetition at most "
            f"{budget.repetition_rise:g}, and whose replies did not loop or lose distinct-2")
    if all(p.behavior is not None for p in fitting) and base.behavior is not None:
        best = max(fitting, key=lambda p: (p.behavior, p.margin, -abs(p.strength)))
        return best.strength, (
            f"strength {best.strength:g}: the highest reply behavior score ({best.behavior:.2f}, "
            f"base {base.behavior:.2f}; margin {best.margin - base.margin:+.3g}) of {len(points)} "
            f"tried whose {cost} (general NLL {best.general_nll / base.general_nll - 1:+.1%}, "
            f"repetition {best.repetition - base.repetition:+.2f})")
    best = max(fitting, key=lambda p: (p.margin, -abs(p.strength)))
    return best.strength, (
        f"strength {best.strength:g}: the largest margin gain ({best.margin - base.margin:+.3g}) "
        f"of {len(points)} tried whose {cost} (general NLL "
        f"{best.general_nll / base.general_nll - 1:+.1%}, repetition "
        f"{best.repetition - base.repetition:+.2f}); the replies could not be scored for the "
        "behavior")


def broken_text(point: SweepPoint, base: SweepPoint, shown: int = 2) -> str:
    """Why the text broke at `point`, with the replies that show it beside steering off's."""
    order = sorted(range(len(point.samples)), key=lambda i: -repeated_ngram_share([point.samples[i]]))
    quoted = "; ".join(f"{base.samples[i]!r} became {point.samples[i]!r}" for i in order[:shown]
                       if i < len(base.samples))
    return (f"the text broke at strength {point.strength:g} whatever the margin "
            f"({point.margin - base.margin:+.3g}): {'; '.join(point.broke)}. Replies: {quoted}")


def verdict(result: Verification, budget: Budget, auto: bool, fits: bool) -> tuple[str, ...]:
    """Every reason the measurements give not to trust the vectors at this strength."""
    warnings = []
    steered = result.steered
    noise = 2 * _standard_error([a - b for a, b in zip(steered.margins, result.before.margins)])
    if result.effect - noise <= abs(result.control_effect):
        warnings.append(f"the steering effect ({result.effect:+.3g} ± {noise:.2g} margin) does not "
                        f"beat a random direction of the same norm ({result.control_effect:+.3g})")
    if steered.wrong_share > steered.right_share:
        warnings.append(f"{steered.wrong_share:.0%} of the held-out pairs move the wrong way "
                        f"(anti-steerable), only {steered.right_share:.0%} the right way")
    if auto and not fits:
        warnings.append(f"no strength tried fits the budget (general NLL +{budget.nll_rise:.0%}, "
                        f"repetition +{budget.repetition_rise:g}, replies that do not break); "
                        f"strength {result.strength:g} is the weakest tried")
    instead = ""
    if not auto and not budget.allows(steered, result.before):
        fitting, _ = choose_strength(result.sweep, result.before, budget)
        instead = (f"; of the sweep, strength {fitting:g} fits the budget: write `strength "
                   f"{fitting:g}` or `strength auto`" if fitting is not None else
                   "; no strength of the sweep fits the budget")
    if steered.broke:
        warnings.append(broken_text(steered, result.before) + instead)
    elif instead:
        warnings.append(
            f"strength {result.strength:g} costs more than the budget: general NLL "
            f"{steered.general_nll / result.before.general_nll - 1:+.1%} (budget "
            f"+{budget.nll_rise:.0%}), repetition {steered.repetition - result.before.repetition:+.2f} "
            f"(budget +{budget.repetition_rise:g})" + instead)
    weaker = [p for p in result.sweep if 0 < p.strength < result.strength and p.margin > steered.margin]
    if weaker and not auto:
        best = max(weaker, key=lambda p: p.margin)
        warnings.append(f"the margin at strength {result.strength:g} ({steered.margin:.3g}) is below "
                        f"that at the weaker {best.strength:g} ({best.margin:.3g})")
    return tuple(warnings)


def _standard_error(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def verify(engine: Engine, vectors: SteeringVectors, strength: float | Literal["auto"],
           pairs: Sequence[ir.Pair], general: Sequence[str], sweep: Sequence[float] = (),
           on_point: Callable[[SweepPoint, int, int], None] | None = None,
           loc: Location | None = None, budget: Budget = Budget(),
           sample_tokens: int = SAMPLE_TOKENS, base: SweepPoint | None = None) -> Verification:
    """Steering off (`base`, measured here when not given), each sweep strength (the
    default sweep when none is given) and `strength`, each measured once; the
    capability probe at the strength used; the control at that strength; the verdict."""
    if not pairs:
        raise BehaviorError("no held-out pairs to verify the steering direction on", loc)
    if not general:
        raise BehaviorError("no general texts to measure the NLL cost of steering on", loc)
    check_fits(engine, vectors, loc)
    auto = strength == "auto"
    tried = sorted(set(float(s) for s in (sweep or DEFAULT_SWEEP)))
    if auto and not any(s > 0 for s in tried):
        raise BehaviorError("`strength auto` needs a positive strength in the sweep to choose from", loc)
    prompts = reply_prompts(pairs, SAMPLE_PROMPTS)
    if base is None:
        base = measure_base(engine, pairs, general, sample_tokens)
    elif len(base.margins) != len(pairs) or len(base.samples) != len(prompts):
        raise ValueError("the base measurement was made on other pairs than the verification's")
    scorer = behavior_scorer(engine, vectors, pairs)
    before, base_replies = with_replies_read(engine, base, prompts, vectors, scorer, None) \
        if base.samples else (base, None)
    strengths = [s for s in dict.fromkeys([*([] if auto else [float(strength)]), *tried]) if s != 0]
    total = len(strengths) + 1
    if on_point is not None:
        on_point(before, 1, total)
    measured: dict[float, SweepPoint] = {0.0: before}
    for done, value in enumerate(strengths, 2):
        measured[value] = measure_at(engine, vectors, value, pairs, general, before, prompts,
                                     sample_tokens, scorer=scorer, base_replies=base_replies)
        if on_point is not None:
            on_point(measured[value], done, total)
    choice, fits = "", True
    if auto:
        chosen, choice = choose_strength([measured[s] for s in tried], before, budget)
        fits = chosen is not None
        used = chosen if fits else min(s for s in tried if s > 0)
    else:
        used = float(strength)
    if used != 0:
        with steered(engine, vectors.directions, used, vectors.positions):
            measured[used] = replace(measured[used], capability=capability_accuracy(engine))
    control = measure_at(engine, control_vectors(vectors), used, pairs, general, before, full=False)
    result = Verification(before=before, steered=measured[used],
                          sweep=tuple(measured[s] for s in tried), control=control,
                          strength=used, choice=choice)
    return replace(result, warnings=verdict(result, budget, auto, fits))
