"""Merge methods on small hand-made tensors, against results worked out by hand."""

import os
from pathlib import Path

import numpy as np
import pytest

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.compose.merge import (
    MergeOptions, RankCut, _radix_select, della_keep_probabilities, kth_largest_of_parts,
    merged_delta, parameter_plan, rank_cut, trim_to_top_)
from behaviorc.core.merge_methods import METHODS
from behaviorc.formats.safetensors_io import from_float32, to_float32


def merge(deltas, weights, row_entries=None, base=None, **options):
    copies = [np.array(d, dtype=np.float32) for d in deltas]
    return merged_delta("w", copies, list(weights), list(range(len(deltas))),
                        MergeOptions(**options), row_entries=row_entries, base=base)


def test_ties_equals_the_hand_computed_result():
    # density 0.5 keeps 2 of 4 entries per vector:
    #   tau1 -> [0.5, 0, 0, -0.875]   tau2 -> [-0.375, 0.25, 0, 0]   tau3 -> [0, -0.625, 0, 0.75]
    # summed mass [0.125, -0.375, 0, -0.125] elects signs [+, -, +, -]; the agreeing
    # entries' mean: [0.5, -0.625, 0 (nobody has it), -0.875].
    result = merge([[0.5, -0.25, 0.125, -0.875],
                    [-0.375, 0.25, 0.0625, -0.125],
                    [0.25, -0.625, -0.375, 0.75]],
                   [1.0, 1.0, 1.0], method="ties", density=0.5)
    assert np.array_equal(result, [0.5, -0.625, 0.0, -0.875])


def test_ties_weights_lambda_and_the_signed_divisor():
    # No trim (density 1). Weighted: [0.5, 0.25] and [-0.25, 0.5] (weight -1); both
    # entries elect +. Entry 0: only term 1 agrees -> 0.5 / 1. Entry 1: both agree, the
    # weights sum to 0, so (as in mergekit) the divisor becomes 1 -> 0.75. Lambda 2.
    result = merge([[0.5, 0.25], [0.25, -0.5]], [1.0, -1.0],
                   method="ties", density=1.0, lambda_=2.0)
    assert np.array_equal(result, [1.0, 1.5])


def test_ties_without_normalize_sums_the_agreeing_entries():
    # Weighted: [1.0, -0.5] and [0.5, 0.25]; mass [1.5, -0.25] elects [+, -].
    result = merge([[0.5, -0.25], [1.0, 0.5]], [2.0, 0.5], method="ties", normalize=False)
    assert np.array_equal(result, [1.5, -0.5])


def test_task_arithmetic_is_the_weighted_sum():
    result = merge([[1.0, -2.0], [0.5, 0.5]], [0.5, -2.0], method="task_arithmetic",
                   lambda_=0.5)
    assert np.array_equal(result, [-0.25, -1.0])


def test_dare_at_density_one_is_task_arithmetic():
    generator = np.random.default_rng(3)
    deltas = [generator.standard_normal((64, 32), dtype=np.float32) for _ in range(3)]
    weights = [1.0, 0.5, -0.8]
    dare = merged_delta("w", [d.copy() for d in deltas], weights, [0, 1, 2],
                        MergeOptions(method="dare", density=1.0, seed=7))
    plain = merged_delta("w", [d.copy() for d in deltas], weights, [0, 1, 2],
                         MergeOptions(method="task_arithmetic"))
    assert np.array_equal(dare, plain)


def test_dare_drops_and_rescales_reproducibly():
    tau = np.full((100_000,), 0.25, dtype=np.float32)
    first = merged_delta("w", [tau.copy()], [1.0], [0], MergeOptions(method="dare", density=0.25, seed=1))
    again = merged_delta("w", [tau.copy()], [1.0], [0], MergeOptions(method="dare", density=0.25, seed=1))
    other = merged_delta("w", [tau.copy()], [1.0], [0], MergeOptions(method="dare", density=0.25, seed=2))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    kept = int(np.count_nonzero(first))
    assert abs(kept / tau.size - 0.25) < 0.01
    # mergekit's rescale: the survivors carry the L1 norm tau had, 0.25 * n / kept each.
    assert np.allclose(first[first != 0], 0.25 * tau.size / kept, rtol=1e-6)
    unscaled = merged_delta("w", [tau.copy()], [1.0], [0],
                            MergeOptions(method="dare", density=0.25, seed=1, rescale=False))
    assert np.array_equal(unscaled != 0, first != 0) and set(np.unique(unscaled)) == {0, 0.25}


