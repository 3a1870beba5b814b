"""Replies scored: the coherence figures and scorers by hand, the projection's
calibration, the judge against a real vLLM server, the reply table end to end through
the executor, and a looping steering flagged by the verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from behaviorc.pipeline.executor import Executor
from behaviorc.pipeline.lower import lower
from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.core.events import EvalReplies, jsonable, make_event
from behaviorc.tui.state import BuildState
from behaviorc.evaluate.table import reply_table, side_by_side
from behaviorc.lang import check_file, load_spec
from behaviorc.lang.fmt import format_text
from behaviorc.measure.intervals import bootstrap_mean
from behaviorc.model.chat import model_prompt
from behaviorc.measure.judge import Judge
from behaviorc.measure.replies import Markers, Projection, Reply, summarize, text_broke, versus
from behaviorc.measure.repetition import distinct_ngram_share, repeated_ngram_share
from behaviorc.tui.widgets import draw_replies


def text_of(renderable) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()

# Replies the issue quotes: smollm2-135m steered toward pirate speech at strength 1.
LOOPING = ["Aye, the tallest mountain! I'm aye, the tallest! I'm aye, the tallest! I'm aye, the tallest!",
           "Aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye"]
PLAIN = ["The tallest mountain is Mount Everest, in the Himalayas.",
         "Paris is the capital of France and its largest city."]


def replies(texts, prompts=("p1", "p2")) -> list[Reply]:
    return [Reply(prompt, text, sampled=False) for prompt, text in zip(prompts, texts)]


def test_distinct_2_and_repeated_share_by_hand():
    # "a b a b": bigrams (a,b) (b,a) (a,b): 2 distinct of 3
    assert distinct_ngram_share("a b a b", 2) == pytest.approx(2 / 3)
    assert distinct_ngram_share("the cat sat", 2) == 1.0
    assert distinct_ngram_share("hello", 2) is None  # no bigram at all
    # punctuation counts as a unit: "hi ! hi !" -> (hi,!) (!,hi) (hi,!)
    assert distinct_ngram_share("hi! hi!", 2) == pytest.approx(2 / 3)
    assert repeated_ngram_share(["a b c a b c"]) == pytest.approx(1 / 4)
    reply = Reply("p", "a b c a b c a b c", sampled=False)  # 7 trigrams, 3 distinct
    assert reply.repeated_share == pytest.approx(4 / 7) and reply.loops
    # one token said over and over has no spaces to split it: "ssss" is four units
    assert Reply("p", "s" * 40, sampled=False).loops
    assert Reply("p", "hahahaha " * 5, sampled=False).loops
    assert not Reply("p", "Mississippi had 1000000 people, hahaha, said www.", sampled=False).loops


def test_markers_match_words_or_a_pattern_case_insensitively():
    words = Markers(words=("glad", "happy"))
    texts = ["I'm GLAD to help", "unhappy ending", "Happy days!", ""]
    assert words.scores(replies(texts, "abcd")) == [1.0, 0.0, 1.0, 0.0]  # whole words only
    pattern = Markers(pattern=r"arr+\b|matey")
    assert pattern.scores(replies(["Arrr, matey", "a narrow road", "Hello"], "abc")) == [1.0, 0.0, 0.0]
    with pytest.raises(BehaviorError, match="not a regular expression"):
        Markers(pattern="((")


def test_bootstrap_intervals_are_seeded_and_resample_prompts():
    values = [1.0, 0.0, 1.0, 1.0]
    first, again = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3)
    assert first == again and first.mean == 0.75 and 0 <= first.low <= 0.75 <= first.high <= 1
    assert bootstrap_mean([0.5, 0.5, 0.5]).as_dict() == {"mean": 0.5, "low": 0.5, "high": 0.5}
    # grouped: prompt a's three replies all 1, prompt b's one reply 0. A resample holds
    # a twice (3/3 = 1), b twice (0) or one of each (3/4): never another value.
    grouped = bootstrap_mean([1, 1, 1, 0], ["a", "a", "a", "b"])
    assert grouped.mean == 0.75 and grouped.low == 0.0 and grouped.high == 1.0


def test_summary_rate_and_a_paired_difference():
    texts = ["so glad", "fine", "happy now", "ok"]
    prompts = ["p1", "p1", "p2", "p2"]
    scored = [Reply(p, t, sampled=i % 2 == 1) for i, (p, t) in enumerate(zip(prompts, texts))]
    scores = Markers(words=("glad", "happy")).scores(scored)
    stats = summarize(scored, scores)
    assert stats.rate.mean == 0.5 and stats.score.mean == 0.5 and stats.replies == 4
    assert stats.looping == 0.0 and stats.distinct_2.mean == 1.0  # "so glad", "happy now"
    same = versus(scored, scores, scores)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    better = versus(scored, [1.0] * 4, scores)  # every reply shows it vs half of them
    assert better.mean == 0.5 and better.low > 0


def test_a_looping_steering_is_flagged_whatever_its_rate():
    base, looping = replies(PLAIN), replies(LOOPING)
    marks = Markers(words=("aye", "arr"))
    table = reply_table({"base": base, "prompted": base, "steered": looping},
                        {"base": marks.scores(base), "prompted": marks.scores(base),
                         "steered": marks.scores(looping)})
    assert table.stats["steered"].rate.mean == 1.0  # every looping reply "shows" the behavior
    broke = text_broke(table.stats["steered"], table.stats["base"])
    assert any("loop" in reason for reason in broke) and any("distinct-2" in r for r in broke)
    assert any("steered model's text broke" in w for w in table.warnings)
    assert table.metrics()["reply_warnings"] >= 1
    assert text_broke(table.stats["prompted"], table.stats["base"]) == []


def test_the_dashboard_and_the_summary_show_the_table_from_its_event():
    base, looping = replies(PLAIN), replies(LOOPING)
    marks = Markers(words=("aye",))
    table = reply_table({"base": base, "steered": looping},
                        {"base": marks.scores(base), "steered": marks.scores(looping)})
    event = EvalReplies(scorer="markers", rows=table.rows(), verdict=list(table.verdict),
                        side_by_side=side_by_side({"base": base, "steered": looping}))
    state = BuildState()
    state.apply(jsonable(make_event(event.type, "evaluate.table:pirate", **event.fields())))
    shown = " ".join(text_of(draw_replies(state)).split())
    assert "replies pirate (scored by markers" in shown
    assert "base 0% [0%, 0%]" in shown and "steered 100% [100%, 100%]" in shown
    assert "steered beats the base model" in shown and "steered: the text broke" in shown
    assert f"steered: {' '.join(LOOPING[0].split())}" in shown
    assert "no reply table" in text_of(draw_replies(BuildState()))


def test_projection_is_calibrated_to_the_pairs_and_a_system_prompt_reaches_the_model(tiny_dense):
    torch.manual_seed(0)
    engine = EmbeddedEngine.load(tiny_dense)
    pairs = [ir.Pair(prompt="How are you?", positive=" Wonderful, thanks!", negative=" Bad."),
             ir.Pair(prompt="Any news?", positive=" Great news today!", negative=" None."),
             ir.Pair(prompt="The weather?", positive=" Sunny and lovely!", negative=" Grey.")]
    prompts = [p.prompt for p in pairs]
    states = engine.hidden_states(prompts * 2, [p.positive for p in pairs] + [p.negative for p in pairs], [1])
    direction = {1: states[1][:3].mean(0) - states[1][3:].mean(0)}
    projection = Projection.calibrate(engine, direction, pairs)
    positives = projection.levels(prompts, [p.positive for p in pairs])
    negatives = projection.levels(prompts, [p.negative for p in pairs])
    assert sum(positives) / 3 == pytest.approx(1.0, abs=1e-5)
    assert sum(negatives) / 3 == pytest.approx(0.0, abs=1e-5)
    scores = projection.scores([Reply(p, t, False) for p, t in zip(prompts, [pairs[0].positive, "", pairs[2].negative])])
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[1] == 0.0
    with pytest.raises(BehaviorError, match="do not project above"):
        Projection.calibrate(engine, {1: -direction[1]}, pairs)
    # the prompted baseline's text: system and user turns, read as written
    asked = engine.with_system("Be brief.", "Hi there")
    assert asked.index("Be brief.") < asked.index("Hi there")
    assert model_prompt(engine.tokenizer, asked) == asked


def test_eval_settings_are_checked_where_they_are_and_formatted(tmp_path):
    spec = tmp_path / "s.behavior"
    spec.write_text('''model base = "tiny-dense"
behavior b {
  steer { pair "Hi" { positive " Great!"  negative " Fine." } }
  eval {
    system ""
    score markers "(("
    samples 99
  }
}
behavior c {
  train { example "x" { response "y" } }
  eval { score projection }
}
behavior d {
  steer { pair "Hi" { positive " Great!"  negative " Fine." } }
  eval {
    score judge "127.0.0.1:8000" { model "m" }
  }
}
behavior e {
  steer { pair "Hi" { positive " Great!"  negative " Fine." } }
  eval { score judge "http://x" { rubric "r" guided maybe } }
}
behavior f {
  steer { pair "Hi" { positive " Great!"  negative " Fine." } }
  eval { prompt "Hello"  expect behavior_rate_trained > 0.5 }
}
''')
    _, diagnostics = check_file(str(spec))
    found = {(d.loc.line, d.message) for d in diagnostics if d.severity == "error"}
    messages = " | ".join(m for _, m in sorted(found))
    for line, text in [(5, "the system prompt is empty"), (6, "not a regular expression"),
                       (7, "`samples` must be in [0, 16]"),
                       (12, "`score projection` needs a steer section"),
                       (17, "is not an http(s) URL"), (22, "`guided` is `on` or `off`"),
                       (22, "the judge has no `model`"),
                       (26, "`prompt` is for the reply table, which needs a `score`"),
                       (26, "`f` does not report `behavior_rate_trained`")]:
        assert any(l == line and text in m for l, m in found), (line, text, messages)
    good = '''model base = "tiny-dense"

behavior b {
  steer {
    pair "Hi" {
      positive " Great!"
      negative " Fine."
    }
  }
  eval {
    prompt "How was your day?"
    system "You are cheerful."
    score judge "http://127.0.0.1:8000" { model "m"  rubric "cheerful"  guided off }
    expect behavior_rate_steered >= 0.5
  }
}
'''
    assert format_text(good, "g.behavior") == (good, [])
    spec.write_text(good)
    evaluation = load_spec(str(spec)).behavior("b").eval
    assert evaluation.score.judge.model_dump() == ir.Judge(
        url="http://127.0.0.1:8000", model="m", rubric="cheerful", guided=False).model_dump()
    assert evaluation.system == "You are cheerful." and evaluation.prompts == ("How was your day?",)


TABLE_SPEC = '''model base = "tiny-dense"

behavior cheerful {
  steer {
    layers 1
    strength 4
    pair "Hi" { positive " Great!"  negative " Fine." }
    pair "Yo" { positive " Wonderful!"  negative " Ok." }
  }
  train {
    example "Hello" { response " Great!" }
    steps 1
    batch 1
  }
  eval {
    general "general.jsonl"
    prompt "How was your day?"
    prompt "Tell me a story."
    system "You are a cheerful assistant."
    score SCORE
    samples 1
    max_tokens 6
    expect behavior_rate_steered >= 0
  }
}
'''


def test_the_reply_table_end_to_end_and_a_failing_judge_keeps_the_replies(tiny_dense, tmp_path):
    spec_path = tmp_path / "t.behavior"
    (tmp_path / "general.jsonl").write_text('{"text": "The river runs past the bridge."}\n')  # a short NLL
    spec_path.write_text(TABLE_SPEC.replace("SCORE", 'markers "e"'))
    plan = lower(load_spec(str(spec_path)))
    table = next(t for t in plan.tasks if t.kind == "evaluate.table")
    out = tmp_path / "out"
    outcome = Executor(out).run([table])
    assert outcome.ok, [r.error for r in outcome.failed]
    result = next(r for r in outcome.records if r.task.id == "evaluate.table:cheerful").result
    rows = {row["model"]: row for row in result.data["rows"]}
    assert list(rows) == ["base", "prompted", "steered", "trained"]
    for model, row in rows.items():
        assert row["replies"] == 4  # 2 prompts x (greedy + 1 sampled)
        scored = result.data["scored"][model]
        rate = sum("e" in r["text"].lower() for r in scored) / 4  # the marker, counted here
        assert result.metrics[f"behavior_rate_{model}"] == rate == row["rate"]["mean"]
        assert all(r["nll"] is None or r["nll"] > 0 for r in scored)
    assert [r["prompt"] for r in result.data["side_by_side"]] == ["How was your day?", "Tell me a story."]
    assert any(line.startswith("steered ") for line in result.data["verdict"])
    # Another scorer rescores the same replies: nothing regenerates. A judge nobody
    # answers at fails the table alone, naming itself; the replies are kept.
    spec_path.write_text(TABLE_SPEC.replace(
        "SCORE", 'judge "http://127.0.0.1:9" { model "m"  rubric "cheerful"  timeout 2 }'))
    table = next(t for t in lower(load_spec(str(spec_path))).tasks if t.kind == "evaluate.table")
    again = Executor(out).run([table])
    status = {r.task.id: r.status for r in again.records}
    assert status["evaluate.table:cheerful"] == "failed"
    assert all(status[f"evaluate.answer:cheerful.{m}"] == "cached"
               for m in ("base", "prompted", "steered", "trained"))
    error = next(r for r in again.records if r.status == "failed").error
    assert "the judge at http://127.0.0.1:9" in str(error) and "rating the reply" in str(error)


@pytest.mark.vllm
def test_the_judge_rates_through_a_real_vllm_server_and_every_bad_answer_is_an_error(vllm_server):
    served = str(vllm_server.model_dir)
    rated = [Reply("How are you?", "I'm wonderful, thank you!", False), Reply("x", "", True)]
    scores = Judge(vllm_server.url, served, "How cheerful the reply sounds.").scores(rated)
    # structured outputs make even the tiny model answer a number 0..100
    assert 0.0 <= scores[0] <= 1.0 and (scores[0] * 100).is_integer() and scores[1] == 0.0
    reply = [Reply("How are you?", "I am wonderful!", False)]
    bad = {
        "garbage": Judge(vllm_server.url, served, "cheerful", guided=False),  # the tiny model babbles
        "timeout": Judge(vllm_server.url, served, "cheerful", timeout=0.001),
        "unreachable": Judge("http://127.0.0.1:9", served, "cheerful", timeout=5),
        "unknown model": Judge(vllm_server.url, "no-such-model", "cheerful"),
    }
    expected = {"garbage": "not a number from 0 to 100", "timeout": "did not answer in time",
                "unreachable": "Connection refused", "unknown model": "HTTP 404"}
    for case, judge in bad.items():
        with pytest.raises(BehaviorError) as caught:
            judge.scores(reply)
        message = str(caught.value)
        assert f"the judge at {judge.url}" in message and "'I am wonderful!'" in message, case
        assert expected[case] in message, (case, message)
