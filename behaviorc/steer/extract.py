"""Steering directions from contrast pairs, through any Engine.

For each pair the engine reads the residual stream at the output of the chosen layers,
for the positive and the negative completion after the same prompt (at the last token,
or averaged over the completion's tokens). The direction at a layer is then

- `mean_diff`: the mean of the paired differences (positive - negative);
- `pca`: the first principal direction of the paired differences, not centered
  (centering would subtract the mean difference, which is the very signal), scaled to
  the mean difference's length along it (nearly the mean difference itself);
- `pca_diff` (repeng's default): the first principal component of the *centered*
  paired differences, i.e. the axis along which pairs differ from one another most,
  beyond their common shift; it can be nearly orthogonal to the mean difference;
- `pca_center` (repeng's): the first principal component of each state minus its
  pair's midpoint, which is the first singular direction of the uncentered
  differences (so the axis of `pca`).

Every direction points from negative to positive completions: its sign is chosen so
that the mean difference projects positively on it (`orient mean`). With `orient vote`,
repeng's rule, most pairs' differences project positively instead (a direction is
flipped when more pairs' positives project below their negatives than above): the two
differ where a minority of pairs outweighs the majority's projections. On a tied vote
repeng keeps the SVD's arbitrary sign; behaviorc keeps the mean's, so it stays
deterministic. The last layer is read before the model's final norm, where steering
adds; `final_norm after` reads it after, as transformers' `hidden_states[-1]` and so
repeng do (on SmolLM2-135M, cosine 0.91 with the other reading, 18.7 times the norm). `pca_diff` and `pca_center` are scaled to the
mean difference's norm, so that with any method a strength of 1 moves a hidden state
as far as the pairs' average positive lies from its negative (over several layers, the
layers share it: each carries its direction over their number): the unit of strength is
the behavior's own contrast at that layer, which carries across models and tools
(repeng's unit vectors need coefficient = strength x that norm, the `norms` the
extraction reports; the GGUF holds the vectors as they are, so llama.cpp's
`--control-vector-scaled FILE S` steers like strength S here).

Reading is batched with length bucketing: all 2n texts are sorted by length and cut
into batches, so a batch pads little; each batch is one call that reads every layer in
one forward, which stops after the deepest layer asked for.

`layers auto` scores every layer by how consistently held-out pairs separate along the
mean-difference direction of the other half (two folds, see `score_layers`), then
steers with each of the `EFFECT_CANDIDATES` best-separating layers' fold directions at
`EFFECT_STRENGTH` and measures, on the held-out pairs, the margin gain (`effect`) and
the gain of the positives' own log-prob (`lift`) (`measure_effects`). Separating pairs
well does not make a layer steer well, and steering well does not make it distil:
a margin rises as much when the steering makes the unwanted completions unlikely as when
it makes the wanted ones likely, but distillation trains on what the steered model
*says*, which can only teach the plain model to make such text likely. And a person
judges a behavior by the replies, not by the margin. So each candidate answers a few
prompts steered, and the layer kept is the one whose replies score highest for the
behavior (`best_layer`), among the candidates whose text still reads as text
(measure.replies.text_broke: no loops, no collapsed distinct-2 against the plain
model's replies) and whose steering makes the wanted completions likelier: a positive
`distillable` effect, the margin gain that the positives' lift accounts for,
min(effect, lift). Where no candidate lifts the positives, the largest distillable
effect decides. (Each candidate's replies are scored by the projection on its own
direction, calibrated on the pairs at its layer: 0 the negatives, 1 the positives, so
the scores of different layers share a scale.) The measurements behind this rule
(smollm2-135m, the demo's pairs, each candidate layer distilled) are in the README's
Defaults. The scores come back so the build can report the figures it chose from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.core.vocabulary import Orientation, ReadPosition, SteerMethod, SteerPositions
from behaviorc.engine.protocol import Engine
from behaviorc.steering_vectors import SteeringVectors

Progress = Callable[[int, int, str], None]  # done, total, what is being done

DEFAULT_BATCH = 32
EFFECT_CANDIDATES = 4  # best-separating layers whose steering effect `layers auto` measures
EFFECT_STRENGTH = 2.0  # in the unit of steer.verify: the pairs' own mean difference
REPLY_CHECK_PROMPTS = 4  # prompts each candidate layer answers steered, to see its text hold


@dataclass(frozen=True)
class LayerScore:
    """How well pairs separate at one layer, measured on held-out pairs.

    consistency: mean / root-mean-square of the held-out differences projected on the
    direction, in [-1, 1]: 1 when every pair moves the same distance the right way,
    near 0 when the direction says nothing. accuracy: the fraction of held-out pairs
    whose positive projects higher than its negative.
    """

    layer: int
    consistency: float
    accuracy: float
    effect: float | None = None  # held-out margin gain when steering there (candidates only)
    lift: float | None = None  # held-out gain of the positives' log-prob per token, likewise
    # The candidates' greedy replies steered at EFFECT_STRENGTH: their behavior score
    # (projection calibrated on the pairs, 0..1) and why their text broke (empty: it held).
    behavior: float | None = None
    broke: tuple[str, ...] = ()

    @property
    def distillable(self) -> float | None:
        """The part of `effect` that the wanted completions becoming likelier accounts
        for (all of it when the unwanted ones became likelier too): what sampled text
        can carry into the weights."""
        if self.effect is None or self.lift is None:
            return None
        return min(self.effect, self.lift)


@dataclass(frozen=True)
class Extraction:
    vectors: SteeringVectors
    scores: tuple[LayerScore, ...] = ()  # every layer's score when layers were `auto`
    # The mean norm of the pairs' hidden states at each steered layer: a vector's norm
    # over it says how far strength 1 moves a typical hidden state, relatively.
    state_norms: dict[int, float] = field(default_factory=dict)


def check_pairs(pairs: Sequence[ir.Pair], loc: Location | None = None) -> None:
    """Refuse pairs that cannot define a direction (the checker's rule for data files,
    applied again here because extraction is also called on pairs made in code)."""
    from behaviorc.lang.data import pair_problem

    if not pairs:
        raise BehaviorError("no steering pairs to extract from", loc)
    for number, pair in enumerate(pairs, 1):
        problem = pair_problem(pair.prompt, pair.positive, pair.negative)
        if problem:
            raise BehaviorError(f"steering pair {number}: {problem}", loc,
                                hint="a pair contrasts a wanted and an unwanted completion of one prompt")


def check_layers(layers: Sequence[int], num_layers: int, loc: Location | None = None) -> None:
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise BehaviorError(
                f"layer {layer} is out of range: the model has {num_layers} layers "
                f"(0..{num_layers - 1})", loc)


def read_pairs(engine: Engine, pairs: Sequence[ir.Pair], layers: Sequence[int],
               read: ReadPosition, batch_size: int = DEFAULT_BATCH,
               progress: Progress | None = None,
               after_final_norm: bool = False,
               ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Hidden states of every positive and every negative, [n, hidden] per layer."""
    texts = [(pair.prompt, getattr(pair, side)) for pair in pairs for side in ("positive", "negative")]
    # Characters stand in for tokens: the protocol has no tokenizer (a vLLM engine is
    # remote), and bucketing only needs lengths in the right order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]) + len(texts[i][1]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    # The longest batch first: a text the model cannot take fails before any other work
    # (the batches themselves, and so every number, are the same in any order).
    batches = batches[-1:] + batches[:-1]
    gathered: dict[int, list[torch.Tensor | None]] = {layer: [None] * len(texts) for layer in layers}
    for done, batch in enumerate(batches, 1):
        states = engine.hidden_states([texts[i][0] for i in batch], [texts[i][1] for i in batch],
                                      list(layers), read, after_final_norm)
        for layer in layers:
            for row, index in enumerate(batch):
                gathered[layer][index] = states[layer][row]
        if progress is not None:
            progress(done, len(batches), "reading hidden states")
    positives = {layer: torch.stack(rows[0::2]).float() for layer, rows in gathered.items()}
    negatives = {layer: torch.stack(rows[1::2]).float() for layer, rows in gathered.items()}
    return positives, negatives


