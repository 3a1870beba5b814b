"""Distillation on tiny-gdn with planted pairs: steer, sample, train the plain model, remove
the steering; and the live hand-off against a real vLLM server."""

from __future__ import annotations

import pytest
import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import Location
from behaviorc.train.distill_data import distill_data, keep_best
from behaviorc.train.general_texts import GENERAL_TEACHING_TEXTS
from behaviorc.train.handoff import lowered_strength, trained_tensors
from behaviorc.pipeline.kinds import ExtractSteering, ResolveModel, TrainBehavior
from test_steer_extract import OBJECTS, SUBJECTS, VERBS, planted_pairs, tied_gdn  # noqa: F401 (fixture)

LOC = Location(file="yes.behavior", line=8, column=5, end_line=8, end_column=12)
PROMPTS = [f"{s} {v} {o}?" for s in SUBJECTS for v in VERBS for o in OBJECTS]
HELD_OUT = tuple(planted_pairs(6, offset=3))
# Measured on this machine (seeded, tiny-gdn with a tied head): see test_* below.
KEEPS_AT_LEAST = 0.5


def distill_spec(**fields) -> ir.Distill:
    defaults = dict(prompts=tuple(PROMPTS[1::5][:8]), samples=2, keep=1, temperature=0.7,
                    max_tokens=6, match_activations=1.0, objective=ir.Objective(name="sft"), loc=LOC)
    return ir.Distill(**{**defaults, **fields})