def test_dare_ties_is_dare_then_the_sign_election_without_normalizing():
    # At density 1 nothing drops: the TIES election and mix of the weighted vectors,
    # summed (dare_ties does not normalize by default, as in mergekit).
    # Weighted: [1.0, -0.5] and [0.5, 0.25]; mass [1.5, -0.25] elects [+, -].
    result = merge([[0.5, -0.25], [1.0, 0.5]], [2.0, 0.5], method="dare_ties", density=1.0)
    assert np.array_equal(result, [1.5, -0.5])
    generator = np.random.default_rng(5)
    deltas = [generator.standard_normal(50_000, dtype=np.float32) for _ in range(3)]
    weights = [1.0, 0.5, -0.8]
    linear = merge(deltas, weights, method="dare_linear", density=0.3, seed=4)
    ties = merge(deltas, weights, method="dare_ties", density=0.3, seed=4)
    assert np.array_equal(linear, merge(deltas, weights, method="dare", density=0.3, seed=4))
    # The same drops: where all weighted entries have one sign, the same sum.
    signs = np.sign([d * w for d, w in zip(deltas, weights)])
    unanimous = (signs >= 0).all(axis=0) | (signs <= 0).all(axis=0)
    assert np.allclose(linear[unanimous], ties[unanimous], rtol=1e-6, atol=0)
    assert not np.allclose(linear, ties)


def test_ties_keeps_exactly_k_and_breaks_ties_by_position():
    # Five entries share the largest magnitude; density 0.5 keeps 4 of 8: the first four
    # of them in position.
    values = np.array([0.3, -0.3, 0.1, 0.3, -0.3, 0.2, 0.3, 0.05], np.float32)
    trim_to_top_(values, 0.5)
    assert np.array_equal(values, np.array([0.3, -0.3, 0, 0.3, -0.3, 0, 0, 0], np.float32))
    distinct = np.array([0.1, -0.9, 0.35, 0.3, -0.2, 0.05, 0.7, -0.4], dtype=np.float32)
    trim_to_top_(distinct, 0.5)
    assert np.array_equal(distinct, np.array([0, -0.9, 0.35, 0, 0, 0, 0.7, -0.4], np.float32))


def test_ties_density_is_exact_on_bfloat16_and_independent_of_pieces():
    # bfloat16 deltas of a normal spread: hundreds of entries tie at any threshold.
    generator = np.random.default_rng(2)
    deltas = [as_bfloat16(generator.standard_normal(96_000, dtype=np.float32) * 0.01)
              for _ in range(3)]
    weights, options = [1.0, 0.5, -0.8], MergeOptions(method="ties", density=0.2)
    for delta in deltas:
        trimmed = delta.copy()
        trim_to_top_(trimmed, 0.2)
        assert np.count_nonzero(trimmed) == 19_200  # exactly int(0.2 * n)
        threshold = np.sort(np.abs(delta))[-19_200]
        assert np.count_nonzero(np.abs(delta) == threshold) > 100  # there were ties
    whole = merged_delta("w", [d.copy() for d in deltas], weights, [0, 1, 2], options)
    # The same merge in pieces of 10,000 entries, its cuts found over parts.
    pieces = [slice(start, start + 10_000) for start in range(0, 96_000, 10_000)]
    magnitudes = lambda: ([np.abs(d[p]) for d in deltas] for p in pieces)
    plan = parameter_plan("w", options, (96_000,), 96_000, [0, 1, 2], weights,
                          lambda: iter([(0, np.zeros(96_000, np.float32),
                                         [d.copy() for d in deltas])]),
                          lambda ks: kth_largest_of_parts(magnitudes, 96_000, ks,
                                                          [np.abs(d[::7]) for d in deltas]))
    pieced = np.concatenate([merged_delta("w", [d[p].copy() for d in deltas], weights,
                                          [0, 1, 2], options, plan, offset=p.start)
                             for p in pieces])
    assert np.array_equal(whole, pieced)


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    # n = 10, density 0.5, gamma 0.1: the largest (0.9) drops, the next five stay.
    tau = [0.9, -0.1, 0.5, 0.3, -0.7, 0.2, 0.05, 0.4, -0.6, 0.15]
    result = merge([tau], [2.0], method="breadcrumbs", density=0.5, gamma=0.1)
    assert np.array_equal(result, np.array([0, 0, 1.0, 0.6, -1.4, 0, 0, 0.8, -1.2, 0],
                                           np.float32))
    # gamma 0.6 with density 0.5: only 0.5 * n may drop above the kept entries.
    result = merge([tau], [1.0], method="breadcrumbs", density=0.5, gamma=0.6)
    assert np.array_equal(result, np.array([0, -0.1, 0, 0.3, 0, 0.2, 0.05, 0, 0, 0.15],
                                           np.float32))
    # breadcrumbs_ties: the same trims (of 4 entries the largest drops and the next two
    # stay): [0, 0.5, 0, 0.2] and [0.25, 0, 0.3, 0]; then TIES's election, where -0.8
    # (dropped) no longer outvotes 0.5, and a sum (normalize is off by default).
    result = merge([[0.9, 0.5, 0.1, 0.2], [0.25, -0.8, 0.3, 0.1]], [1.0, 1.0],
                   method="breadcrumbs_ties", density=0.5, gamma=0.25)
    assert np.array_equal(result, np.array([0.25, 0.5, 0.3, 0.2], np.float32))