def direction(positives: torch.Tensor, negatives: torch.Tensor, method: SteerMethod,
              orient: Orientation = "mean") -> torch.Tensor:
    """One layer's steering direction from paired states [n, hidden]."""
    differences = (positives - negatives).double()
    mean = differences.mean(dim=0)
    if method == "mean_diff":
        return (mean if orient == "mean" or _votes_for(differences, mean) else -mean).float()
    # Rows are pairs, so the first right singular vector is the first principal
    # direction of the rows; pca_center's rows (each state minus its pair's midpoint,
    # +d/2 and -d/2) have the same axis as the uncentered differences.
    rows = differences - mean if method == "pca_diff" else differences
    _, _, right = torch.linalg.svd(rows, full_matrices=False)
    axis = right[0]
    along = float(mean @ axis)
    if along < 0:
        axis, along = -axis, -along
    if orient == "vote" and not _votes_for(differences, axis):
        axis, along = -axis, -along
    length = abs(along) if method == "pca" else float(mean.norm())
    return (axis * length).float()


def _votes_for(differences: torch.Tensor, axis: torch.Tensor) -> bool:
    """Whether at least as many pairs' differences project positively on `axis` as
    negatively (a tie keeps it)."""
    along = differences @ axis
    return int((along > 0).sum()) >= int((along < 0).sum())


