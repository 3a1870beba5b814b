"""On the real model (SmolLM2-135M-Instruct): a cheerful/gloomy direction beats a random
one of the same norm on held-out pairs, and every PCA method agrees in sign with it.
Margins only (no sweep, probe or samples): a few batched forwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from behaviorc.lang.data import read_pair
from behaviorc.steer.extract import extract
from behaviorc.steer.verify import control_vectors, measure_at

# ten cheerful/gloomy replies to everyday questions (bench/steer_repeng.py's pairs too)
CHEER_PAIRS = Path(__file__).resolve().parent.parent / "specs" / "data" / "mood_pairs.jsonl"
LAYER, STRENGTH = 16, 2.0  # the layer `layers auto` chose on these pairs


@pytest.fixture(scope="module")
def smollm2_engine(smollm2):
    from behaviorc.engine.embedded import EmbeddedEngine

    return EmbeddedEngine.load(smollm2, name="smollm2-135m")


def test_cheer_beats_a_random_direction_and_pca_signs_agree(smollm2_engine):
    pairs = [read_pair(json.loads(line)) for line in CHEER_PAIRS.read_text().splitlines()]
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