def test_della_keep_probabilities_follow_the_magnitude_ranks():
    # Ranks from the smallest: 0.1 -> 0, 0.2 -> 1, the later 0.4 -> 2, the earlier -0.4 -> 3;
    # p = 0.5 - 0.3 + 0.6 * r / 3.
    rows = np.array([[0.1, -0.4, 0.2, 0.4]], np.float32)
    assert np.allclose(della_keep_probabilities(rows, 0.5, 0.3), [[0.2, 0.8, 0.4, 0.6]])
    # Kept shares follow, rescaled to the L1 norm of the vector.
    tau = np.tile(np.array([0.1, -0.4, 0.2, 0.4], np.float32), 40_000)
    result = merge([tau], [1.0], method="della", density=0.5, epsilon=0.3, row_entries=4)
    kept = (result.reshape(-1, 4) != 0).mean(axis=0)
    assert np.allclose(kept, [0.2, 0.8, 0.4, 0.6], atol=0.01)
    assert abs(np.abs(result).sum(dtype=np.float64) / np.abs(tau).sum(dtype=np.float64) - 1) < 1e-5


def test_model_stock_moves_toward_the_mean_by_the_cosine():
    # tau1 = [3, 4], tau2 = [4, 3]: cos = 24/25, N = 2: t = 2 cos / (1 + cos) = 48/49;
    # base + t * mean = t * [3.5, 3.5] = [24/7, 24/7]. Weights do not enter.
    result = merge([[3.0, 4.0], [4.0, 3.0]], [1.0, 1.0], method="model_stock")
    assert np.allclose(result, [24 / 7, 24 / 7], rtol=1e-6)
    # A third model without this parameter has tau 0: its two pairs have cosine 0, so
    # cos = (24/25) / 3 = 0.32 and t = 3 cos / (1 + 2 cos) = 0.96 / 1.64, times the
    # mean [7/3, 7/3].
    result = merged_delta("w", [np.array([3.0, 4.0], np.float32),
                                np.array([4.0, 3.0], np.float32)],
                          [1.0, 1.0], [0, 2], MergeOptions(method="model_stock"), term_count=3)
    assert np.allclose(result, [0.96 / 1.64 * 7 / 3] * 2, rtol=1e-6)


def test_model_stock_filter_wise_and_the_singular_case():
    # Row 0: cos 24/25, t = 48/49, times the mean [3.5, 3.5]; row 1: cos 0, t = 0.
    result = merge([[[3.0, 4.0], [1.0, 0.0]], [[4.0, 3.0], [0.0, 1.0]]], [1.0, 1.0],
                   method="model_stock", filter_wise=True)
    assert np.allclose(result, [[24 / 7, 24 / 7], [0, 0]], rtol=1e-6)
    # Opposite vectors: 1 + (N - 1) cos = 0, no finite estimate: the base (as mergekit).
    assert np.array_equal(merge([[1.0, 0.0], [-1.0, 0.0]], [1.0, 1.0], method="model_stock"),
                          [0, 0])


def test_linear_mixes_the_models_weights():
    base = np.array([10.0, 10.0], np.float32)
    deltas, weights = [[1.0, 2.0], [3.0, -2.0]], [1.0, 3.0]
    # normalize (the default): (1 * [11, 12] + 3 * [13, 8]) / 4 = base + [2.5, -1]
    assert np.allclose(merge(deltas, weights, method="linear", base=base), [2.5, -1.0])
    # without: 1 * [11, 12] + 3 * [13, 8] = [50, 36], so the delta is [40, 26]
    assert np.allclose(merge(deltas, weights, method="linear", normalize=False, base=base),
                       [40.0, 26.0])


