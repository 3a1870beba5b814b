"""The teacher's distribution (`objective kl`, `anchor kl`): the lumped KL by hand, the
teacher's reading of its own context, and the loss the loop trains on."""

from __future__ import annotations

import math

import pytest
import torch

from behaviorc.train.data import TrainSequence
from behaviorc.train.loop import ResponseLoss
from behaviorc.train.teacher import Distribution, Teacher, TeacherRow, lumped_kl, repeat_bans


def _softmax(logits, temperature=1.0):
    exps = [math.exp(x / temperature) for x in logits]
    return [e / sum(exps) for e in exps]


def test_lumped_kl_equals_the_kl_computed_by_hand_on_a_four_token_vocabulary():
    teacher = [2.0, 1.0, 0.0, -1.0]
    student = [0.5, 1.5, -0.5, 0.0]
    for temperature in (1.0, 2.0):
        p, q = _softmax(teacher, temperature), _softmax(student, temperature)
        logp = torch.log_softmax(torch.tensor([teacher]) / temperature, -1)
        # top 2 (tokens 0 and 1) kept, tokens 2 and 3 lumped into one outcome
        lumped = (p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
                  + (p[2] + p[3]) * math.log((p[2] + p[3]) / (q[2] + q[3])))
        got = lumped_kl(torch.tensor([student]), torch.tensor([[0, 1]]), logp[:, :2],
                        torch.logsumexp(logp[:, 2:], -1), torch.tensor([temperature]))
        assert float(got) == pytest.approx(lumped * temperature ** 2, rel=1e-5)
        # every token kept: the exact KL, as torch computes it
        full = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        got = lumped_kl(torch.tensor([student]), torch.tensor([[0, 1, 2, 3]]), logp,
                        torch.tensor([float("-inf")]), torch.tensor([temperature]))
        assert float(got) == pytest.approx(full * temperature ** 2, rel=1e-5)
        torch_kl = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(student) / temperature, -1),
                                              logp[0], log_target=True, reduction="sum")
        assert float(got) == pytest.approx(float(torch_kl) * temperature ** 2, rel=1e-5)


def test_lumping_is_zero_at_the_teacher_and_has_a_finite_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    logp = torch.log_softmax(logits, -1)
    top, tokens = logp.topk(8, -1)
    rest = logp.scatter(-1, tokens, float("-inf")).logsumexp(-1)
    student = logits.clone().requires_grad_(True)
    kl = lumped_kl(student, tokens, top, rest, torch.ones(5))
    assert kl.abs().max() < 1e-5  # the student is the teacher
    shifted = (logits + torch.randn(5, 50)).requires_grad_(True)
    kl = lumped_kl(shifted, tokens, top, rest, torch.ones(5))
    assert (kl > 0).all()
    kl.sum().backward()
    assert torch.isfinite(shifted.grad).all() and shifted.grad.abs().sum() > 0
    # lumping never reads more than the full KL: merging outcomes loses information
    full = lumped_kl(logits + 0, torch.arange(50).expand(5, 50), logp, torch.full((5,), float("-inf")),
                     torch.ones(5))
    assert (full.detach() >= -1e-6).all()


def test_the_texts_general_teaches_are_not_those_the_general_nll_is_measured_on():
    """`objective kl { general W }` trains on its own texts: a build's reported general NLL
    (the built-in texts, or a spec's) must not be measured on what it trained toward."""
    import json
    from pathlib import Path

    from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
    from behaviorc.train.general_texts import GENERAL_TEACHING_TEXTS

    specs = Path(__file__).resolve().parents[1] / "specs" / "data"
    measured = set(DEFAULT_GENERAL_TEXTS)
    for path in specs.glob("*general*.jsonl"):
        measured |= {json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()}
    assert len(GENERAL_TEACHING_TEXTS) == len(set(GENERAL_TEACHING_TEXTS)) == 24
    assert not measured & set(GENERAL_TEACHING_TEXTS)


def test_no_repeat_bans_each_token_that_would_repeat_an_ngram_of_the_reply():
    # "aye , aye , aye": at position 4 the 3-gram (aye , aye) would repeat positions 0-2
    aye, comma, ship = 7, 3, 9
    assert repeat_bans([aye, comma, aye, comma, aye], 3) == [(4, aye)]
    # two earlier continuations of one prefix: both banned there
    assert repeat_bans([1, 2, 3, 1, 2, 4, 1, 2, 5], 3) == [(5, 3), (8, 3), (8, 4)]
    assert repeat_bans([aye, aye, aye], 2) == [(2, aye)]
    assert repeat_bans([aye, comma, ship, comma, aye], 3) == []  # nothing repeats
    assert repeat_bans([1, 2], 3) == []  # shorter than an n-gram


@pytest.fixture(scope="module")
def dense(tiny_dense):
    from behaviorc.model.loading import load_model
    return load_model(tiny_dense, "float32", "cpu")


