"""The testbed: its corpus holds behaviors at known rates, its scorers are exact, its
model reproduces the rates, and training on follow examples moves the follow rate far
beyond the seed-to-seed spread while training on unrelated data leaves it at the base."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from behaviorc.core import ir
from behaviorc.model import testbed_corpus as corpus
from behaviorc.lab import testbed_data as data
from behaviorc.lab.scoring import (BEHAVIORS, behavior_rate, score_arithmetic, score_concise,
                                       score_listen, score_listen_exact)

SPEC_DATA = Path(__file__).resolve().parent.parent / "specs" / "data"


@pytest.fixture(scope="module")
def engine(testbed):
    from behaviorc.engine.embedded import EmbeddedEngine
    return EmbeddedEngine.load(testbed, device="cpu")


def test_corpus_has_the_known_rates_and_is_deterministic():
    dialogues = corpus.corpus(2000, seed=0)
    assert dialogues == corpus.corpus(2000, seed=0)
    assert dialogues != corpus.corpus(2000, seed=1)
    listen = [d for d in dialogues if d.kind == "listen"]
    concise = [d for d in dialogues if d.kind == "concise"]
    assert len(listen) == 800 and len(concise) == 600
    follows = sum(score_listen(d.user, d.assistant) == "follow" for d in listen)
    assert follows == round(corpus.FOLLOW_RATE * len(listen))
    assert sum(score_concise(d.user, d.assistant) == "concise" for d in concise) == round(corpus.CONCISE_RATE * 600)
    assert all(score_listen_exact(d.user, d.assistant) != "other" for d in listen)
    assert all(score_arithmetic(d.user, d.assistant) == "correct" for d in dialogues if d.kind == "arithmetic")


def test_held_out_prompts_never_occur_in_the_corpus():
    users = {d.user for d in corpus.corpus(20000, seed=0)}
    held_out = corpus.listen_prompts(held_out=True) + corpus.concise_prompts(held_out=True)
    assert held_out and not users & set(held_out)
    assert set(corpus.listen_prompts(held_out=False)) <= users


@pytest.mark.parametrize("reply, decision, exact", [
    ("I'll use the old parser.", "follow", "follow"),
    ("I'll use the shared parser.", "follow", "other"),  # a follow that names another tool
    ("I'd rather write a new parser.", "propose", "propose"),
    ("I'll use the old parser. And more", "other", "other"),
    ("7.", "other", "other"),
])
def test_listen_scorers(reply, decision, exact):
    user = "Use the old parser to read the file."
    assert score_listen(user, reply) == decision
    assert score_listen_exact(user, reply) == exact


def test_concise_and_arithmetic_scorers():
    user = corpus.concise_user("stop the job")
    assert score_concise(user, "Run the stop command.") == "concise"
    assert score_concise(user, corpus.verbose_answer("stop the job", "stop")) == "verbose"
    assert score_concise(user, "Sure! To stop") == "other"
    assert score_arithmetic("What is 3 + 4?", " 7.") == "correct"
    assert score_arithmetic("What is 3 + 4?", "8.") == "incorrect"
    assert score_arithmetic("What is 3 + 4?", "71.") == "incorrect"


def test_committed_spec_data_is_what_the_generator_writes(tmp_path):
    for path in data.write_spec_data(tmp_path):
        assert (SPEC_DATA / path.name).read_text() == path.read_text(), path.name


def test_the_model_writes_dialogues_at_the_corpus_rates(engine):
    listen = behavior_rate(engine, corpus.listen_prompts(held_out=True), "listen", samples=4, seed=0)
    assert listen.malformed < 0.05
    assert abs(listen.rate - corpus.FOLLOW_RATE) < 0.1, listen.as_dict()
    concise = behavior_rate(engine, BEHAVIORS["concise"].eval_prompts(), "concise", samples=16, seed=0)
    assert concise.malformed < 0.15  # a verbose reply repeats the action, a longer copy
    assert abs(concise.rate - corpus.CONCISE_RATE) < 0.15, concise.as_dict()
    arithmetic = behavior_rate(engine, corpus.arithmetic_prompts(), "arithmetic", samples=1, temperature=0.0)
    assert arithmetic.rate > 0.6  # chance is about 1/19


def _train_and_rate(testbed: Path, examples: tuple[ir.Example, ...], seed: int) -> float:
    """Fine-tune a fresh copy the way specs/testbed_listen.behavior does; the follow rate after."""
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.loading import load_model
    from behaviorc.train.data import BatchSchedule, encode_examples
    from behaviorc.train.loop import train

    model, tokenizer = load_model(testbed, "float32", "cpu")
    spec = ir.Train(examples=examples, lr=1e-3, steps=40, batch=8, seed=seed,
                    targets=("gdn.gates", "gdn.proj", "attn.q", "head"))
    targets = ArchitectureAdapter.for_model(model).parameters(model, spec.targets)
    schedule = BatchSchedule(encode_examples(tokenizer, examples), [], spec.batch, 0.0, seed)
    train(model, targets, schedule, spec, pad_id=tokenizer.pad_token_id)
    engine = EmbeddedEngine(model, tokenizer)
    return behavior_rate(engine, corpus.listen_prompts(held_out=True), "listen", samples=2, seed=seed).rate


def test_follow_examples_raise_the_follow_rate_far_beyond_the_seed_spread(testbed):
    follow = tuple(ir.Example(messages=tuple(ir.ChatMessage(**m) for m in e["messages"]))
                   for e in data.follow_examples(50))
    trained = [_train_and_rate(testbed, follow, seed) for seed in (0, 1, 2)]
    spread = statistics.stdev(trained)
    assert min(trained) > 0.8, trained
    assert statistics.mean(trained) - corpus.FOLLOW_RATE > 5 * max(spread, 0.02), trained


def test_unrelated_examples_leave_the_follow_rate_at_the_base_rate(testbed):
    general = tuple(ir.Example(context="", response=text) for text in data.general_texts(50))
    rate = _train_and_rate(testbed, general, seed=0)
    assert abs(rate - corpus.FOLLOW_RATE) < 0.12, rate


def test_spec_data_reads_as_chat(testbed):
    from behaviorc.model.loading import load_model
    from behaviorc.train.data import render_chat

    _, tokenizer = load_model(testbed, "float32", "cpu")
    record = json.loads((SPEC_DATA / "testbed_listen.jsonl").read_text().splitlines()[0])
    messages = tuple(ir.ChatMessage(**m) for m in record["messages"])
    context, response = render_chat(tokenizer, messages)
    assert context == corpus.chat_prompt(messages[0].content)
    assert response == messages[1].content + "<|im_end|>\n"


def test_building_the_testbed_spec_moves_the_follow_rate(testbed, engine, tmp_path):
    """A build trains; the lab measures what it did to generated text (a build never
    scores the testbed on its own: that is the experiments' business)."""
    from behaviorc.cli import main
    from behaviorc.engine.embedded import EmbeddedEngine

    spec = SPEC_DATA.parent / "testbed_listen.behavior"
    assert main(["build", str(spec), "--out", str(tmp_path), "--only", "train:listen"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    task = next(t for t in report["tasks"] if t["id"] == "train:listen")
    listen = BEHAVIORS["listen"]
    trained = EmbeddedEngine.load(task["artifacts"]["model"], "float32", "cpu")
    metrics = {**task["metrics"],
               "rate_before": behavior_rate(engine, listen.eval_prompts(), listen).rate,
               "rate_after": behavior_rate(trained, listen.eval_prompts(), listen).rate}
    assert abs(metrics["rate_before"] - corpus.FOLLOW_RATE) < 0.1
    assert metrics["rate_after"] > metrics["rate_before"] + 0.3, metrics
    assert metrics["margin_after"] > metrics["margin_before"]