def score_layers(positives: dict[int, torch.Tensor], negatives: dict[int, torch.Tensor]) -> list[LayerScore]:
    """Two-fold held-out separation at each layer: the direction comes from the even
    pairs and is scored on the odd ones, then the other way round; scores average."""
    scores = []
    for layer in positives:
        differences = (positives[layer] - negatives[layer]).double()
        folds = [(differences[0::2], differences[1::2]), (differences[1::2], differences[0::2])]
        consistency, accuracy = [], []
        for train, held in folds:
            if len(train) == 0 or len(held) == 0:
                continue
            axis = train.mean(dim=0)
            norm = axis.norm()
            projected = held @ (axis / norm) if norm > 0 else torch.zeros(len(held), dtype=torch.float64)
            rms = projected.square().mean().sqrt()
            consistency.append(float(projected.mean() / rms) if rms > 0 else 0.0)
            accuracy.append(float((projected > 0).double().mean()))
        scores.append(LayerScore(layer, sum(consistency) / len(consistency), sum(accuracy) / len(accuracy)))
    return scores


def _candidates(scores: Sequence[LayerScore]) -> list[LayerScore]:
    # Layer 0 only when it is the only layer: llama.cpp cannot carry a control vector
    # there (see formats.steering on GGUF numbering), and repeng does not read it either.
    return [s for s in scores if s.layer > 0] or list(scores)


def best_layer(scores: Sequence[LayerScore]) -> int:
    """The layer whose steered replies score highest for the behavior among the
    candidates whose replies did not break and whose steering lifts the positives
    (distillable > 0); where none lifts them, the largest distillable effect among those
    whose replies held (all of them when every one broke). The distillable effect, the
    margin gain, consistency, then the shallower layer break ties. Without measured
    effects: the most consistent layer (accuracy, then the shallower layer break ties)."""
    measured = [s for s in _candidates(scores) if s.distillable is not None]
    if not measured:
        return max(_candidates(scores), key=lambda s: (s.consistency, s.accuracy, -s.layer)).layer
    held = [s for s in measured if not s.broke] or measured
    lifting = [s for s in held if s.distillable > 0]
    if lifting:
        return max(lifting, key=lambda s: (-math.inf if s.behavior is None else s.behavior,
                                           *_by_distillable(s))).layer
    return max(held, key=_by_distillable).layer


def _by_distillable(score: LayerScore) -> tuple[float, float, float, int]:
    return score.distillable, score.effect, score.consistency, -score.layer


