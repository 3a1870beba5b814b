"""The training loop and the TrainBehavior task on the built-in tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from behaviorc.core import ir
from behaviorc.core.diagnostics import Location
from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
from behaviorc.pipeline.kinds import ResolveModel, TrainBehavior
from behaviorc.train.data import BatchSchedule, encode_examples, encode_texts
from behaviorc.train.loop import learning_rate, train

LOC = Location(file="listen.behavior", line=9, column=3, end_line=9, end_column=8)
ASKERS = ["the user", "the team", "my friend", "the client", "our lead", "the tester",
          "a student", "the manager", "the author", "the reviewer"]
POSITIVE, NEGATIVE = " I will use the existing parser.", " I will write a new parser instead."


def _examples(indices) -> tuple[ir.Example, ...]:
    return tuple(ir.Example(context=f"Question from {ASKERS[i]}: which parser?\nAnswer:", response=POSITIVE)
                 for i in indices)


def _pairs(indices) -> tuple[ir.Pair, ...]:
    return tuple(ir.Pair(prompt=f"Question from {ASKERS[i]}: which parser?\nAnswer:",
                         positive=POSITIVE, negative=NEGATIVE) for i in indices)


def _load(folder):
    from behaviorc.model.loading import load_model
    return load_model(folder, "float32", "cpu")


def _targets(model, groups):
    from behaviorc.model.adapter import ArchitectureAdapter
    return ArchitectureAdapter.for_model(model).parameters(model, groups)


def _spec(**fields) -> ir.Train:
    defaults = dict(examples=_examples(range(6)), lr=3e-3, steps=6, batch=2, schedule="constant",
                    targets=("attn.q", "mlp"), optimizer=ir.Optimizer(rank=16))
    return ir.Train(**{**defaults, **fields})


def test_learning_rate_warms_up_then_decays_by_cosine():
    spec = ir.Train(lr=1.0, steps=11, warmup=2)
    rates = [learning_rate(s, spec) for s in range(11)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert rates[-1] == pytest.approx(0.1) and rates == sorted(rates[:2]) + sorted(rates[2:], reverse=True)


def test_only_targets_train_and_hold_optimizer_state(tiny_dense):
    model, tokenizer = _load(tiny_dense)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = _targets(model, ["attn.q"])
    schedule = BatchSchedule(encode_examples(tokenizer, _spec().examples), [], 2, 0.0, 0)
    events = []
    summary = train(model, targets, schedule, _spec(steps=3), pad_id=tokenizer.pad_token_id,
                    on_step=events.append)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in targets), name
        assert not param.requires_grad
    assert [e.step for e in events] == [1, 2, 3] and summary.steps_skipped == 0
    assert all(e.grad_norm > 0 and e.tokens_per_s > 0 and e.lr == 3e-3 for e in events)


def test_a_nan_step_is_skipped_and_counted(tiny_dense):
    model, tokenizer = _load(tiny_dense)
    targets = _targets(model, ["attn.q"])
    forwards = {"n": 0}

    def poison_second_step(module, args, output):
        forwards["n"] += 1
        return output * float("nan") if forwards["n"] == 2 else output

    model.lm_head.register_forward_hook(poison_second_step)
    schedule = BatchSchedule(encode_examples(tokenizer, _spec().examples), [], 2, 0.0, 0)
    events = []
    summary = train(model, targets, schedule, _spec(steps=3, context="full"),
                    pad_id=tokenizer.pad_token_id, on_step=events.append)
    assert summary.steps_skipped == 1 and [e.skipped for e in events] == [False, True, False]
    assert all(torch.isfinite(p).all() for p in targets.values())


@pytest.mark.parametrize("objective", ["sft", "kl"])
def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_weights(tiny_dense, tmp_path, objective):
    """Also with a teacher's distribution (`objective kl`, here a steered teacher on half
    the examples): a resumed run computes it again from the base weights it reloads."""
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.train.teacher import Teacher, TeacherRow

    spec = _spec(steps=6, schedule="cosine", warmup=1, optimizer=ir.Optimizer(rank=16, refresh=2))
    direction = torch.randn(1024, generator=torch.Generator().manual_seed(0))

    def run(checkpoint_dir=None, stop_at=None):
        model, tokenizer = _load(tiny_dense)
        targets = _targets(model, ["attn.q", "mlp"])
        sequences = encode_examples(tokenizer, spec.examples)
        schedule = BatchSchedule(sequences, [], 2, 0.0, 0)
        teacher = None
        if objective == "kl":
            rows = tuple(TeacherRow(s, s.context, True, 1.0, 2.0) for s in sequences[::2])
            teacher = Teacher(rows, {1: direction[:model.config.hidden_size]}, 4.0, 8).distributions(
                model, ArchitectureAdapter.for_model(model).decoder_layers(model), tokenizer.pad_token_id)

        def on_step(event):
            if event.step == stop_at:
                raise KeyboardInterrupt  # a build stopped mid-training
        try:
            summary = train(model, targets, schedule, spec, pad_id=tokenizer.pad_token_id,
                            on_step=on_step, checkpoint_dir=checkpoint_dir, checkpoint_every=2,
                            teacher=teacher)
        except KeyboardInterrupt:
            return None, None
        return {n: p.detach().clone() for n, p in targets.items()}, summary

    uninterrupted, whole = run()
    assert run(tmp_path / "ckpt", stop_at=5) == (None, None)  # checkpoint of step 4 left behind
    resumed, summary = run(tmp_path / "ckpt")
    assert summary.resumed_from == 4
    # the figures cover the whole training, not only the resumed part
    assert len(summary.losses) == 6 and summary.losses[:4] == whole.losses[:4]
    assert whole.limiter_activations > 0
    assert summary.limiter_activations == whole.limiter_activations
    # the last step leaves a checkpoint: resuming from it trains no step
    again, finished = run(tmp_path / "ckpt")
    assert finished.resumed_from == 6 and finished.losses == summary.losses
    assert finished.limiter_activations == whole.limiter_activations
    for name, weight in resumed.items():
        torch.testing.assert_close(again[name], weight, rtol=0, atol=0)
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=1e-6)


def test_general_mix_of_25_percent_keeps_general_nll_lower_than_none(tiny_dense):
    """Same seed, same 10 steps, same examples: with a quarter of each batch from general
    text, the NLL on held-out general text ends lower than without."""
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.measure.nll import general_nll

    held_out = DEFAULT_GENERAL_TEXTS[30:36]
    results = {}
    for ratio in (0.0, 0.25):
        model, tokenizer = _load(tiny_dense)
        engine = EmbeddedEngine(model, tokenizer)
        before = general_nll(engine, held_out)
        general = encode_texts(tokenizer, DEFAULT_GENERAL_TEXTS[:30]) if ratio else []
        schedule = BatchSchedule(encode_examples(tokenizer, _spec().examples), general, 4, ratio, 0)
        train(model, _targets(model, ["attn.q", "mlp"]), schedule, _spec(steps=10, batch=4),
              pad_id=tokenizer.pad_token_id)
        results[ratio] = general_nll(engine, held_out) - before
    assert results[0.25] < results[0.0], results


def _task(steps: int, **train_fields) -> TrainBehavior:
    decl = ir.ModelDecl(name="base", source="tiny-gdn", kind="builtin")
    spec = _spec(steps=steps, batch=4, targets=("gdn.gates", "gdn.proj", "attn.q", "mlp"), loc=LOC,
                 mix=ir.Mix(ratio=0.25, texts=DEFAULT_GENERAL_TEXTS[:20]), **train_fields)
    return TrainBehavior(name="listen", model=ResolveModel(name="base", decl=decl), train=spec,
                         eval_pairs=_pairs(range(6, 10)), general=DEFAULT_GENERAL_TEXTS[20:24], loc=LOC)


def test_training_planted_examples_raises_the_margin_on_held_out_pairs(tmp_path):
    from behaviorc.model.loading import load_model
    from behaviorc.pipeline.executor import Executor

    task = _task(steps=12)
    outcome = Executor(tmp_path / "out").run([task])
    assert outcome.ok, [r.error for r in outcome.records]
    result = outcome.record(task.id).result
    m = result.metrics
    assert m["margin_after"] > m["margin_before"] + 0.5, m
    assert m["loss_last"] < m["loss_first"] and m["steps_skipped"] == 0
    assert {"general_nll_before", "general_nll_after"} <= set(m)
    # a loss near 0 on a handful of token targets is flagged as memorised, and only then
    memorised = [w for w in result.data["warnings"] if "memorised" in w]
    assert bool(memorised) == (m["loss_last"] < 0.05), (m["loss_last"], result.data["warnings"])

    events = [json.loads(line) for line in outcome.events_path.read_text().splitlines()]
    steps = [e for e in events if e["type"] == "train.step"]
    assert [e["step"] for e in steps] == list(range(1, 13))
    assert {"loss", "grad_norm", "lr", "limiter", "tokens_per_s"} <= set(steps[0])

    model, _ = load_model(result.path("model"), "float32", "cpu")  # a loadable HF folder
    base, _ = load_model(outcome.record("model:base").result.data["path"], "float32", "cpu")
    trained = dict(model.named_parameters())
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, trained[n])}
    assert changed and all(".linear_attn." in n or ".self_attn.q_proj" in n or ".mlp." in n for n in changed)


def test_distillation_without_steering_is_refused_at_its_spec_line(tmp_path):
    from behaviorc.pipeline.executor import Executor

    distill_loc = Location(file="listen.behavior", line=12, column=5, end_line=12, end_column=12)
    task = _task(steps=1, distill=ir.Distill(prompts=("Which parser?",), loc=distill_loc))
    outcome = Executor(tmp_path / "out").run([task])
    failed = outcome.record(task.id)
    assert failed.status == "failed" and "needs the behavior's steering" in failed.error
    assert failed.loc == distill_loc


def test_targets_absent_from_the_model_are_a_located_error(tiny_dense, tmp_path):
    from behaviorc.pipeline.executor import Executor

    decl = ir.ModelDecl(name="base", source=str(tiny_dense), kind="folder")
    task = TrainBehavior(name="x", model=ResolveModel(name="base", decl=decl),
                         train=_spec(targets=("gdn.gates",), loc=LOC), eval_pairs=(), general=())
    failed = Executor(tmp_path / "out").run([task]).record(task.id)
    assert failed.status == "failed" and "no parameters in `gdn.gates`" in failed.error
    assert failed.loc == LOC