class CountingEngine:
    """The embedded engine, counting its generate calls and their batch sizes."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, **options):
        self.calls.append(len(prompts))
        return self.engine.generate(prompts, **options)


@pytest.fixture(scope="module")
def embedded(tied_gdn):
    from behaviorc.engine.embedded import EmbeddedEngine
    return EmbeddedEngine.load(tied_gdn, name="tiny-gdn-tied")


@pytest.fixture(scope="module")
def directions(embedded):
    from behaviorc.steer.extract import extract
    return dict(extract(embedded, planted_pairs(8), [2]).vectors.directions)


def test_keep_best_takes_the_top_distinct_samples_of_each_prompt():
    kept = keep_best(["a", "b"], [["x", "y", "x", "z"], ["p", "q"]],
                     [[0.1, 0.5, 0.9, None], [None, -1.0]], keep=2)
    # "x" counts once, at its first score; a sample with no tokens is never kept
    assert [(s.prompt, s.response, s.score) for s in kept] == [("a", "y", 0.5), ("a", "x", 0.1),
                                                               ("b", "q", -1.0)]


def test_samples_are_generated_in_batches_and_scored_by_the_steering(embedded, directions):
    counting = CountingEngine(embedded)
    spec = distill_spec(samples=3, keep=2)
    counting.set_steering(directions, 4.0)
    try:
        data = distill_data(counting, embedded, directions, 4.0, spec, seed=0, loc=LOC)
    finally:
        counting.clear_steering()
    # one call per sample round over all 8 prompts, never one prompt at a time
    assert counting.calls == [8, 8, 8]
    assert data.generated == 24 and 8 <= len(data.kept) <= 16
    assert all(s.prompt in spec.prompts and s.response for s in data.kept)
    # the kept samples are the ones the steering made more likely than the plain model did
    assert data.mean_score > 0
    examples = data.examples
    assert examples[0] == ir.Example(context=data.kept[0].prompt, response=data.kept[0].response)


def test_the_served_strength_gives_back_what_the_weights_took_over():
    assert lowered_strength(4.0, 0.0, 2.0) == 4.0
    assert lowered_strength(4.0, 0.5, 2.0) == 3.0
    assert lowered_strength(4.0, 2.5, 2.0) == 0.0  # the weights carry more than the steering
    assert lowered_strength(4.0, -1.0, 2.0) == 4.0  # never above the spec strength
    assert lowered_strength(4.0, 0.3, 0.0) == 0.0  # steering that adds nothing is dropped


def test_pushed_tensors_are_the_trained_ones_in_checkpoint_names(embedded):
    from behaviorc.model.adapter import ArchitectureAdapter

    model = embedded.model
    adapter = ArchitectureAdapter.for_model(model)
    targets = adapter.parameters(model, ["gdn.gates", "mlp"])
    pushed = trained_tensors(adapter.checkpoint_tensors(model), list(targets))
    assert any(name.endswith(".experts.0.gate_proj.weight") for name in pushed)
    assert any(name.endswith(".A_log") for name in pushed)
    assert all(".experts." in n or ".linear_attn." in n or ".mlp." in n for n in pushed)
    name = next(n for n in pushed if n.endswith(".A_log"))
    assert torch.equal(pushed[name], dict(model.named_parameters())[name])


TRAIN = ir.Train(lr=2e-3, steps=12, batch=4, schedule="constant", loc=LOC,
                 targets=("gdn.gates", "gdn.proj", "gdn.out", "attn.q", "mlp", "head"),
                 optimizer=ir.Optimizer(rank=16))
GENERAL = ("The cat sat on the mat.", "Numbers: one, two, three.")


def distill_plan(folder, steps: int = 12, handoff: ir.Deploy | None = None,
                 **distill) -> TrainBehavior:
    decl = ir.ModelDecl(name="base", source=str(folder), kind="folder")
    model = ResolveModel(name="base", decl=decl)
    extraction = ExtractSteering(name="yes", model=model, layers=(2,), method="mean_diff", read="mean",
                                 pairs=tuple(planted_pairs(8)))
    train = TRAIN.model_copy(update={"distill": distill_spec(**distill), "steps": steps})
    return TrainBehavior(name="yes", model=model, train=train, eval_pairs=HELD_OUT, general=GENERAL,
                         steering=extraction, strength=4.0, handoff=handoff, loc=LOC)


def run_plan(task: TrainBehavior, out):
    from behaviorc.pipeline.executor import Executor

    record = Executor(out).run([task]).record(task.id)
    assert record.status == "done", record.error
    return record.result


def test_distilled_weights_keep_half_the_steered_gain_without_steering(tied_gdn, embedded, tmp_path):
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.measure.margin import behavior_margin

    result = run_plan(distill_plan(tied_gdn), tmp_path / "out")
    m = result.metrics
    gain = m["margin_steered"] - m["margin_before"]
    assert gain > 0.5  # the steering works on the held-out pairs
    assert m["steered_share"] == pytest.approx((m["margin_after"] - m["margin_before"]) / gain)
    assert m["steered_share"] >= KEEPS_AT_LEAST  # measured here: 0.80

    # Distillation skipped: the same training on the same prompts, answered by the plain
    # model (no steering while sampling, no activation targets), keeps far less of it.
    spec = distill_spec()
    plain = embedded.generate(list(spec.prompts), max_new_tokens=spec.max_tokens,
                              temperature=spec.temperature, seed=0)
    examples = tuple(ir.Example(context=p, response=r) for p, r in zip(spec.prompts, plain) if r)
    control = distill_plan(tied_gdn).model_copy(update={
        "train": TRAIN.model_copy(update={"examples": examples}), "steering": None, "strength": 0.0})
    skipped = run_plan(control, tmp_path / "control").metrics
    assert (skipped["margin_after"] - skipped["margin_before"]) / gain < KEEPS_AT_LEAST
    # the written folder is the distilled model, unsteered
    written = EmbeddedEngine.load(result.path("model"))
    assert behavior_margin(written, HELD_OUT) == pytest.approx(m["margin_after"], abs=1e-4)
    assert m["samples_kept"] == 8 and m["samples_generated"] == 16
    assert all(m[f"seconds_{phase}"] > 0 for phase in ("generate", "targets", "train"))
    assert abs(m["general_nll_after"] - m["general_nll_before"]) < 1.0
    # the activation-projection score of greedy replies: base, steered, distilled
    assert {"projection_before", "projection_steered", "projection_after"} <= set(m)


PROBE_PROMPTS = ["I will use", "The model", "You should write the plan?"]
PROBE_COMPLETIONS = [" the existing parser.", " wants the data", " Yes. Yes."]
BF16_TOLERANCE = 0.03  # vLLM and transformers both in bfloat16 differ by rounding only


def hand_over(task: TrainBehavior, server, tmp_path):
    """Build `task` (its hand-off serves on `server`), read what the server serves at the
    end, and put the server back as the session's other tests expect it."""
    from behaviorc.engine.vllm.push import push_weights
    from behaviorc.engine.vllm.client import VLLMEngine

    try:
        result = run_plan(task, tmp_path / "out")
        with VLLMEngine(server.url) as live:
            served = live.completion_logprobs(PROBE_PROMPTS, PROBE_COMPLETIONS)
    finally:
        with VLLMEngine(server.url) as live:
            live.clear_steering()
        push_weights([server.url], server.model_dir)
    return result, served


