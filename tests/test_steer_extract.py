"""Extraction on tiny-gdn with planted pairs, through the embedded engine."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, Location
from behaviorc.measure.margin import behavior_margin
from behaviorc.steer.extract import (LayerScore, best_layer, check_pairs, choice, choice_warnings,
                                     direction, extract, read_pairs, score_layers)

SUBJECTS = ["I", "You", "We", "The model", "The user", "The parser", "The test", "The assistant"]
VERBS = ["will use", "should write", "can read", "might change", "wants"]
OBJECTS = ["the plan", "the tests", "the data", "short answers", "the old code"]
# Planted contrast: every positive answers " Yes. Yes.", every negative " No. No.".
POSITIVE, NEGATIVE = " Yes. Yes.", " No. No."


def planted_pairs(count: int, offset: int = 0) -> list[ir.Pair]:
    prompts = [f"{s} {v} {o}?" for s in SUBJECTS for v in VERBS for o in OBJECTS]
    chosen = prompts[offset::7][:count]
    return [ir.Pair(prompt=p, positive=POSITIVE, negative=NEGATIVE) for p in chosen]


@pytest.fixture(scope="session")
def tied_gdn(tiny_gdn, tmp_path_factory):
    """tiny-gdn with its output head set to its input embeddings.

    A random model's untied head maps the residual stream to logits in directions that
    have nothing to do with the tokens, so no hidden-state direction can be expected to
    raise one completion's probability (measured: the margin moves with either sign).
    With head = embeddings, the representation of " Yes" predicts " Yes", as in a trained
    model, so "steering raises the margin" is a property the test can demand.
    """
    folder = tmp_path_factory.mktemp("tiny-gdn-tied") / "model"
    shutil.copytree(tiny_gdn, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def engine(tied_gdn):
    from behaviorc.engine.embedded import EmbeddedEngine

    return EmbeddedEngine.load(tied_gdn, name="tiny-gdn-tied")


def test_direction_raises_the_held_out_margin_with_the_right_sign(engine):
    train, held = planted_pairs(8), planted_pairs(4, offset=3)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    before = behavior_margin(engine, held)
    for method in ("mean_diff", "pca"):
        vectors = extract(engine, train, [2], method=method, read="mean").vectors
        assert vectors.layers == (2,) and vectors.method == method
        try:
            engine.set_steering(vectors.directions, 4.0)
            raised = behavior_margin(engine, held)
            engine.set_steering(vectors.directions, -4.0)
            lowered = behavior_margin(engine, held)
        finally:
            engine.clear_steering()
        assert raised > before + 0.1, method
        assert lowered < before - 0.1, method
    assert behavior_margin(engine, held) == pytest.approx(before, abs=1e-6)


def test_pca_and_mean_diff_agree_in_sign(engine):
    positives, negatives = read_pairs(engine, planted_pairs(8), [1, 3], "last")
    for layer in (1, 3):
        mean_diff = direction(positives[layer], negatives[layer], "mean_diff")
        pca = direction(positives[layer], negatives[layer], "pca")
        assert torch.cosine_similarity(mean_diff, pca, dim=0) > 0.5
        # positives project higher along the PCA direction
        assert float(((positives[layer] - negatives[layer]) @ pca).mean()) > 0


def test_pca_sign_is_fixed_by_the_pairs_not_by_the_solver():
    generator = torch.Generator().manual_seed(0)
    negatives = torch.randn(8, 16, generator=generator)
    shift = torch.zeros(16)
    shift[3] = 2.0
    positives = negatives + shift + 0.01 * torch.randn(8, 16, generator=generator)
    for pos, neg, sign in ((positives, negatives, 1.0), (negatives, positives, -1.0)):
        found = direction(pos, neg, "pca")
        assert sign * float(found[3]) > 1.9  # scaled to the mean difference along it


def test_reading_in_length_buckets_matches_reading_one_by_one(engine):
    pairs = planted_pairs(3) + [ir.Pair(prompt="Hi", positive=" Yes.", negative=" No thanks, not now.")]
    batched, _ = read_pairs(engine, pairs, [2], "mean", batch_size=3)
    for i, pair in enumerate(pairs):
        single = engine.hidden_states([pair.prompt], [pair.positive], [2], "mean")[2][0]
        assert torch.allclose(batched[2][i], single, atol=1e-5)


def test_auto_scores_every_layer_and_reports_the_choice(engine):
    result = extract(engine, planted_pairs(8), "auto", read="mean")
    assert [s.layer for s in result.scores] == list(range(engine.info.num_layers))
    measured = [s for s in result.scores if s.effect is not None]
    # tiny-gdn has 4 layers: every layer but 0 is a candidate, each steered held out
    assert [s.layer for s in measured] == [1, 2, 3]
    best = max(measured, key=lambda s: s.distillable)
    assert result.vectors.layers == (best.layer,)
    assert best.effect > 0.05 and best.consistency > 0.9 and best.accuracy == 1.0
    for score in measured:  # the lift is the positives' part of the margin gain
        assert score.lift is not None and score.distillable == min(score.effect, score.lift)
    assert all(s.lift is None for s in result.scores if s.effect is None)


def test_auto_picks_the_layer_where_held_out_pairs_separate():
    generator = torch.Generator().manual_seed(1)
    negatives = {layer: torch.randn(12, 16, generator=generator) for layer in range(4)}
    positives = {layer: negatives[layer] + torch.randn(12, 16, generator=generator) for layer in range(4)}
    shift = torch.zeros(16)
    shift[0] = 3.0
    positives[2] = negatives[2] + shift + 0.3 * torch.randn(12, 16, generator=generator)
    scores = score_layers(positives, negatives)
    assert best_layer(scores) == 2
    assert scores[2].accuracy == 1.0 and scores[2].consistency > 0.9
    # noise layers score by chance (spread about 0.4 with 6 held-out pairs a fold)
    assert max(s.consistency for s in scores if s.layer != 2) < scores[2].consistency - 0.2


def test_auto_never_picks_layer_zero_when_another_layer_exists():
    scores = [LayerScore(0, 1.0, 1.0), LayerScore(1, 0.5, 0.8)]
    assert best_layer(scores) == 1
    assert best_layer(scores[:1]) == 0


def test_progress_is_reported_per_batch_and_per_candidate_layer(engine):
    seen = []
    extract(engine, planted_pairs(6), [1], batch_size=4, progress=lambda *p: seen.append(p))
    assert seen == [(1, 3, "reading hidden states"), (2, 3, "reading hidden states"),
                    (3, 3, "reading hidden states")]
    seen.clear()
    extract(engine, planted_pairs(6), "auto", batch_size=16, progress=lambda *p: seen.append(p))
    phases = [what.split(" layer ")[0] for _, _, what in seen[1:]]
    candidates = len(phases) // 2
    assert seen[0] == (1, 1, "reading hidden states") and candidates >= 1
    assert phases == (["steering candidate"] * candidates + ["replies steered at candidate"] * candidates)
    assert [done for done, _, _ in seen[1:]] == list(range(2 * candidates))


LOC = Location(file="listen.behavior", line=4, column=5, end_line=4, end_column=15)


def test_a_layer_out_of_range_for_the_model_is_located(engine):
    with pytest.raises(BehaviorError) as caught:
        extract(engine, planted_pairs(3), [1, 4], loc=LOC)
    assert "layer 4 is out of range" in str(caught.value) and "0..3" in str(caught.value)
    assert caught.value.diagnostics[0].loc == LOC


@pytest.mark.parametrize("pair, message", [
    (ir.Pair(prompt="Q?", positive="", negative=" no"), "`positive` is empty"),
    (ir.Pair(prompt="Q?", positive=" yes", negative="  "), "`negative` is empty"),
    (ir.Pair(prompt="", positive=" yes", negative=" no"), "`prompt` is empty"),
    (ir.Pair(prompt="Q?", positive=" same", negative=" same"), "same text"),
])
def test_bad_pairs_are_located(pair, message):
    with pytest.raises(BehaviorError, match=message) as caught:
        check_pairs([ir.Pair(prompt="ok", positive=" a", negative=" b"), pair], LOC)
    assert "pair 2" in str(caught.value)
    assert caught.value.diagnostics[0].loc == LOC


def test_auto_needs_two_pairs(engine):
    with pytest.raises(BehaviorError, match="at least 2"):
        extract(engine, planted_pairs(1), "auto", loc=LOC)


def test_auto_prefers_the_layer_that_steers_over_the_one_that_separates():
    scores = [LayerScore(1, 0.99, 1.0, effect=0.1, lift=0.1), LayerScore(2, 0.8, 0.9, effect=0.6, lift=0.5),
              LayerScore(3, 0.999, 1.0)]
    assert best_layer(scores) == 2
    assert best_layer([LayerScore(1, 0.5, 1.0), LayerScore(2, 0.7, 1.0)]) == 2  # none measured


def test_auto_keeps_the_layer_whose_replies_score_highest_among_those_that_lift_the_positives():
    # smollm2-135m, the demo's cheerful pairs (steer.extract's scores in report.json):
    # layer 21's replies score highest, but its steering makes the plain completions
    # unlikely rather than the cheerful ones likely; of the rest, 23's replies score highest
    scores = [LayerScore(1, 0.98, 1.0, effect=0.238, lift=0.033, behavior=0.54),
              LayerScore(21, 0.97, 1.0, effect=0.645, lift=-0.027, behavior=0.76),
              LayerScore(22, 0.98, 1.0, effect=0.591, lift=0.073, behavior=0.52),
              LayerScore(23, 0.97, 1.0, effect=0.469, lift=0.186, behavior=0.69)]
    assert best_layer(scores) == 23
    said = choice(scores, 23)
    assert said.startswith("layer 23: its steered replies score highest for the behavior (0.69)")
    assert "left out, their steering made the unwanted completions unlikely" in said
    assert "layer 21 (margin +0.645, positives -0.027)" in said
    # the reply score decides over a larger distillable effect (23's is 0.186, 22's 0.073)
    assert best_layer([replace(scores[3], behavior=0.5), scores[2]]) == 22
    # a layer whose text broke is no choice however its replies score
    assert best_layer([replace(scores[2], behavior=0.9, broke=("50% of replies loop",)), scores[3]]) == 23


def test_auto_prefers_the_effect_that_makes_the_wanted_completions_likelier():
    # smollm2-135m, the demo's cheerful pairs: 21 steers most by making the negatives
    # unlikely and distils 40% of its gain; 22 lifts the positives and distils 108%
    unwanted_falls = LayerScore(21, 0.97, 1.0, effect=0.52, lift=0.08)
    wanted_rises = LayerScore(22, 0.98, 1.0, effect=0.45, lift=0.27)
    assert best_layer([unwanted_falls, wanted_rises]) == 22
    # a lift beyond the margin gain (the negatives rose too) counts only as the gain
    both_rise = LayerScore(23, 0.98, 1.0, effect=0.2, lift=0.9)
    assert both_rise.distillable == 0.2
    assert best_layer([both_rise, wanted_rises]) == 22
    said = choice([unwanted_falls, wanted_rises], 22)
    assert said.startswith("layer 22: the largest distillable effect (+0.27")
    # no layer lifts the positives (the pirate pairs on smollm2-135m): a warning that names
    # the layer, for the task's terminal line
    falling = [LayerScore(20, 0.9, 1.0, effect=0.3, lift=-0.1), LayerScore(21, 0.9, 1.0, effect=0.2, lift=-0.4)]
    assert choice_warnings(falling, 20) == (
        "layer 20 chosen, but no layer steered made the positives likelier (best lift -0.1): "
        "distilling this steering may carry little of its effect into the weights",)
    assert choice_warnings([unwanted_falls, wanted_rises], 22) == ()
    # a layer whose steered replies broke is no choice, whatever its effect
    looping = LayerScore(24, 0.99, 1.0, effect=0.9, lift=0.5, broke=("75% of replies loop",))
    assert best_layer([looping, wanted_rises]) == 22
    assert "left out, their steered replies broke: layer 24 (75% of replies loop)" in \
        choice([looping, wanted_rises], 22)
    assert best_layer([looping]) == 24 and "every candidate layer's replies broke" in \
        choice_warnings([looping], 24)[0]
