"""repeng's methods under their names: `pca_diff` and `pca_center` match repeng's
definitions (sklearn PCA, i.e. centered SVD, on repeng's rows) computed independently
from hidden states read straight from transformers; every method points from negative
to positive, in the vectors and in the GGUF export alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from behaviorc.core import ir
from behaviorc.steer.extract import direction, extract
from behaviorc.formats.steering import export_gguf, read_gguf
from test_steer_extract import engine, planted_pairs, tied_gdn  # noqa: F401 (fixtures)

WORDS = [" Yes.", " Sure, gladly.", " Of course!", " Happy to help.", " Absolutely."]
NOPES = [" No.", " Never.", " I refuse.", " Not today.", " Go away."]


def varied_pairs(count: int) -> list[ir.Pair]:
    prompts = [p.prompt for p in planted_pairs(count)]
    return [ir.Pair(prompt=p, positive=WORDS[i % 5], negative=NOPES[(i * 2) % 5])
            for i, p in enumerate(prompts)]


def repeng_direction(hidden: np.ndarray, method: str) -> np.ndarray:
    """repeng's read_representations for one layer, from rows [pos0, neg0, pos1, ...]:
    sklearn's PCA (centered, first component), sign by the pairs' vote."""
    if method == "pca_diff":
        train = hidden[::2] - hidden[1::2]
    else:
        center = (hidden[::2] + hidden[1::2]) / 2
        train = hidden.copy()
        train[::2] -= center
        train[1::2] -= center
    centered = train - train.mean(axis=0)
    component = np.linalg.svd(centered, full_matrices=False)[2][0]
    projected = hidden @ component
    larger = np.mean(projected[::2] > projected[1::2])
    return component if larger >= np.mean(projected[::2] < projected[1::2]) else -component


def transformers_hidden(folder, pairs, layer: int) -> np.ndarray:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from behaviorc.model.chat import model_prompt

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    with torch.no_grad():
        for pair in pairs:
            for side in (pair.positive, pair.negative):
                text = model_prompt(tokenizer, pair.prompt) + side  # as the engines read it
                ids = torch.tensor([tokenizer(text).input_ids])
                states = model(ids, output_hidden_states=True).hidden_states
                rows.append(states[layer + 1][0, -1].double().numpy())  # output of `layer`
    return np.stack(rows)


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_repeng_methods_match_repengs_definition(engine, tied_gdn, method):
    pairs, layer = varied_pairs(10), 2
    ours = extract(engine, pairs, [layer], method=method, read="last").vectors.directions[layer]
    theirs = torch.from_numpy(repeng_direction(transformers_hidden(tied_gdn, pairs, layer), method))
    cosine = float(torch.cosine_similarity(ours.double(), theirs, dim=0))
    assert abs(cosine) >= 0.99, cosine


def test_every_method_points_from_negative_to_positive_in_vectors_and_gguf(engine, tmp_path):
    pairs = varied_pairs(10)
    mean = extract(engine, pairs, [1, 2], read="last").vectors
    for method in ("pca", "pca_diff", "pca_center"):
        vectors = extract(engine, pairs, [1, 2], method=method, read="last").vectors
        exported = read_gguf(export_gguf(vectors, tmp_path / f"{method}.gguf"))
        for layer in (1, 2):
            for found in (vectors.directions[layer], exported.directions[layer]):
                assert float(found @ mean.directions[layer]) > 0, (method, layer)
        if method != "pca":
            for layer in (1, 2):  # scaled to the mean difference's norm
                assert vectors.norms[layer] == pytest.approx(mean.norms[layer], rel=1e-4)


def test_pca_diff_ignores_the_common_shift_and_finds_the_spread():
    generator = torch.Generator().manual_seed(2)
    negatives = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    shift = torch.zeros(8, dtype=torch.float64)
    shift[0] = 5.0  # every pair moves along 0 ...
    spread = torch.zeros(8, dtype=torch.float64)
    spread[1] = 1.0  # ... and pairs differ from one another along 1
    amounts = torch.randn(40, 1, generator=generator, dtype=torch.float64) * 3
    positives = negatives + shift + amounts * spread
    found = direction(positives.float(), negatives.float(), "pca_diff")
    assert abs(float(found[1])) / float(found.norm()) > 0.95
    center = direction(positives.float(), negatives.float(), "pca_center")
    assert float(center[0]) / float(center.norm()) > 0.8


def test_orient_vote_follows_most_pairs_where_the_mean_follows_the_largest():
    # differences along axis 0: +10, -1, -1. The mean (+8/3) points one way, two of the
    # three pairs the other: `mean` keeps +, `vote` (repeng's rule) flips to -.
    negatives = torch.zeros(3, 2)
    positives = torch.tensor([[10.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    for method in ("mean_diff", "pca", "pca_diff", "pca_center"):
        by_mean = direction(positives, negatives, method)
        by_vote = direction(positives, negatives, method, orient="vote")
        assert float(by_mean[0]) > 0 and float(by_vote[0]) < 0, method
        assert torch.allclose(by_vote, -by_mean), method
    # a tied vote keeps the mean's sign (repeng keeps whatever sign its SVD gave)
    tied = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])
    assert float(direction(tied, torch.zeros(2, 2), "pca_diff", orient="vote")[0]) > 0


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_orient_vote_and_the_last_layer_after_the_final_norm_give_repengs_vector_sign_and_all(
        engine, tied_gdn, method):
    pairs = varied_pairs(10)
    last = engine.info.num_layers - 1
    ours = extract(engine, pairs, [last], method=method, read="last", orient="vote",
                   after_final_norm=True).vectors.directions[last]
    # transformers' hidden_states[last + 1] is hidden_states[-1]: after the final norm
    theirs = torch.from_numpy(repeng_direction(transformers_hidden(tied_gdn, pairs, last), method))
    cosine = float(torch.cosine_similarity(ours.double(), theirs, dim=0))
    assert cosine >= 0.99, cosine  # the sign too
    before = extract(engine, pairs, [last], method=method, read="last").vectors.directions[last]
    assert float(torch.cosine_similarity(before.double(), theirs, dim=0)) < 0.99


def test_orient_and_final_norm_are_checked_with_locations():
    from behaviorc.lang.check import check_text

    spec, diagnostics = check_text('model base = "tiny-gdn"\nbehavior b on base {\n  steer {\n'
                                   '    pair "p" { positive "a" negative "b" }\n'
                                   '    pair "q" { positive "c" negative "d" }\n'
                                   '    method pca_diff  orient vote  final_norm after\n  }\n}\n',
                                   "x.behavior")
    assert spec is not None, diagnostics
    steer = spec.behaviors[0].steer
    assert (steer.orient, steer.final_norm) == ("vote", "after")
    spec, diagnostics = check_text('model base = "tiny-gdn"\nbehavior b on base {\n  steer {\n'
                                   '    pair "p" { positive "a" negative "b" }\n'
                                   '    orient majority  final_norm later\n  }\n}\n', "x.behavior")
    assert spec is None
    errors = sorted((d.loc.line, d.loc.column, d.message, d.hint or "") for d in diagnostics
                    if d.severity == "error")
    assert [(line, column) for line, column, *_ in errors] == [(5, 12), (5, 33)], errors
    assert "unknown orientation `majority`" in errors[0][2] and "vote" in errors[0][3], errors
    assert "`later`" in errors[1][2] and "after" in errors[1][3], errors