def choice(scores: Sequence[LayerScore], chosen: int) -> str:
    """Why `layers auto` kept `chosen`, in a sentence for the report."""
    measured = sorted((s for s in scores if s.distillable is not None), key=lambda s: -s.effect)
    if not measured:
        return f"layer {chosen}: the most consistent separation of held-out pairs"
    kept = next(s for s in measured if s.layer == chosen)
    tried = f"of the {len(measured)} best-separating layers steered at strength {EFFECT_STRENGTH:g}"
    effect = f"margin {kept.effect:+.3g}, positives {kept.lift:+.3g}"
    if kept.distillable > 0 and kept.behavior is not None:
        said = (f"layer {chosen}: its steered replies score highest for the behavior "
                f"({kept.behavior:.2f}) {tried} whose text held and whose steering made the "
                f"wanted completions likelier ({effect})")
    else:
        said = f"layer {chosen}: the largest distillable effect ({kept.distillable:+.3g}: {effect}) {tried}"
        if kept.behavior is not None:
            said += f"; its replies score {kept.behavior:.2f} for the behavior"
    broken = [s for s in measured if s.broke]
    if broken:
        said += "; left out, their steered replies broke: " + ", ".join(
            f"layer {s.layer} ({s.broke[0]})" for s in broken)
    unlifted = [s for s in measured if not s.broke and s.distillable <= 0 < kept.distillable]
    if unlifted:
        said += ("; left out, their steering made the unwanted completions unlikely rather "
                 "than the wanted ones likely, which sampled text cannot teach: " + ", ".join(
                     f"layer {s.layer} (margin {s.effect:+.3g}, positives {s.lift:+.3g})"
                     for s in unlifted))
    return said


def choice_warnings(scores: Sequence[LayerScore], chosen: int) -> tuple[str, ...]:
    """What the scores say against the layer `layers auto` kept, for the task's line."""
    kept = next((s for s in scores if s.layer == chosen and s.distillable is not None), None)
    if kept is None:
        return ()
    warnings = []
    if kept.broke:
        warnings.append(f"layer {chosen} chosen, but every candidate layer's replies broke when "
                        f"steered at strength {EFFECT_STRENGTH:g}: {'; '.join(kept.broke)}")
    if kept.distillable <= 0:
        warnings.append(f"layer {chosen} chosen, but no layer steered made the positives likelier "
                        f"(best lift {max(s.lift for s in scores if s.lift is not None):+.3g}): "
                        "distilling this steering may carry little of its effect into the weights")
    return tuple(warnings)


def measure_effects(engine: Engine, pairs: Sequence[ir.Pair], positives: dict[int, torch.Tensor],
                    negatives: dict[int, torch.Tensor], scores: Sequence[LayerScore],
                    method: SteerMethod, read: ReadPosition = "mean", orient: Orientation = "mean",
                    progress: Progress | None = None,
                    positions: SteerPositions = "all") -> list[LayerScore]:
    """`scores` with the held-out steering effect and lift of the best-separating layers:
    for each fold (as in `score_layers`) the direction from one half steers the other
    half at EFFECT_STRENGTH; the gains of their mean margin and of their positives' mean
    log-prob per token are averaged over folds. Each candidate's whole direction then
    answers `REPLY_CHECK_PROMPTS` prompts greedily at that strength: the replies' behavior
    score and whether their text broke against the plain model's (measure.replies). All
    of it steers at `positions`, as the chosen vectors will."""
    from behaviorc.engine.protocol import steered
    from behaviorc.measure.margin import per_pair_logprobs
    from behaviorc.measure.projection import REPLY_TOKENS
    from behaviorc.measure.replies import Projection, answer, read_by, reply_prompts, summarize, text_broke

    ranked = sorted(_candidates(scores), key=lambda s: (-s.consistency, -s.accuracy, s.layer))
    chosen = {s.layer for s in ranked[:EFFECT_CANDIDATES]}
    indices = list(range(len(pairs)))
    folds = [(indices[0::2], indices[1::2]), (indices[1::2], indices[0::2])]
    plain_positives, plain_negatives = per_pair_logprobs(engine, pairs)
    effects: dict[int, tuple[float, float]] = {}
    for done, layer in enumerate(sorted(chosen)):
        if progress is not None:
            progress(done, 2 * len(chosen), f"steering candidate layer {layer} on held-out pairs")
        margin_gains, lifts = [], []
        for train, held in folds:
            vector = direction(positives[layer][train], negatives[layer][train], method, orient)
            with steered(engine, {layer: vector}, EFFECT_STRENGTH, positions):
                steered_positives, steered_negatives = per_pair_logprobs(engine, [pairs[i] for i in held])
            rises = [p - plain_positives[i] for p, i in zip(steered_positives, held)]
            falls = [plain_negatives[i] - n for n, i in zip(steered_negatives, held)]
            margin_gains.append((sum(rises) + sum(falls)) / len(held))
            lifts.append(sum(rises) / len(held))
        effects[layer] = (sum(margin_gains) / len(folds), sum(lifts) / len(folds))
    # Each candidate's whole direction answers a few prompts, as the verification's
    # replies would: a layer whose text breaks is no choice whatever its margin.
    prompts = reply_prompts(pairs, REPLY_CHECK_PROMPTS)
    plain = read_by(engine, answer(engine, prompts, samples=0, max_new_tokens=REPLY_TOKENS))
    plain_stats = summarize(plain, [0.0] * len(plain))
    replies: dict[int, tuple[float, tuple[str, ...]]] = {}
    for done, layer in enumerate(sorted(chosen), len(chosen)):
        if progress is not None:
            progress(done, 2 * len(chosen), f"replies steered at candidate layer {layer}")
        whole = direction(positives[layer], negatives[layer], method, orient)
        unit = whole.double() / whole.double().norm()
        # The pairs' own states (averaged over the completion, as the score reads a reply)
        # calibrate the projection score: 0 at the negatives, 1 at the positives.
        scorer = Projection(engine, {layer: whole}, float((negatives[layer].double() @ unit).mean()),
                            float((positives[layer].double() @ unit).mean())) if read == "mean" \
            else Projection.calibrate(engine, {layer: whole}, pairs)
        said = read_by(engine, answer(engine, prompts, samples=0, steering={layer: whole},
                                      strength=EFFECT_STRENGTH, max_new_tokens=REPLY_TOKENS,
                                      positions=positions))
        stats = summarize(said, scorer.scores(said))
        replies[layer] = (stats.score.mean, tuple(text_broke(stats, plain_stats)))
    return [replace(s, effect=effects[s.layer][0], lift=effects[s.layer][1],
                    behavior=replies[s.layer][0], broke=replies[s.layer][1])
            if s.layer in effects else s for s in scores]


