"""The vLLM engine against a real server (the session's `vllm_server`, tiny-gdn).

Every comparison is with the embedded engine (transformers, bfloat16) on the same
weights. Tests that change the server's weights or steering put the original back.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.vllm.push import push_weights
from behaviorc.engine.vllm.traffic import RequestLoop
from behaviorc.engine.vllm.client import ServerClient, VLLMEngine
from stand_in_server import stand_in_server

pytestmark = pytest.mark.vllm

PROMPTS = ["I will use", "The model", "def add(a, b):", ""]
COMPLETIONS = [" the existing parser.", " wants the data", "\n    return a + b", "Yes."]
# vLLM and transformers both run bfloat16 here; their log-probs differ by rounding only.
# vLLM and transformers both run bfloat16 and round differently. Measured against the
# embedded engine after pushes of `changed_weights` seeds 1-4: eager 0.012-0.033,
# compiled 0.024-0.032 (seed 0, no push: 0.004); a push that did not land moves > 0.1.
BF16_TOLERANCE = 0.05


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


@pytest.fixture(scope="module")
def engine(vllm_server):
    with VLLMEngine(vllm_server.url) as live:
        yield live


@pytest.fixture(scope="module")
def served_weights(vllm_server) -> dict[str, torch.Tensor]:
    return load_file(vllm_server.model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def embedded(vllm_server) -> EmbeddedEngine:
    """The embedded engine on the weights the server starts with."""
    return EmbeddedEngine.load(vllm_server.model_dir, dtype="bfloat16")


@pytest.fixture
def free_url() -> str:
    """A loopback URL nothing listens on."""
    from behaviorc.engine.vllm.server import free_port
    return f"http://127.0.0.1:{free_port('127.0.0.1')}"


@pytest.fixture
def restore(vllm_server, engine):
    """Put the served weights and steering back after a test that changes them."""
    yield
    engine.clear_steering()
    push_weights([vllm_server.url], vllm_server.model_dir)


def model_folder(tmp_path: Path, base: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A copy of `base` with these checkpoint tensors."""
    folder = tmp_path / "model"
    shutil.copytree(base, folder)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def changed_weights(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """New values for a GDN layer's projections and gates, one MoE expert, the head."""
    generator = torch.Generator().manual_seed(seed)
    picked = {name: tensor for name, tensor in weights.items()
              if name.startswith("model.layers.1.") and (
                  "linear_attn" in name or ".experts.2." in name)}
    picked["lm_head.weight"] = weights["lm_head.weight"]
    return {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
            for name, tensor in picked.items()}


def test_engine_describes_the_served_model(engine, vllm_server):
    info = engine.info
    assert info.path == str(vllm_server.model_dir)
    assert info.architecture == "Qwen3NextForCausalLM"
    assert info.num_layers == 4
    assert info.hidden_size == 128
    assert info.layer_kinds == ("gdn", "gdn", "gdn", "attention")
    assert engine.health()


def test_logprobs_match_embedded_engine(engine, embedded):
    live = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    assert max_difference(live, embedded.completion_logprobs(PROMPTS, COMPLETIONS)) \
        < BF16_TOLERANCE


def test_generate_is_batched_and_greedy(engine):
    first = engine.generate(["I will use", "The model", ""], max_new_tokens=6)
    assert len(first) == 3 and all(isinstance(text, str) for text in first)
    assert first[0] and first[1]  # an empty prompt may stop at once (EOS)
    assert engine.generate(["I will use", "The model", ""], max_new_tokens=6) == first


def test_partial_push_matches_embedded_engine_on_same_weights(
        engine, vllm_server, served_weights, tmp_path, restore):
    before = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    change = changed_weights(served_weights, seed=1)

    report = push_weights([vllm_server.url], change)

    after = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    assert max_difference(after, before) > 0.1  # the push reached the server
    # Whole layers travel: the rest of layer 1 came along unchanged.
    assert report.tensors > len(change)
    embedded = EmbeddedEngine.load(
        model_folder(tmp_path, vllm_server.model_dir, {**served_weights, **change}),
        dtype="bfloat16")
    assert max_difference(after, embedded.completion_logprobs(PROMPTS, COMPLETIONS)) \
        < BF16_TOLERANCE

    # Pushing the original folder back gives the original log-probs exactly.
    push_weights([vllm_server.url], vllm_server.model_dir)
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_whole_folder_push_matches_embedded_engine(
        engine, vllm_server, served_weights, tmp_path, restore):
    generator = torch.Generator().manual_seed(2)
    weights = {name: tensor * (1.0 + 0.2 * torch.rand((), generator=generator))
               for name, tensor in served_weights.items()}
    folder = model_folder(tmp_path, vllm_server.model_dir, weights)

    push_weights([vllm_server.url], folder)

    embedded = EmbeddedEngine.load(folder, dtype="bfloat16")
    assert max_difference(engine.completion_logprobs(PROMPTS, COMPLETIONS),
                          embedded.completion_logprobs(PROMPTS, COMPLETIONS)) < BF16_TOLERANCE


def margin(scores: list[list[float]], positives: int) -> float:
    means = [sum(row) / len(row) for row in scores]
    return sum(means[:positives]) / positives - sum(means[positives:]) / (len(means) - positives)


def test_steering_moves_margin_like_embedded_and_clear_restores(engine, embedded, restore):
    prompts = ["Use the existing parser.", "Use the existing parser."]
    completions = [" I'll use the existing parser.", " I'll write a new parser instead."]
    # A direction toward the positive completion's tokens in the unembedding, added at
    # the last decoder layer: on this random-weight model it must raise the margin.
    layer = 3
    vectors = {layer: token_direction(embedded, completions[0], completions[1])}
    unsteered = engine.completion_logprobs(prompts, completions)

    moves = {}
    for name, eng in (("vllm", engine), ("embedded", embedded)):
        base = margin(eng.completion_logprobs(prompts, completions), 1)
        eng.set_steering(vectors, STRENGTH)
        moves[name] = margin(eng.completion_logprobs(prompts, completions), 1) - base
        if name == "vllm":
            steered = eng.completion_logprobs(prompts, completions)
            assert max_difference(steered, embedded_steered(embedded, vectors, prompts,
                                                            completions)) < BF16_TOLERANCE
        eng.clear_steering()

    assert moves["embedded"] > 0.1
    assert moves["vllm"] > 0.1
    assert abs(moves["vllm"] - moves["embedded"]) < BF16_TOLERANCE
    assert engine.completion_logprobs(prompts, completions) == unsteered


STRENGTH = 8.0


def token_direction(embedded: EmbeddedEngine, positive: str, negative: str) -> torch.Tensor:
    head = embedded.model.get_output_embeddings().weight.detach().float()
    ids = [embedded.tokenizer(text).input_ids for text in (positive, negative)]
    return head[ids[0]].mean(0) - head[ids[1]].mean(0)


def embedded_steered(embedded, vectors, prompts, completions) -> list[list[float]]:
    embedded.set_steering(vectors, STRENGTH)
    try:
        return embedded.completion_logprobs(prompts, completions)
    finally:
        embedded.clear_steering()


def test_steering_a_missing_layer_is_refused(engine):
    with pytest.raises(BehaviorError, match="layer 9 out of range"):
        engine.set_steering({9: torch.ones(128)}, 1.0)


def test_hidden_states_say_not_supported(engine):
    with pytest.raises(BehaviorError, match="not supported by the vLLM engine"):
        engine.hidden_states(["a"], ["b"], [1])


@pytest.mark.parametrize("bad, expected", [
    ({"model.layers.0.mlp.gate.weight": torch.zeros(3, 3)}, "has shape \\[3, 3\\]"),
    ({"model.layers.0.mlp.gaet.weight": torch.zeros(4, 128)}, "did you mean"),
    ({"lm_head.weight": torch.full((365, 128), float("nan"))}, "NaN or infinite"),
    ({"model.norm.weight": torch.ones(128, dtype=torch.int64)}, "floating point"),
])
def test_bad_state_dict_is_refused_and_old_weights_stay(engine, vllm_server, bad, expected):
    before = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    with pytest.raises(BehaviorError, match=expected):
        push_weights([vllm_server.url], bad)
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_folder_missing_a_tensor_is_refused(engine, vllm_server, served_weights, tmp_path):
    before = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    partial = dict(served_weights)
    del partial["model.layers.3.self_attn.q_proj.weight"]
    folder = model_folder(tmp_path, vllm_server.model_dir, partial)
    with pytest.raises(BehaviorError, match="missing: `model.layers.3.self_attn.q_proj"):
        push_weights([vllm_server.url], folder)
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_folder_with_nan_is_refused(engine, vllm_server, served_weights, tmp_path):
    before = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    broken = dict(served_weights)
    broken["model.layers.0.linear_attn.A_log"] = torch.full_like(
        broken["model.layers.0.linear_attn.A_log"], float("inf"))
    with pytest.raises(BehaviorError, match="A_log` holds NaN or infinite"):
        push_weights([vllm_server.url], model_folder(tmp_path, vllm_server.model_dir, broken))
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_truncated_folder_is_refused(engine, vllm_server, tmp_path):
    before = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    folder = tmp_path / "truncated"
    shutil.copytree(vllm_server.model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(BehaviorError, match="cannot read the weights"):
        push_weights([vllm_server.url], folder)
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_replica_that_cannot_be_reached_stops_the_push_everywhere(
        engine, vllm_server, served_weights, free_url):
    before = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    with pytest.raises(BehaviorError, match=f"lost the vLLM server at {free_url}"):
        push_weights([vllm_server.url, free_url], changed_weights(served_weights, seed=3))
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_replica_refusing_the_push_rolls_back_the_ones_pushed(
        engine, vllm_server, served_weights, tmp_path, restore):
    before = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    change = {name: tensor * 1.1 for name, tensor in served_weights.items()}
    folder = model_folder(tmp_path, vllm_server.model_dir, change)
    with stand_in_server("refuse") as (refusing, _):
        with pytest.raises(BehaviorError, match="the stand-in refuses every push"):
            push_weights([vllm_server.url, refusing], folder)
    # The real server took the push first, then went back to the weights it had.
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == before


def test_no_request_fails_during_repeated_pushes_under_load(
        engine, vllm_server, served_weights, restore):
    weight_sets = [changed_weights(served_weights, seed) for seed in (4, 5)]
    with RequestLoop([vllm_server.url], threads=2, limit=60) as load:
        for round_ in range(6):
            push_weights([vllm_server.url], weight_sets[round_ % 2])
    assert load.requests, "the load loop sent no request"
    assert load.failed == []
    # The last push (seed 5) is what the server serves now.
    expected = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    push_weights([vllm_server.url], weight_sets[1])
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == expected


def test_prefix_cache_is_reset_while_requests_run(vllm_server):
    """Each push and steering change resets the prefix cache. vLLM refuses a plain reset
    while requests hold cache blocks, which under load is nearly always; behaviorc's
    reset preempts them instead, and none of them fails."""
    client = ServerClient(vllm_server.url)
    try:
        # Long answers (128 tokens, end-of-text ignored) keep a request in flight
        # nearly all the time, so a plain reset finds blocks held.
        with RequestLoop([vllm_server.url], threads=2, limit=20, max_tokens=128,
                         extra={"ignore_eos": True}) as load:
            while len(load.requests) < 2:
                time.sleep(0.05)
            plain = []
            while len(plain) < 400 and False not in plain:
                plain.append(client.request("POST", "/reset_prefix_cache", "resetting")["success"])
            for _ in range(5):
                client.reset_prefix_cache()  # raises when vLLM did not reset
        assert False in plain  # the load held blocks: a plain reset was refused
        assert load.failed == []
    finally:
        client.close()
