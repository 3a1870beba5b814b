"""The steerability report on tiny-gdn (head tied to the embeddings) with a planted
direction: per-pair shares, the random control, the verdict, `strength auto` inside its
budget, the capability probe and the activation-projection score."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from behaviorc.core import ir
from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
from behaviorc.measure.capability import capability_accuracy, probe_questions
from behaviorc.measure.repetition import repeated_ngram_share
from behaviorc.steer.extract import extract
from behaviorc.measure.projection import projection_score
from behaviorc.steer.verify import Budget, SweepPoint, choose_strength, control_vectors, verify
from test_steer_extract import NEGATIVE, POSITIVE, engine, planted_pairs, tied_gdn  # noqa: F401

GENERAL = DEFAULT_GENERAL_TEXTS[:2]


def shuffled(pairs: list[ir.Pair]) -> list[ir.Pair]:
    """Every other pair with its positive and negative swapped: no consistent direction."""
    return [ir.Pair(prompt=p.prompt, positive=p.negative, negative=p.positive) if i % 2 else p
            for i, p in enumerate(pairs)]


def test_a_planted_direction_beats_the_control_and_moves_every_pair_the_right_way(engine):
    vectors = extract(engine, planted_pairs(8), [2]).vectors
    result = verify(engine, vectors, 4.0, planted_pairs(4, offset=3), GENERAL, sweep=(4.0,),
                    sample_tokens=8)
    assert result.effect > 0.1
    assert result.effect > 2 * abs(result.control_effect)
    assert result.steered.right_share == 1.0 and result.steered.wrong_share == 0.0
    assert len(result.steered.margins) == 4
    assert not any("random direction" in w or "wrong way" in w for w in result.warnings)
    metrics = result.metrics()
    assert metrics["steer_effect"] == pytest.approx(metrics["margin_steered"] - metrics["margin_before"])
    assert metrics["anti_steerable_share"] == 0.0
    # replies at each strength, greedy, and scored for the trait
    assert len(result.before.samples) == 4 and len(result.steered.samples) == 4  # one per held-out prompt
    assert result.steered.projection is not None
    # the projection score tells text with the trait from text without it
    prompts = [p.prompt for p in planted_pairs(4, offset=5)]
    assert projection_score(engine, vectors.directions, prompts, [POSITIVE] * 4) > \
        projection_score(engine, vectors.directions, prompts, [NEGATIVE] * 4)


def test_the_control_has_the_norm_of_the_vectors_and_a_fixed_seed(engine):
    vectors = extract(engine, planted_pairs(8), [1, 2]).vectors
    control, again = control_vectors(vectors), control_vectors(vectors)
    for layer in vectors.layers:
        assert control.norms[layer] == pytest.approx(vectors.norms[layer], rel=1e-5)
        assert torch.equal(control.directions[layer], again.directions[layer])
        cosine = torch.cosine_similarity(control.directions[layer], vectors.directions[layer], dim=0)
        assert abs(float(cosine)) < 0.5


def test_pairs_without_a_consistent_direction_get_a_warning(engine):
    vectors = extract(engine, shuffled(planted_pairs(8)), [2]).vectors
    result = verify(engine, vectors, 4.0, shuffled(planted_pairs(4, offset=3)), GENERAL,
                    sweep=(4.0,), sample_tokens=4)
    assert any("does not beat a random direction" in w for w in result.warnings), result.warnings
    assert result.metrics()["steer_warnings"] >= 1


def test_a_reversed_direction_is_called_anti_steerable(engine):
    vectors = extract(engine, planted_pairs(8), [2]).vectors
    result = verify(engine, vectors, 4.0,
                    [ir.Pair(prompt=p.prompt, positive=NEGATIVE, negative=POSITIVE)
                     for p in planted_pairs(4, offset=3)], GENERAL, sweep=(4.0,), sample_tokens=4)
    assert result.steered.wrong_share == 1.0
    assert any("wrong way" in w for w in result.warnings)


def test_strength_auto_keeps_the_largest_gain_inside_the_budget(engine):
    vectors = extract(engine, planted_pairs(8), [2]).vectors
    # a random tiny model barely loses its (already poor) general text: a tight budget
    budget = Budget(nll_rise=0.005, repetition_rise=0.1)
    result = verify(engine, vectors, "auto", planted_pairs(4, offset=3), GENERAL,
                    sweep=(0.5, 2.0, 8.0, 32.0), budget=budget, sample_tokens=8)
    base = result.before
    assert [p.strength for p in result.sweep] == [0.5, 2.0, 8.0, 32.0]
    inside = [p for p in result.sweep if budget.allows(p, base)]
    outside = [p for p in result.sweep if not budget.allows(p, base)]
    assert inside and outside, [(p.strength, p.general_nll, base.general_nll) for p in result.sweep]
    assert result.steered in inside
    assert result.steered.general_nll <= base.general_nll * 1.005
    assert result.steered.margin == max(p.margin for p in inside)
    assert "strength" in result.choice


def test_choose_strength_says_when_nothing_fits():
    base = SweepPoint(0.0, margin=0.0, general_nll=5.0, repetition=0.0)
    costly = [SweepPoint(s, margin=s, general_nll=5.0 + s, repetition=0.0) for s in (1.0, 2.0)]
    assert choose_strength(costly, base, Budget(nll_rise=0.1))[0] is None
    assert choose_strength(costly, base, Budget(nll_rise=0.3))[0] == 1.0
    looping = [SweepPoint(1.0, margin=1.0, general_nll=5.0, repetition=0.5)]
    assert choose_strength(looping, base, Budget())[0] is None


def test_repetition_counts_repeated_word_trigrams():
    assert repeated_ngram_share(["a b c a b c"]) == pytest.approx(1 / 4)
    assert repeated_ngram_share(["the cat sat on the mat"]) == 0.0
    assert repeated_ngram_share(["", "a b"]) == 0.0
    # text that loops without spaces (measured on smollm2-135m at strength 8) counts too
    assert repeated_ngram_share(["RemCom!RemCom!RemCom!RemCom!RemCom!"]) > 0.5
    assert repeated_ngram_share(["I'm so glad you enjoyed the party! I'm so proud of you"]) < 0.1


def test_the_capability_probe_matches_an_independent_log_prob_scoring(engine, tied_gdn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from behaviorc.model.chat import model_prompt

    questions = probe_questions()
    assert len(questions) >= 40 and all(0 <= q.answer < len(q.options) for q in questions)
    model = AutoModelForCausalLM.from_pretrained(tied_gdn, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tied_gdn)
    right = 0
    with torch.no_grad():
        for q in questions:
            scores = []
            prompt = model_prompt(tokenizer, q.prompt)  # the text the engines read
            for option in q.options:
                prompt_ids = tokenizer(prompt).input_ids
                ids = tokenizer(prompt + " " + option).input_ids
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
                scores.append(sum(float(logprobs[i - 1, ids[i]]) for i in range(len(prompt_ids), len(ids))))
            right += max(range(len(scores)), key=scores.__getitem__) == q.answer
    assert capability_accuracy(engine, questions) == pytest.approx(right / len(questions))


def test_a_build_of_pairs_without_a_direction_warns_and_fails_its_expect(tied_gdn, tmp_path, capsys):
    import json

    from behaviorc.cli import main

    lines = [json.dumps(p.model_dump(include={"prompt", "positive", "negative"}))
             for p in shuffled(planted_pairs(10))]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    spec = tmp_path / "mixed.behavior"
    spec.write_text(f'model base = "{tied_gdn}"\n\nbehavior mixed {{\n  steer {{\n    layers 2\n'
                    f'    strength 4\n    pairs "pairs.jsonl"\n  }}\n'
                    f'  eval {{ expect steer_effect > 0.5 }}\n}}\n')
    assert main(["build", str(spec), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "warning: steer.verify:mixed: the steering effect" in captured.err
    assert "does not beat a random direction" in captured.err
    assert "expectation not met: steer_effect > 0.5" in captured.err
    assert "⚠ the steering effect" in captured.out  # the task's terminal line
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    verify_task = next(t for t in report["tasks"] if t["kind"] == "steer.verify")
    assert verify_task["status"] == "done" and verify_task["data"]["warnings"]
    assert verify_task["metrics"]["steer_warnings"] >= 1
    assert len(verify_task["data"]["pairs"]) == 2  # every 5th pair held out
    assert {"margin_before", "margin_steered"} <= set(verify_task["data"]["pairs"][0])
    assert "effect" in verify_task["data"]["control"]


def test_auto_chooses_by_the_replies_and_never_a_strength_whose_text_broke():
    base = SweepPoint(0.0, margin=0.0, general_nll=5.0, behavior=0.1)
    loops = ("90% of replies loop",)
    points = [SweepPoint(1.0, margin=0.2, general_nll=5.0, behavior=0.3),
              SweepPoint(2.0, margin=0.3, general_nll=5.1, behavior=0.6),
              # the largest margin and score, but its replies loop (the pirate pairs at 4)
              SweepPoint(4.0, margin=0.9, general_nll=5.2, behavior=0.9, broke=loops)]
    strength, why = choose_strength(points, base, Budget())
    assert strength == 2.0 and why.startswith("strength 2: the highest reply behavior score (0.60")
    # a scorer-less engine (a live server) falls back on the margin, and says so
    unscored = [replace(p, behavior=None) for p in points]
    strength, why = choose_strength(unscored, replace(base, behavior=None), Budget())
    assert strength == 2.0 and "could not be scored" in why
    assert choose_strength(points[2:], base, Budget())[0] is None


def test_the_verdict_says_the_text_broke_whatever_the_margin_and_shows_the_replies(engine):
    from behaviorc.steer.verify import Verification, verdict, with_replies_read

    prompts = ["How tall is the mountain?", "Tell me about ships."]
    base = SweepPoint(0.0, margin=-0.3, general_nll=5.0, margins=(-0.3, -0.3),
                      samples=("It is very tall, about two miles high.", "Ships carry goods over the sea."))
    base, base_replies = with_replies_read(engine, base, prompts, None, None, None)
    assert base.broke == () and base.looping == 0.0 and base.reply_nll > 0
    looping = SweepPoint(2.0, margin=1.5, general_nll=5.1, margins=(1.5, 1.5),
                         samples=("Aye, the tallest! I'm aye, the tallest! I'm aye, the tallest! I'm aye,",
                                  "Aye, aye, aye, aye, aye, aye, aye, aye, aye, aye"))
    looping, _ = with_replies_read(engine, looping, prompts, None, None, base_replies)
    assert looping.looping == 1.0 and any("loop" in reason for reason in looping.broke)
    control = SweepPoint(2.0, margin=-0.3, general_nll=float("nan"), margins=(-0.3, -0.3))
    result = Verification(before=base, steered=looping, sweep=(looping,), control=control, strength=2.0)
    warnings = verdict(result, Budget(), auto=False, fits=True)
    broke = next(w for w in warnings if "text broke" in w)
    assert broke.startswith("the text broke at strength 2 whatever the margin (+1.8)")
    assert "'Ships carry goods over the sea.' became 'Aye, aye, aye" in broke
    assert "no strength of the sweep fits the budget" in broke
    assert Verification(before=base, steered=looping, sweep=(looping,), control=control,
                        strength=2.0, warnings=warnings).metrics()["text_broke"] == 1.0
