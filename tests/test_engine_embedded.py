"""The embedded engine on both tiny models: real forwards, no mocks."""

import pytest
import torch

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.protocol import Engine

PROMPTS = ["Use the existing parser.", "Hi", "", "We should write a new parser instead of the old code now"]
COMPLETIONS = [" I'll use the existing parser.", " there", "Hello, world.", " ok"]


@pytest.fixture(scope="module", params=["tiny_gdn", "tiny_dense"])
def engine(request):
    return EmbeddedEngine.load(request.getfixturevalue(request.param), device="cpu")


@pytest.fixture(scope="module")
def gdn_engine(tiny_gdn):
    return EmbeddedEngine.load(tiny_gdn, device="cpu")


def _reference_logprobs(engine, prompt, completion):
    """Straight from one unpadded full forward of the whole model."""
    ids, prompt_len = engine._encode(prompt, completion)
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[t - 1, ids[t]].item() for t in range(prompt_len, len(ids))]


def test_implements_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.info.num_layers == 4 and engine.info.hidden_size == 128


def test_greedy_generation_is_repeatable(engine):
    first = engine.generate(PROMPTS[:3], max_new_tokens=6)
    assert first == engine.generate(PROMPTS[:3], max_new_tokens=6)
    assert any(first) and len(first) == 3


def test_seeded_sampling_is_repeatable(engine):
    runs = [engine.generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=s) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_batched_logprobs_equal_unbatched(engine):
    batched = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    for prompt, completion, got in zip(PROMPTS, COMPLETIONS, batched):
        alone = engine.completion_logprobs([prompt], [completion])[0]
        reference = _reference_logprobs(engine, prompt, completion)
        assert len(got) == len(alone) == len(reference) > 0
        assert torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-5, rtol=0)
        assert torch.allclose(torch.tensor(got), torch.tensor(reference), atol=1e-5, rtol=0)
        assert all(lp < 0 for lp in got)


def test_steering_zero_changes_nothing_and_clear_restores(engine):
    base = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    vector = torch.randn(128, generator=torch.Generator().manual_seed(0))
    engine.set_steering({1: vector, 2: -vector}, strength=0.0)
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == base
    engine.set_steering({1: vector, 2: -vector}, strength=8.0)
    steered = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    assert max(abs(a - b) for s, r in zip(steered, base) for a, b in zip(s, r)) > 1e-3
    engine.clear_steering()
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == base


def test_steering_rejects_bad_vectors(engine):
    with pytest.raises(BehaviorError, match="layer 9 does not exist"):
        engine.set_steering({9: torch.zeros(128)}, 1.0)
    with pytest.raises(BehaviorError, match="shape"):
        engine.set_steering({1: torch.zeros(64)}, 1.0)
    with pytest.raises(BehaviorError, match="NaN"):
        engine.set_steering({1: torch.full((128,), float("nan"))}, 1.0)


@pytest.mark.parametrize("read", ["last", "mean"])
def test_early_exit_hidden_states_equal_full_forward(engine, read):
    layers = [0, 2]
    got = engine.hidden_states(PROMPTS, COMPLETIONS, layers, read=read)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids, prompt_len = engine._encode(prompt, completion)
        with torch.no_grad():
            full = engine.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        for layer in layers:
            states = full.hidden_states[layer + 1][0]  # [0] is the embedding output
            expected = states[-1] if read == "last" else states[prompt_len:].mean(dim=0)
            assert got[layer].shape == (len(PROMPTS), 128)
            assert torch.allclose(got[layer][i], expected, atol=1e-5, rtol=0)


def test_hidden_states_stop_after_the_deepest_layer(engine):
    layers = engine.adapter.decoder_layers(engine.model)
    calls = []
    handle = layers[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        engine.hidden_states(PROMPTS, COMPLETIONS, [1], read="last")
        assert calls == []
        engine.hidden_states(PROMPTS, COMPLETIONS, [2], read="last")
        assert calls  # the layer asked for does run
    finally:
        handle.remove()


def test_hidden_states_bad_requests(engine):
    with pytest.raises(BehaviorError, match="layer 4 does not exist"):
        engine.hidden_states(PROMPTS, COMPLETIONS, [4])
    with pytest.raises(BehaviorError, match="no tokens of its own"):
        engine.hidden_states(["Hello"], [""], [1], read="mean")


def test_load_weights_partial_state_dict_and_folder(gdn_engine, tiny_gdn):
    base = gdn_engine.completion_logprobs(PROMPTS, COMPLETIONS)
    name = "model.layers.0.mlp.experts.1.gate_proj.weight"  # lives inside a fused tensor
    fused = gdn_engine.model.model.layers[0].mlp.experts.gate_up_proj
    new = torch.full(tuple(fused.shape[1:]), 0.0)[: fused.shape[1] // 2] + 0.25
    gdn_engine.load_weights({name: new, "model.layers.0.linear_attn.A_log": torch.zeros(
        gdn_engine.model.model.layers[0].linear_attn.A_log.shape)})
    assert torch.all(fused[1, : fused.shape[1] // 2] == 0.25)
    assert gdn_engine.completion_logprobs(PROMPTS, COMPLETIONS) != base
    gdn_engine.load_weights(tiny_gdn)
    assert gdn_engine.completion_logprobs(PROMPTS, COMPLETIONS) == base


def test_load_weights_is_all_or_nothing(gdn_engine):
    before = {n: p.detach().clone() for n, p in gdn_engine.model.named_parameters()}
    good = {"model.norm.weight": torch.ones(128)}
    bad_cases = [
        ({"model.layers.0.linear_attn.A_logg": torch.zeros(4)}, "unknown weight.*A_log"),
        ({"model.layers.3.self_attn.q_proj.weight": torch.zeros(3, 3)}, "has shape"),
        ({"lm_head.weight": torch.full((365, 128), float("inf"))}, "NaN, inf"),
    ]
    for bad, message in bad_cases:
        with pytest.raises(BehaviorError, match=message):
            gdn_engine.load_weights({**good, **bad})
    for name, param in gdn_engine.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_load_weights_refuses_another_architecture(gdn_engine, tiny_dense):
    with pytest.raises(BehaviorError, match="Qwen3 model"):
        gdn_engine.load_weights(tiny_dense)


def test_gdn_state(gdn_engine):
    state = gdn_engine.gdn_state("Use the existing parser.", 1)
    assert state.dim() == 3 and state.dtype == torch.float32
    assert torch.equal(state, gdn_engine.gdn_state("Use the existing parser.", 1))
    assert not torch.allclose(state, gdn_engine.gdn_state("Write a new parser.", 1))
    # The same state when the prompt is fed one token at a time (the recurrent path
    # transformers uses for decoding): it is the state after the whole prompt.
    ids = gdn_engine._prompt_ids("Use the existing parser.")
    decoder, cache = gdn_engine.model.get_decoder(), None
    with torch.no_grad():
        for token in ids:
            cache = decoder(input_ids=torch.tensor([[token]]), past_key_values=cache,
                            use_cache=True).past_key_values
    stepwise = cache.layers[1].recurrent_states[0][0]
    assert torch.allclose(state, stepwise, atol=1e-4)
    with pytest.raises(BehaviorError, match="full-attention layer"):
        gdn_engine.gdn_state("Hi", 3)