@pytest.mark.vllm
def test_live_handoff_ends_unsteered_on_the_written_weights(vllm_server, tied_gdn, tmp_path):
    import json

    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.core.events import EVENTS_FILE
    from behaviorc.tui.state import BuildState

    url = vllm_server.url
    deploy = ir.Deploy(target="yes", urls=(url,), steering=True, handoff=True, push_every=4)
    result, served = hand_over(distill_plan(tied_gdn, steps=12, handoff=deploy), vllm_server, tmp_path)

    m = result.metrics
    assert m["requests_failed"] == 0 and m["requests_served"] > 0
    assert m["pushes"] == 4  # the base at the start, after steps 4 and 8, the final weights
    points = result.data["served"]
    assert [p["step"] for p in points] == [0, 4, 8, 12]
    strengths = [p["strength"] for p in points]
    assert strengths[0] == 4.0 and strengths == sorted(strengths, reverse=True)
    assert m["strength_end"] == 0.0 and strengths[-1] == 0.0
    # Stated tolerance: the served margin may fall below its start by the part of the
    # steered gain the final weights do not carry, (1 - steered_share) * gain (steering
    # must end at zero), plus bf16 rounding on both ends; at no point by more.
    gain = m["margin_steered"] - m["margin_before"]
    tolerance = (1 - m["steered_share"]) * gain + 2 * BF16_TOLERANCE
    assert m["served_margin_min"] >= m["served_margin_start"] - tolerance
    assert min(p["served_margin"] for p in points) == m["served_margin_min"]
    # What the server serves at the end is the written folder, with no steering.
    expected = EmbeddedEngine.load(result.path("model"), dtype="bfloat16").completion_logprobs(
        PROBE_PROMPTS, PROBE_COMPLETIONS)
    assert max(abs(a - b) for x, y in zip(served, expected) for a, b in zip(x, y)) < BF16_TOLERANCE
    events = [json.loads(line) for line in (tmp_path / "out" / EVENTS_FILE).read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "handoff.served"] == [0, 4, 8, 12]
    assert [e["step"] for e in events if e["type"] == "push"] == [0, 4, 8, 12]
    # what the dashboard draws from them: the pushes table and the margin curve
    state = BuildState()
    for event in events:
        state.apply(event)
    assert [push["step"] for push in state.pushes] == [0, 4, 8, 12]
    assert [step for step, _ in state.train_margins["train:yes"]] == [0, 4, 8, 12]


