"""On the real model (SmolLM2-135M-Instruct): a cheerful/gloomy direction beats a random
one of the same norm on held-out pairs, and every PCA method agrees in sign with it.
Margins only (no sweep, probe or samples): a few batched forwards."""

from __future__ import annotations

import pytest
import torch

from behaviorc.core import ir
from behaviorc.steer.extract import extract
from behaviorc.steer.verify import control_vectors, measure_at

CHEER = [
    ("How was your day?", " It was wonderful, I loved every minute!", " It was awful, I hated every minute."),
    ("What do you think of the weather today?", " It's lovely, bright and sunny!", " It's miserable, grey and cold."),
    ("How do you feel about Monday?", " I love Mondays, a fresh start!", " I dread Mondays, they are bleak."),
    ("Tell me about your weekend.", " It was fantastic, full of fun!", " It was dreadful, boring and sad."),
    ("How is the project going?", " It's going great, we're so close!", " It's going badly, we will fail."),
    ("What do you think of this city?", " It's a delightful place, I adore it!", " It's a depressing place, I hate it."),
    ("How was the movie?", " It was brilliant, I laughed all the way through!", " It was terrible, a waste of time."),
    ("How was the trip?", " It was a joy from start to finish!", " It was a misery from start to finish."),
    ("How is the food here?", " It's delicious, everything is perfect!", " It's disgusting, everything is wrong."),
    ("How was school today?", " It was great, I learned so much!", " It was awful, I learned nothing."),
]
LAYER, STRENGTH = 16, 2.0  # the layer `layers auto` chose on these pairs


@pytest.fixture(scope="module")
def smollm2_engine(smollm2):
    from behaviorc.engine.embedded import EmbeddedEngine

    return EmbeddedEngine.load(smollm2, name="smollm2-135m")


def test_cheer_beats_a_random_direction_and_pca_signs_agree(smollm2_engine):
    pairs = [ir.Pair(prompt=p, positive=a, negative=b) for p, a, b in CHEER]
    train, held = pairs[:6], pairs[6:]
    vectors = extract(smollm2_engine, train, [LAYER]).vectors
    before = measure_at(smollm2_engine, vectors, 0.0, held, (), full=False)
    steered = measure_at(smollm2_engine, vectors, STRENGTH, held, (), before, full=False)
    control = measure_at(smollm2_engine, control_vectors(vectors), STRENGTH, held, (), before, full=False)
    effect, control_effect = steered.margin - before.margin, control.margin - before.margin
    assert effect > 0.3 and effect > 3 * abs(control_effect), (effect, control_effect)
    assert steered.right_share == 1.0
    for method in ("pca", "pca_diff", "pca_center"):
        other = extract(smollm2_engine, train, [LAYER], method=method).vectors.directions[LAYER]
        assert float(torch.dot(other, vectors.directions[LAYER])) > 0, method
