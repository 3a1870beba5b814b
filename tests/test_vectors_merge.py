"""Merge methods on small hand-made tensors, against results worked out by hand."""

import numpy as np
import pytest

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.compose.merge import (
    MergeOptions, _radix_select, kth_largest, kth_largest_of_parts, merged_delta, trim_to_top_)
from behaviorc.formats.safetensors_io import from_float32, to_float32


def merge(deltas, weights, **options):
    copies = [np.array(d, dtype=np.float32) for d in deltas]
    return merged_delta("w", copies, list(weights), list(range(len(deltas))),
                        MergeOptions(**options))


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
    assert set(np.unique(first).tolist()) == {0.0, 1.0}  # survivors scaled by 1/density
    assert abs(float((first != 0).mean()) - 0.25) < 0.01


def test_trim_keeps_exactly_the_top_share_and_everything_tied_with_the_last():
    values = np.array([0.1, -0.9, 0.3, 0.3, -0.2, 0.05, 0.7, -0.3], dtype=np.float32)
    distinct = np.array([0.1, -0.9, 0.35, 0.3, -0.2, 0.05, 0.7, -0.4], dtype=np.float32)
    trim_to_top_(distinct, 0.5)
    assert np.array_equal(distinct, np.array([0, -0.9, 0.35, 0, 0, 0, 0.7, -0.4], np.float32))
    trim_to_top_(values, 0.5)  # the 4th largest magnitude, 0.3, is shared by three entries
    assert np.array_equal(values, np.array([0, -0.9, 0.3, 0.3, 0, 0, 0.7, -0.3], np.float32))


def as_bfloat16(values: np.ndarray) -> np.ndarray:
    return to_float32(from_float32(values, "BF16"), "BF16")


def kth_by_sorting(values: np.ndarray, k: int) -> np.float32:
    return np.sort(values)[values.size - k]


@pytest.mark.parametrize("kind", ["normal", "quantized", "constant", "sparse"])
def test_kth_largest_matches_a_full_selection(kind):
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
        assert kth_largest(values, k) == kth_by_sorting(values, k)
        assert np.array_equal(values, original)  # without `reorder`, values stay as they were
        assert kth_largest(original, k, reorder=True) == kth_by_sorting(values, k)


def test_bad_options_are_refused():
    with pytest.raises(BehaviorError, match="density"):
        MergeOptions(method="ties", density=0)
    with pytest.raises(BehaviorError) as refused:
        MergeOptions(method="tie")
    assert "did you mean `ties`" in refused.value.render()


def test_selection_over_parts_and_by_radix_matches_a_full_selection():
    values = as_bfloat16(np.abs(np.random.default_rng(1).standard_normal(120_000, dtype=np.float32)))
    doubled = values * 2
    split = lambda array: np.split(array, [50_000, 100_000])
    parts = lambda: ([a, b] for a, b in zip(split(values), split(doubled)))
    for k in (1, 24_000, 119_999):
        expected = kth_by_sorting(values, k)
        assert _radix_select(lambda: iter(split(values)), k) == expected
        found = kth_largest_of_parts(parts, values.size, k, [values[:5000], doubled[:5000]])
        assert found == [expected, expected * 2]
        # Samples from elsewhere misjudge the brackets; the answers are still exact.
        found = kth_largest_of_parts(parts, values.size, k, [values[:5000] * 3, doubled[:9]])
        assert found == [expected, expected * 2]


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