@pytest.mark.vllm
def test_training_on_examples_hands_over_live_as_distillation_does(vllm_server, tied_gdn, tmp_path):
    """`handoff on` for a behavior that trains on its own examples (no distill block):
    the same hand-off, served steered from the start and unsteered on the final weights."""
    from behaviorc.engine.embedded import EmbeddedEngine

    url = vllm_server.url
    deploy = ir.Deploy(target="yes", urls=(url,), steering=True, handoff=True, push_every=4)
    examples = tuple(ir.Example(context=p.prompt, response=p.positive) for p in planted_pairs(8))
    task = distill_plan(tied_gdn, handoff=deploy).model_copy(update={
        "train": TRAIN.model_copy(update={"examples": examples, "steps": 12})})
    assert task.train.distill is None
    result, served = hand_over(task, vllm_server, tmp_path)

    m = result.metrics
    assert m["requests_failed"] == 0 and m["pushes"] == 4
    assert m["margin_steered"] > m["margin_before"]
    strengths = [p["strength"] for p in result.data["served"]]
    assert [p["step"] for p in result.data["served"]] == [0, 4, 8, 12]
    assert strengths[0] == 4.0 and strengths == sorted(strengths, reverse=True) and strengths[-1] == 0.0
    expected = EmbeddedEngine.load(result.path("model"), dtype="bfloat16").completion_logprobs(
        PROBE_PROMPTS, PROBE_COMPLETIONS)
    assert max(abs(a - b) for x, y in zip(served, expected) for a, b in zip(x, y)) < BF16_TOLERANCE


class LoopingEngine(CountingEngine):
    """The embedded engine, whose every `every`-th generated reply loops."""

    LOOP = " ha ha ha ha ha ha ha ha"

    def __init__(self, engine, every: int):
        super().__init__(engine)
        self.every = every

    def generate(self, prompts, **options):
        texts = self.engine.generate(prompts, **options)
        return [self.LOOP if i % self.every == 0 else t for i, t in enumerate(texts)]


def test_looping_samples_are_dropped_and_a_looping_teacher_is_refused(embedded, directions):
    from behaviorc.core.diagnostics import BehaviorError

    spec = distill_spec(samples=2, keep=2)
    data = distill_data(LoopingEngine(embedded, every=4), embedded, directions, 4.0, spec, seed=0, loc=LOC)
    assert data.looping >= 4 and f"{data.looping} looping" in data.dropped  # a tiny model loops too
    assert data.kept and all(s.response != LoopingEngine.LOOP for s in data.kept)
    assert len(data.plain) == len(spec.prompts)  # the plain model's own replies, one a prompt
    with pytest.raises(BehaviorError) as refused:
        distill_data(LoopingEngine(embedded, every=1), embedded, directions, 4.0, spec, seed=0, loc=LOC)
    assert "loops or breaks: 16 of its 16 samples" in str(refused.value) and "'ha ha ha" in str(refused.value)
    assert refused.value.diagnostics[0].loc == LOC


def test_a_no_repeat_teacher_keeps_its_looping_samples_but_not_a_teacher_that_only_loops(embedded, directions):
    """With `no_repeat` a looping sample is kept: the student learns from the teacher's
    distribution over it with the repeats banned. A teacher whose samples mostly loop is
    still refused."""
    from behaviorc.core.diagnostics import BehaviorError

    spec = distill_spec(samples=2, keep=2)
    data = distill_data(LoopingEngine(embedded, every=4), embedded, directions, 4.0, spec, seed=0, loc=LOC,
                        keep_looping=True)
    assert data.looping == 0 and data.looping_kept >= 4 and f"{data.looping_kept} looping" in data.kept_looping
    assert LoopingEngine.LOOP in {s.response for s in data.kept}
    with pytest.raises(BehaviorError) as refused:
        distill_data(LoopingEngine(embedded, every=1), embedded, directions, 4.0, spec, seed=0, loc=LOC,
                     keep_looping=True)
    assert "loops or breaks: 16 of its 16 samples (16 looping" in str(refused.value)