def test_slerp_from_the_base_and_between_two_models():
    # One term: from base [1, 0] to base + tau = [0, 1], a right angle; t = 0.5 gives
    # sin(pi/4) of each: [0.7071, 0.7071], so the delta is that less the base.
    half = np.sqrt(0.5)
    result = merge([[-1.0, 1.0]], [1.0], method="slerp", t=0.5,
                   base=np.array([1.0, 0.0], np.float32))
    assert np.allclose(result, [half - 1, half], atol=1e-7)
    # Two terms on a zero base: [2, 0] to [0, 2], t = 1/3: sin(pi/3) [2, 0] + sin(pi/6) [0, 2].
    result = merge([[2.0, 0.0], [0.0, 2.0]], [1.0, 1.0], method="slerp", t=1 / 3,
                   base=np.zeros(2, np.float32))
    assert np.allclose(result, [np.sqrt(3), 1.0], atol=1e-6)
    # Nearly parallel (cos > 0.9995): the plain (1 - t, t) mix.
    result = merge([[1.0, 0.0], [2.0, 0.01]], [1.0, 1.0], method="slerp", t=0.25,
                   base=np.zeros(2, np.float32))
    assert np.allclose(result, [1.25, 0.0025], atol=1e-7)


def test_nuslerp_by_tensor_row_and_column():
    s8, s38 = np.sin(np.pi / 8), np.sin(3 * np.pi / 8)
    # Weights 1 and 3: t = 0.75; a right angle: sin(pi/8) tau_1 + sin(3 pi/8) tau_2.
    assert np.allclose(merge([[1.0, 0.0], [0.0, 1.0]], [1.0, 3.0], method="nuslerp"),
                       [s8, s38], atol=1e-7)
    first, second = [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 0.0]]
    # Per row: row 0 a right angle; row 1 parallel, so 0.25 [1, 0] + 0.75 [2, 0].
    rows = merge([first, second], [1.0, 3.0], method="nuslerp", flatten=False)
    assert np.allclose(rows, [[s8, s38], [1.75, 0.0]], atol=1e-7)
    # Per column: column 0 is [1, 1] and [0, 2], 45 degrees apart; column 1 is 0 and
    # [1, 0] (a zero vector counts as orthogonal).
    columns = merge([first, second], [1.0, 3.0], method="nuslerp", flatten=False,
                    row_wise=True)
    a, b = np.sin(np.pi / 16) / np.sin(np.pi / 4), np.sin(3 * np.pi / 16) / np.sin(np.pi / 4)
    assert np.allclose(columns, [[a, s38], [a + 2 * b, 0.0]], atol=1e-6)


def test_multislerp_is_the_weighted_mean_direction_at_the_mean_norm():
    # Units [1, 0] and [0, 1] with weights 1/4, 3/4: direction [1, 3] / sqrt(10); the
    # weighted mean norm 0.25 * 3 + 0.75 * 1 = 1.5. (The tangent mean at the normalized
    # mean direction is always 0, so mergekit's exp map returns that direction.)
    result = merge([[3.0, 0.0], [0.0, 1.0]], [1.0, 3.0], method="multislerp")
    assert np.allclose(result, 1.5 * np.array([1.0, 3.0]) / np.sqrt(10), rtol=1e-6)
    assert np.array_equal(merge([[3.0, -1.0]], [2.0], method="multislerp"), [3.0, -1.0])
    with pytest.raises(BehaviorError, match="weighted mean direction"):
        merge([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], [1.0, 1.0, 1.0], method="multislerp")


