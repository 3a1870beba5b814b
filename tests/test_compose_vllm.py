"""A composed tiny-gdn in a live vLLM server (the session's `vllm_server`): the served
log-probs equal transformers' on the same folder, to bfloat16 rounding."""

from __future__ import annotations

import pytest

from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.vllm.push import push_weights
from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.compose.composition import Composition, Term, compose
from behaviorc.compose.merge import MergeOptions
from behaviorc.compose.taskvector import extract_task_vector
from test_compose_models import perturbed_copy

pytestmark = pytest.mark.vllm

PROMPTS = ["I will use", "The model", "def add(a, b):"]
COMPLETIONS = [" the existing parser.", " wants the data", "\n    return a + b"]
BF16_TOLERANCE = 0.03  # both sides run bfloat16; they differ by rounding only


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_a_composed_model_serves_with_the_log_probs_of_transformers(vllm_server, tiny_gdn,
                                                                   tmp_path):
    tuned = perturbed_copy(tiny_gdn, tmp_path / "tuned", seed=3)
    other = perturbed_copy(tiny_gdn, tmp_path / "other", seed=4)
    extract_task_vector(tiny_gdn, tuned, tmp_path / "tuned.safetensors")
    composed = tmp_path / "composed"
    compose(Composition(tiny_gdn, (Term("tuned", tmp_path / "tuned.safetensors", 1.0),
                                   Term("other", other, -0.6)),
                        MergeOptions(method="ties", density=0.5)),
            composed, max_shard_bytes=300_000)  # sharded, with an index file

    expected = EmbeddedEngine.load(composed, dtype="bfloat16").completion_logprobs(
        PROMPTS, COMPLETIONS)
    # bfloat16 rounding alone moves some log-probs by more than the usual tolerance (0.04
    # at one token of this composition, in transformers itself): the served values must
    # be as near the exact (float32) ones as transformers' own bfloat16 values are
    exact = EmbeddedEngine.load(composed, dtype="float32").completion_logprobs(
        PROMPTS, COMPLETIONS)
    rounding = max_difference(expected, exact)
    original = EmbeddedEngine.load(tiny_gdn, dtype="bfloat16").completion_logprobs(
        PROMPTS, COMPLETIONS)
    assert max_difference(expected, original) > 10 * BF16_TOLERANCE  # composing changed it
    try:
        push_weights([vllm_server.url], composed)
        with VLLMEngine(vllm_server.url) as live:
            served = live.completion_logprobs(PROMPTS, COMPLETIONS)
        assert max_difference(served, exact) < rounding + BF16_TOLERANCE
    finally:
        push_weights([vllm_server.url], vllm_server.model_dir)