def test_kl_distillation_teaches_the_steered_distribution_and_measures_forgetting(tied_gdn, tmp_path):
    result = run_plan(distill_plan(tied_gdn, steps=6, match_activations=0.0,
                                   objective=ir.Objective(name="kl", top_k=16, plain=1.0)), tmp_path / "out")
    m = result.metrics
    assert m["steered_share"] > 0.1
    # the loss is a KL to the teacher, from the base weights' distance to it down toward 0
    assert 0 < m["loss_last"] < m["loss_first"]
    # the kept samples and the plain model's own replies (8 prompts each) learn it
    assert m["samples_kept"] == 8 and m["seconds_targets"] > 0
    assert {"capability_before", "capability_after", "general_nll_before", "general_nll_after"} <= set(m)
    assert result.data["warnings"] == []


def test_general_texts_are_taught_with_the_steering_on(tied_gdn, tmp_path, monkeypatch):
    """`objective kl { general 2 }`: besides the samples, the student learns the steered
    model's distribution on every built-in general text, at that weight. (What it buys
    on the real model is README's, "Defaults": on the tiny model the samples alone
    already carry the steering to any text.)"""
    from transformers import AutoTokenizer

    from behaviorc.train.data import encode_texts
    from behaviorc.train.teacher import Teacher

    read = []
    real = Teacher.distributions
    monkeypatch.setattr(Teacher, "distributions", lambda self, *a, **k: read.append(self) or real(self, *a, **k))
    result = run_plan(distill_plan(tied_gdn, steps=2, match_activations=0.0,
                                   objective=ir.Objective(name="kl", top_k=16, general=2.0)), tmp_path / "out")
    assert "steered_share" in result.metrics
    rows = {row.sequence: row for row in read[0].rows}
    general = encode_texts(AutoTokenizer.from_pretrained(tied_gdn), GENERAL_TEACHING_TEXTS)
    assert len(general) == len(GENERAL_TEACHING_TEXTS)
    for sequence in general:
        assert rows[sequence].steered and rows[sequence].weight == 2.0
    assert len(rows) == len(general) + 2 * 8  # and the 8 kept samples and 8 plain replies


def test_no_repeat_reaches_every_reply_the_teacher_reads(tied_gdn, tmp_path, monkeypatch):
    """`objective kl { no_repeat 3 }`: the kept samples and the plain replies are read
    with the ban; the general texts, which are not replies, without it."""
    from behaviorc.train.teacher import Teacher

    read = []
    real = Teacher.distributions
    monkeypatch.setattr(Teacher, "distributions", lambda self, *a, **k: read.append(self) or real(self, *a, **k))
    result = run_plan(distill_plan(tied_gdn, steps=2, match_activations=0.0,
                                   objective=ir.Objective(name="kl", top_k=16, general=1.0, no_repeat=3)),
                      tmp_path / "out")
    assert "steered_share" in result.metrics
    rows = read[0].rows
    replies = [row for row in rows if row.no_repeat == 3]
    assert len(replies) == 2 * 8 and len(rows) - len(replies) == len(GENERAL_TEACHING_TEXTS)


def test_a_prompt_teacher_needs_no_pairs_and_its_student_reads_no_system_prompt(tied_gdn, tmp_path):
    """Context distillation: the teacher is the base reading a system prompt; the student
    trains without it."""
    system = "Answer every question with Yes."
    plan = distill_plan(tied_gdn, steps=2, match_activations=0.0, steering=False, system=system,
                        objective=ir.Objective(name="kl", top_k=8, plain=0.0))
    prompt_only = plan.model_copy(update={"steering": None, "strength": 0.0, "eval_pairs": ()})
    result = run_plan(prompt_only, tmp_path / "alone")
    assert result.metrics["samples_kept"] == 8 and "margin_before" not in result.metrics
    shown = result.data["replies"]
    assert shown and {"prompt", "base", "prompted", "trained"} <= set(shown[0])
    assert not any(system in r["prompt"] for r in shown)