def test_karcher_mean_on_the_sphere():
    # Angles 0, 90 and 90 degrees: the Karcher mean is at 60 degrees (one step from the
    # normalized average at 63.4); the mean norm is 1.
    zero = np.zeros(2, np.float32)
    result = merge([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [1.0] * 3, method="karcher", base=zero)
    assert np.allclose(result, [0.5, np.sqrt(3) / 2], atol=1e-6)
    # Norms 2 and 1 at a right angle: the bisector at their mean norm 1.5.
    result = merge([[2.0, 0.0], [0.0, 1.0]], [1.0, 1.0], method="karcher", base=zero)
    assert np.allclose(result, [1.5 * np.sqrt(0.5)] * 2, atol=1e-6)
    # On a base [1, 1]: the models [2, 0] and [0, 2], whose mean (norm 2) less the base.
    base = np.array([1.0, 1.0], np.float32)
    result = merge([[1.0, -1.0], [-1.0, 1.0]], [1.0, 1.0], method="karcher", base=base)
    assert np.allclose(result + base, [np.sqrt(2)] * 2, atol=1e-6)


def test_rescale_on_ties_and_breadcrumbs_restores_the_l1_norm():
    # ties, density 0.5 keeps [4, 0, 2, 0]: L1 6 of 8, so times 4/3.
    result = merge([[4.0, -1.0, 2.0, 1.0]], [1.0], method="ties", density=0.5, rescale=True)
    assert np.allclose(result, [16 / 3, 0, 8 / 3, 0])
    # breadcrumbs, density 0.5, gamma 0.25: drops the largest (8) and the smallest two,
    # keeps [-2, 4]: L1 6 of 15.5, so times 15.5 / 6.
    result = merge([[8.0, 4.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0]], [1.0], method="breadcrumbs",
                   density=0.25, gamma=0.125, rescale=True)
    assert np.allclose(result, [0, 4 * 15.5 / 6, -2 * 15.5 / 6, 0, 0, 0, 0, 0])


def test_each_term_has_its_own_density_and_density_zero_keeps_nothing():
    from behaviorc.compose.merge import TermSettings

    # Term 1 keeps 2 of 4 ([4, 0, 2, 0]), term 2 all of it; plain sum.
    result = merge([[4.0, -1.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]], [1.0, 1.0],
                   method="breadcrumbs", density=1.0, gamma=0.0,
                   terms=(TermSettings(density=0.5), TermSettings()))
    assert np.allclose(result, [5.0, 1.0, 3.0, 1.0])
    for method in ("ties", "dare_linear", "della", "breadcrumbs"):
        assert not merge([[4.0, -1.0, 2.0, 1.0]], [1.0], method=method, density=0.0).any()
    # della: each term's own epsilon is checked against its density.
    with pytest.raises(BehaviorError, match=r"epsilon 0.3 .* \(term 2\)"):
        MergeOptions(method="della", density=0.5, epsilon=0.1,
                     terms=(TermSettings(), TermSettings(density=0.8, epsilon=0.3)))


def as_bfloat16(values: np.ndarray) -> np.ndarray:
    return to_float32(from_float32(values, "BF16"), "BF16")


def kth_by_sorting(values: np.ndarray, k: int) -> np.float32:
    return np.sort(values)[values.size - k]


@pytest.mark.parametrize("kind", ["normal", "quantized", "constant", "sparse"])
def test_rank_cut_matches_a_full_selection(kind):
    values = np.abs(np.random.default_rng(0).standard_normal(200_000, dtype=np.float32))
    if kind == "quantized":  # bfloat16 steps: many entries tie at any threshold
        values = as_bfloat16(values)
    elif kind == "constant":
        values = np.full((200_000,), 0.5, dtype=np.float32)
    elif kind == "sparse":
        values[values < 1.5] = 0
    for share in (0.001, 0.2, 0.5, 0.99):
        k = max(1, int(share * values.size))
        original = values.copy()
        cut = rank_cut(values, k)
        assert cut.threshold == kth_by_sorting(values, k)
        assert cut.ties == k - np.count_nonzero(values > cut.threshold)
        assert np.array_equal(values, original)  # the selection works on a copy


def test_bad_options_are_refused():
    with pytest.raises(BehaviorError, match="density 1.5 is outside"):
        MergeOptions(method="ties", density=1.5)
    with pytest.raises(BehaviorError) as refused:
        MergeOptions(method="tie")
    assert "did you mean `ties`" in refused.value.render()
    with pytest.raises(BehaviorError, match="epsilon 0.3 puts della's keep probabilities"):
        MergeOptions(method="della", density=0.8, epsilon=0.3)
    with pytest.raises(BehaviorError, match="gamma 1 is outside"):
        MergeOptions(method="breadcrumbs", density=0.5, gamma=1)
    with pytest.raises(BehaviorError, match="`task_arithmetic` does not rescale"):
        MergeOptions(method="task_arithmetic", rescale=True)
    assert MergeOptions(method="dare").method == "dare_linear"


def test_selection_over_parts_and_by_radix_matches_a_full_selection():
    values = as_bfloat16(np.abs(np.random.default_rng(1).standard_normal(120_000, dtype=np.float32)))
    doubled = values * 2
    split = lambda array: np.split(array, [50_000, 100_000])
    parts = lambda: ([a, b] for a, b in zip(split(values), split(doubled)))
    for k in (1, 24_000, 119_999):
        expected = kth_by_sorting(values, k)
        ties = k - int(np.count_nonzero(values > expected))  # tied entries the cut takes
        assert _radix_select(lambda: iter(split(values)), k) == RankCut(expected, ties)
        found = kth_largest_of_parts(parts, values.size, [k, k], [values[:5000], doubled[:5000]])
        assert found == [RankCut(expected, ties), RankCut(expected * 2, ties)]
        assert rank_cut(values, k) == RankCut(expected, ties)
        # Samples from elsewhere misjudge the brackets; the answers are still exact.
        found = kth_largest_of_parts(parts, values.size, [k, k], [values[:5000] * 3, doubled[:9]])
        assert found == [RankCut(expected, ties), RankCut(expected * 2, ties)]


def test_bfloat16_conversions_round_as_torch_does():
    import torch

    generator = torch.Generator().manual_seed(2)
    halfway = (torch.randint(0, 0x7F7F, (50_000,), generator=generator, dtype=torch.int32) << 16
               | 0x8000)  # exactly between two bfloat16 values: ties go to even
    values = torch.cat([
        torch.randn(50_000, generator=generator) * 0.02, halfway.view(torch.float32),
        -halfway.view(torch.float32),
        torch.tensor([0.0, -0.0, 3.4e38, -3.4e38, 1e-40, -1e-42, float("inf"), -float("inf")])])
    expected = values.to(torch.bfloat16)
    stored = from_float32(values.numpy().copy(), "BF16")
    assert np.array_equal(stored, expected.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(to_float32(stored, "BF16"), expected.float().numpy())
    with_scratch = from_float32(values.numpy().copy(), "BF16",
                                scratch=np.empty(values.numel(), np.uint32))
    assert np.array_equal(with_scratch, stored)
    not_a_number = from_float32(np.array([1.0, np.nan], np.float32), "BF16")
    assert np.isnan(to_float32(not_a_number, "BF16")[1])
    assert np.array_equal(from_float32(values.numpy().copy(), "F16"), values.to(torch.float16).numpy())


MERGEKIT_GOLDEN = Path(__file__).parent / "golden" / "mergekit"
EXPORTED = {
    "task_arithmetic": dict(lambda_=0.8),
    "ties": dict(density=0.2),
    "dare_linear": dict(density=0.3, seed=3),
    "dare_ties": dict(density=0.3, rescale=False),
    "della": dict(density=0.4, epsilon=0.1),
    "della_linear": dict(density=0.4),
    "breadcrumbs": dict(density=0.5, gamma=0.05),
    "breadcrumbs_ties": dict(density=0.5, normalize=True),
    "model_stock": dict(filter_wise=True),
    "linear": dict(normalize=False),
    "slerp": dict(t=0.3),
    "nuslerp": dict(flatten=False, row_wise=True),
    "multislerp": dict(eps=1e-7),
    "karcher": dict(max_iter=20, tol=1e-6),
}


@pytest.mark.parametrize("method", sorted(EXPORTED))
def test_each_method_exports_its_mergekit_yaml(method):
    """The YAML `show --mergekit` prints for each method (the bench runs these through
    mergekit itself; mergekit 0.1.5's config schema accepts each golden file)."""
    from behaviorc.compose.mergekit_yaml import mergekit_yaml

    weights = [1.0, -0.5] if METHODS[method].weighted else [1.0, 1.0]
    own = {"density": 0.5} if method == "ties" else {}  # a term's own density
    record = {"name": "persona", "expression": "a + b", "base": {"path": "/models/base"},
              "merge": MergeOptions(method=method, **EXPORTED[method]).describe(),
              "terms": [{"behavior": "a", "weight": weights[0], "path": "/models/a",
                         "model": "/models/a", **own},
                        {"behavior": "b", "weight": weights[1], "path": "b.safetensors"}],
              "dtype": "bfloat16"}
    golden = MERGEKIT_GOLDEN / f"{method}.yaml"
    if os.environ.get("BEHAVIORC_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(mergekit_yaml(record))
    assert mergekit_yaml(record) == golden.read_text()
