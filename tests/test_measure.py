"""Margins and general NLL on a real tiny model, checked against direct forwards."""

import math

import pytest
import torch

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.core.ir import Pair
from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
from behaviorc.measure.margin import behavior_margin, per_pair_margins
from behaviorc.measure.nll import general_nll

PAIRS = (
    Pair(prompt="Use the existing parser.", positive=" I will use the existing parser.",
         negative=" I will write a new parser instead."),
    Pair(prompt="Keep it short.", positive=" Sure.", negative=" Here is a long answer about the plan."),
)


@pytest.fixture(scope="module")
def engine(tiny_gdn):
    return EmbeddedEngine.load(tiny_gdn, device="cpu")


def _mean_logprob(engine, prompt, completion):
    ids, prompt_len = engine._encode(prompt, completion)
    with torch.no_grad():
        logprobs = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0], -1)
    values = [logprobs[t - 1, ids[t]].item() for t in range(prompt_len, len(ids))]
    return sum(values) / len(values), values


def test_margins_match_direct_forwards(engine):
    margins = per_pair_margins(engine, PAIRS)
    for pair, margin in zip(PAIRS, margins):
        expected = _mean_logprob(engine, pair.prompt, pair.positive)[0] - \
            _mean_logprob(engine, pair.prompt, pair.negative)[0]
        assert margin == pytest.approx(expected, abs=1e-5)
    assert behavior_margin(engine, PAIRS) == pytest.approx(sum(margins) / 2, abs=1e-9)
    swapped = [Pair(prompt=p.prompt, positive=p.negative, negative=p.positive) for p in PAIRS]
    assert behavior_margin(engine, swapped) == pytest.approx(-behavior_margin(engine, PAIRS), abs=1e-6)


def test_steering_moves_the_margin(engine):
    before = behavior_margin(engine, PAIRS)
    engine.set_steering({1: torch.randn(128, generator=torch.Generator().manual_seed(1))}, 6.0)
    try:
        assert abs(behavior_margin(engine, PAIRS) - before) > 1e-4
    finally:
        engine.clear_steering()
    assert behavior_margin(engine, PAIRS) == before


def test_general_nll_is_token_weighted(engine):
    texts = DEFAULT_GENERAL_TEXTS[:4]
    nll = general_nll(engine, texts)
    all_values = [v for text in texts for v in _mean_logprob(engine, "", text)[1]]
    assert nll == pytest.approx(-sum(all_values) / len(all_values), abs=1e-5)
    # A random 365-token model sits near the uniform NLL, ln(365).
    assert 0.5 * math.log(365) < nll < 2 * math.log(365)


def test_default_general_texts_are_plain_and_fixed():
    assert len(DEFAULT_GENERAL_TEXTS) >= 30
    assert len(set(DEFAULT_GENERAL_TEXTS)) == len(DEFAULT_GENERAL_TEXTS)
    assert all(t.strip() == t and t for t in DEFAULT_GENERAL_TEXTS)


def test_empty_inputs_are_errors(engine):
    with pytest.raises(BehaviorError, match="no pairs"):
        behavior_margin(engine, [])
    with pytest.raises(BehaviorError, match="no tokens to score"):
        per_pair_margins(engine, [Pair(prompt="Hi", positive="", negative=" no")])
    with pytest.raises(BehaviorError, match="no texts"):
        general_nll(engine, [])