def test_the_teacher_reads_its_own_context_and_the_student_its_own(dense):
    """A prompt teacher: the distribution at each response position is the model's after
    the teacher's context (the system prompt), not after the student's."""
    model, _ = dense
    student = TrainSequence((5, 6, 7), (8, 9, 10))
    teacher_context = (1, 2, 3, 4, 5, 6, 7)
    rows = (TeacherRow(student, teacher_context, False, 1.0, 1.0),)
    found = Teacher(rows, {}, 0.0, top_k=4).distributions(model, [], pad_id=0)[student]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([teacher_context + student.response])).logits[0]
        own = model(input_ids=torch.tensor([student.context + student.response])).logits[0]
    expected = torch.log_softmax(logits[len(teacher_context) - 1:-1], -1)
    top, tokens = expected.topk(4, -1)
    assert found.tokens.shape == (3, 4) and torch.equal(found.tokens, tokens)
    torch.testing.assert_close(found.logprobs, top)
    torch.testing.assert_close(found.rest.exp(), 1 - top.exp().sum(-1), rtol=1e-5, atol=1e-6)
    student_view = torch.log_softmax(own[len(student.context) - 1:-1], -1).topk(4, -1).values
    assert not torch.allclose(found.logprobs, student_view, atol=1e-3)


def test_a_steered_teacher_reads_with_the_steering_on(dense):
    from behaviorc.model.adapter import ArchitectureAdapter

    model, _ = dense
    layers = ArchitectureAdapter.for_model(model).decoder_layers(model)
    sequence = TrainSequence((3, 4), (5, 6, 7))
    direction = torch.randn(model.config.hidden_size)
    plain = Teacher((TeacherRow(sequence, sequence.context, False, 1.0, 1.0),), {0: direction}, 4.0, 0)
    steered = Teacher((TeacherRow(sequence, sequence.context, True, 1.0, 1.0),), {0: direction}, 4.0, 0)
    a = plain.distributions(model, layers, 0)[sequence]
    b = steered.distributions(model, layers, 0)[sequence]
    assert a.logprobs.shape[-1] == model.config.vocab_size  # top_k 0: the whole vocabulary
    assert not torch.allclose(a.logprobs, b.logprobs, atol=1e-3)
    assert not layers[0]._forward_hooks  # the steering is gone after reading


def test_no_repeat_reads_the_teacher_with_each_repeating_token_at_probability_zero(dense):
    """The banned tokens get probability 0 and the rest of each position's distribution
    is the teacher's, renormalized; positions with nothing banned are as without it."""
    model, _ = dense
    sequence = TrainSequence((3, 4), (5, 6, 5, 6, 5, 6))  # positions 4 and 5 repeat 3-grams
    rows = {n: (TeacherRow(sequence, sequence.context, False, 1.0, 1.0, n),) for n in (0, 3)}
    # top_k 0 keeps every token, ordered by probability: back to token order
    free, banned = (d.logprobs.scatter(-1, d.tokens, d.logprobs) for d in (
        Teacher(rows[n], {}, 0.0, 0).distributions(model, [], 0)[sequence] for n in (0, 3)))
    assert repeat_bans(sequence.response, 3) == [(4, 5), (5, 6)]
    for position, token in ((4, 5), (5, 6)):
        assert banned[position, token] == float("-inf")
        others = torch.ones(model.config.vocab_size, dtype=torch.bool)
        others[token] = False
        torch.testing.assert_close(banned[position, others], torch.log_softmax(free[position, others], -1))
    torch.testing.assert_close(banned[:4], free[:4])
    # with top k, the banned token falls out of the k and out of the lumped rest
    top = Teacher(rows[3], {}, 0.0, 4).distributions(model, [], 0)[sequence]
    assert 5 not in top.tokens[4].tolist() and 6 not in top.tokens[5].tolist()
    torch.testing.assert_close(top.logprobs.exp().sum(-1) + top.rest.exp(), torch.ones(6))


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_a_row_with_its_own_distribution_as_teacher_costs_nothing_and_the_rest_cross_entropy(dense, mode):
    """The anchor on the untrained model: its KL to itself is 0, so a batch's loss is the
    cross-entropy of its other rows, divided by all the batch's response tokens."""
    model, _ = dense
    anchored, plain = TrainSequence((1, 2, 3), (4, 5, 6, 7)), TrainSequence((1, 9), (10, 11))
    teacher = Teacher((TeacherRow(anchored, anchored.context, False, 1.0, 1.0),), {}, 0.0, 16)
    distributions = teacher.distributions(model, [], 0)
    taught_loss, count = ResponseLoss(model, mode, 0, teacher=distributions)([anchored, plain])
    ce_loss, _ = ResponseLoss(model, mode, 0)([plain])
    assert count == 6
    assert float(taught_loss.detach()) == pytest.approx(float(ce_loss.detach()) * 2 / 6, rel=1e-4)


def test_weights_and_temperatures_scale_the_kl(dense):
    model, _ = dense
    sequence = TrainSequence((1, 2, 3), (4, 5, 6))
    far = Distribution(torch.tensor([[7, 8]] * 3), torch.log(torch.tensor([[0.6, 0.3]] * 3)),
                       torch.log(torch.tensor([0.1] * 3)), 1.0, 1.0)
    one, _ = ResponseLoss(model, "frozen", 0, teacher={sequence: far})([sequence])
    half, _ = ResponseLoss(model, "frozen", 0, teacher={sequence: Distribution(
        far.tokens, far.logprobs, far.rest, 0.5, 1.0)})([sequence])
    assert float(one.detach()) > 0.1
    assert float(half.detach()) == pytest.approx(float(one.detach()) / 2, rel=1e-5)