def extract(engine: Engine, pairs: Sequence[ir.Pair], layers: Sequence[int] | Literal["auto"],
            method: SteerMethod = "mean_diff", read: ReadPosition = "mean",
            batch_size: int = DEFAULT_BATCH,
            progress: Progress | None = None, loc: Location | None = None, *,
            orient: Orientation = "mean", after_final_norm: bool = False,
            positions: SteerPositions = "all") -> Extraction:
    """Steering vectors for `pairs` at `layers` (or the best layer, for `auto`), to steer
    at `positions` (which `auto` measures the candidate layers' effects with)."""
    check_pairs(pairs, loc)
    info = engine.info
    if layers == "auto":
        if len(pairs) < 2:
            raise BehaviorError("`layers auto` needs at least 2 steering pairs to score layers "
                                f"on held-out pairs (got {len(pairs)})", loc)
        wanted = list(range(info.num_layers))
    else:
        wanted = sorted(set(layers))
        if not wanted:
            raise BehaviorError("no layers to steer", loc)
        check_layers(wanted, info.num_layers, loc)
    try:  # a pair the model cannot read (too long for it) is the spec's pairs' problem
        positives, negatives = read_pairs(engine, pairs, wanted, read, batch_size, progress,
                                          after_final_norm)
    except BehaviorError as err:
        raise err.with_parent_location(loc) from None
    scores: tuple[LayerScore, ...] = ()
    if layers == "auto":
        scores = tuple(score_layers(positives, negatives))
        scores = tuple(measure_effects(engine, pairs, positives, negatives, scores, method, read,
                                       orient, progress, positions))
        wanted = [best_layer(scores)]
    # Several layers share the strength: each adds its direction over the number of
    # layers, so `layers 12..18` at strength S moves the residual stream about as far as
    # one layer at S (steering adds up along the stream), not seven times that.
    directions = {layer: direction(positives[layer], negatives[layer], method, orient) / len(wanted)
                  for layer in wanted}
    vectors = SteeringVectors(
        directions=directions, method=method, model=info.name, read=read, positions=positions,
        model_type=model_type(info.path) or info.architecture)
    state_norms = {layer: float(torch.cat([positives[layer], negatives[layer]]).norm(dim=1).mean())
                   for layer in wanted}
    return Extraction(vectors, scores, state_norms)


def model_type(folder: str) -> str:
    """config.json's model_type (what repeng writes as the GGUF model hint), if readable."""
    try:
        return str(json.loads((Path(folder) / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
