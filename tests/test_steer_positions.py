"""`steer { positions generated }`: steering only the positions whose output chooses a
reply token (the last prompt token and every token after it; behaviorc.engine.protocol
defines it). Checked on the tiny models against independent references: a plain
forward of the whole model with a hook of the test's own that adds the vector from
position n-1 on."""

from __future__ import annotations

import pytest
import torch

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.hooks import capture_outputs
from behaviorc.steering_vectors import SteeringVectors

PROMPTS = ["Use the existing parser.", "We should write a new parser instead of the old code now", ""]
COMPLETIONS = [" I'll use the existing parser.", " ok, sure", "Hello, world."]
LAYER, STRENGTH = 1, 8.0


@pytest.fixture(scope="module", params=["tiny_gdn", "tiny_dense"])
def engine(request):
    return EmbeddedEngine.load(request.getfixturevalue(request.param), device="cpu")


def _vector() -> torch.Tensor:
    return torch.randn(128, generator=torch.Generator().manual_seed(0))


def _own_hook(engine: EmbeddedEngine, first: int):
    """The test's own `generated` steering of one unpadded row: the vector added at
    positions `first` and later of the steered layer's output."""
    delta = STRENGTH * _vector()

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        added = hidden.clone()
        added[:, first:] += delta
        return (added, *output[1:]) if isinstance(output, tuple) else added

    return engine.adapter.decoder_layers(engine.model)[LAYER].register_forward_hook(hook)


def _last_layer_states(engine: EmbeddedEngine) -> list[torch.Tensor]:
    """The last layer's output at every position of each pair, one row per call."""
    layers = engine.adapter.decoder_layers(engine.model)
    last = len(layers) - 1
    states = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        with capture_outputs(layers, [last], stop_after_deepest=False) as captured:
            engine.completion_logprobs([prompt], [completion])
        states.append(captured[last][0].clone())
    return states


def test_generated_steers_from_the_last_prompt_token_and_leaves_the_prompt_before_it(engine):
    base = _last_layer_states(engine)
    with_all, generated = [], []
    for positions, found in (("all", with_all), ("generated", generated)):
        engine.set_steering({LAYER: _vector()}, STRENGTH, positions)
        found.extend(_last_layer_states(engine))
        engine.clear_steering()
    assert [torch.equal(a, b) for a, b in zip(_last_layer_states(engine), base)] == [True] * 3
    for (prompt, completion), plain, everywhere, chosen in zip(
            zip(PROMPTS, COMPLETIONS), base, with_all, generated):
        _, prompt_len = engine._encode(prompt, completion)
        before = slice(0, prompt_len - 1)
        assert torch.equal(chosen[before], plain[before])  # bit for bit
        assert (chosen[prompt_len - 1:] - plain[prompt_len - 1:]).abs().amax(-1).min() > 1e-3
        assert (everywhere - plain).abs().amax(-1).min() > 1e-3  # `all`: every position moved


def test_generated_log_probs_are_those_of_a_forward_steered_from_the_last_prompt_token(engine):
    plain = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    engine.set_steering({LAYER: _vector()}, STRENGTH, "all")
    everywhere = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    engine.set_steering({LAYER: _vector()}, STRENGTH, "generated")
    batched = engine.completion_logprobs(PROMPTS, COMPLETIONS)
    engine.clear_steering()
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids, prompt_len = engine._encode(prompt, completion)
        handle = _own_hook(engine, prompt_len - 1)
        try:
            with torch.no_grad():
                logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
        finally:
            handle.remove()
        logprobs = torch.log_softmax(logits, dim=-1)
        reference = [logprobs[t - 1, ids[t]].item() for t in range(prompt_len, len(ids))]
        assert torch.allclose(torch.tensor(batched[i]), torch.tensor(reference), atol=1e-5, rtol=0)
        assert max(abs(a - b) for a, b in zip(batched[i], plain[i])) > 1e-3
        # a one-token prompt (the empty one: its start token) has nothing before its last
        differs_from_all = max(abs(a - b) for a, b in zip(batched[i], everywhere[i])) > 1e-3
        assert differs_from_all == (prompt_len > 1)
    assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == plain  # cleared exactly


def test_generation_with_a_cache_steers_what_greedy_decoding_by_the_definition_does(engine):
    """The engine's generate (left-padded, KV cache: the prompt's pass steers its last
    position, each later pass its one token) chooses the same tokens as greedy decoding
    that re-reads the whole sequence each step, steered from the last prompt token on."""
    new_tokens = 5
    plain = engine.generate(PROMPTS, max_new_tokens=new_tokens)
    engine.set_steering({LAYER: _vector()}, STRENGTH, "generated")
    try:
        steered = engine.generate(PROMPTS, max_new_tokens=new_tokens)
    finally:
        engine.clear_steering()
    assert steered != plain
    for prompt, text in zip(PROMPTS, steered):
        ids = engine._prompt_ids(prompt)
        first = len(ids) - 1
        handle = _own_hook(engine, first)
        try:
            with torch.no_grad():
                for _ in range(new_tokens):
                    logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
                    ids.append(int(logits.argmax()))
                    if ids[-1] == engine.tokenizer.eos_token_id:
                        break
        finally:
            handle.remove()
        assert engine.tokenizer.decode(ids[first + 1:], skip_special_tokens=True) == text


def test_generated_steering_refuses_a_forward_outside_the_engines_passes(engine):
    engine.set_steering({LAYER: _vector()}, STRENGTH, "generated")
    try:
        with pytest.raises(BehaviorError, match="outside them"):
            engine.model(input_ids=torch.tensor([[1, 2, 3]]))
        with pytest.raises(BehaviorError, match="unknown steered positions `sideways`"):
            engine.set_steering({LAYER: _vector()}, STRENGTH, "sideways")
    finally:
        engine.clear_steering()


def test_extraction_writes_the_positions_its_vectors_steer(engine):
    from behaviorc.core import ir
    from behaviorc.steer.extract import extract

    pairs = [ir.Pair(prompt=p, positive=" Yes.", negative=" No.") for p in PROMPTS[:2]]
    assert extract(engine, pairs, [LAYER]).vectors.positions == "all"
    assert extract(engine, pairs, [LAYER], positions="generated").vectors.positions == "generated"


# ---------------------------------------------------------------- training's teachers

def test_the_kl_teacher_and_activation_targets_steer_as_the_engine_does(tiny_dense):
    """The KL teacher's steered distributions and activation matching's steered states
    register their own hooks on the model they train: with `generated` they are the
    embedded engine's steered log-probs and hidden states."""
    from behaviorc.train.activations import matched_span, steered_targets
    from behaviorc.train.data import TrainSequence
    from behaviorc.train.teacher import Teacher, TeacherRow

    engine = EmbeddedEngine.load(tiny_dense, device="cpu")
    layers = engine.adapter.decoder_layers(engine.model)
    directions = {LAYER: _vector(), LAYER + 1: -_vector()}
    prompts, completions = PROMPTS[:2], COMPLETIONS[:2]
    sequences = []
    for prompt, completion in zip(prompts, completions):
        ids, prompt_len = engine._encode(prompt, completion)
        sequences.append(TrainSequence(tuple(ids[:prompt_len]), tuple(ids[prompt_len:])))
    found = {}
    for positions in ("generated", "all"):
        teacher = Teacher(tuple(TeacherRow(s, s.context, True, 1.0, 1.0) for s in sequences),
                          directions, STRENGTH, top_k=0, positions=positions)
        found[positions] = teacher.distributions(engine.model, layers, engine._pad_id)
    engine.set_steering(directions, STRENGTH, "generated")
    try:
        expected = engine.completion_logprobs(prompts, completions)
        with capture_outputs(layers, [LAYER + 1], stop_after_deepest=False) as captured:
            engine.completion_logprobs(prompts[:1], completions[:1])
    finally:
        engine.clear_steering()
    for s, want in zip(sequences, expected):
        def read(positions: str) -> torch.Tensor:
            found_here = found[positions][s]  # every token's, sorted: find the response's
            chosen = found_here.tokens == torch.tensor(s.response)[:, None]
            return found_here.logprobs[chosen]
        assert torch.allclose(read("generated"), torch.tensor(want), atol=1e-5, rtol=0)
        assert (read("generated") - read("all")).abs().max() > 1e-3
    targets = {positions: steered_targets(engine.model, layers, directions, STRENGTH, sequences[:1],
                                          engine._pad_id, positions)[sequences[0]]
               for positions in ("generated", "all")}
    span = matched_span(sequences[0], "full")
    assert torch.allclose(targets["generated"].states[LAYER + 1], captured[LAYER + 1][0, span], atol=1e-5)
    assert (targets["generated"].states[LAYER + 1] - targets["all"].states[LAYER + 1]).abs().max() > 1e-3


# ---------------------------------------------------------------- language and files

SPEC = ('model base = "tiny-gdn"\nbehavior b on base {\n  steer {\n'
        '    pair "p" { positive "a" negative "b" }\n    positions WORD\n  }\n}\n')


def test_positions_is_checked_formatted_and_defaults_to_all():
    from behaviorc.lang.check import check_text
    from behaviorc.lang.fmt import format_text

    spec, diagnostics = check_text(SPEC.replace("WORD", "generated"), "x.behavior")
    assert spec is not None, diagnostics
    assert spec.behaviors[0].steer.positions == "generated"
    formatted, _ = format_text(SPEC.replace("WORD", "generated"), "x.behavior")
    assert "    positions generated\n" in formatted
    spec, _ = check_text(SPEC.replace("    positions WORD\n", ""), "x.behavior")
    assert spec.behaviors[0].steer.positions == "all"
    spec, diagnostics = check_text(SPEC.replace("WORD", "sideways"), "x.behavior")
    assert spec is None
    [error] = [d for d in diagnostics if d.severity == "error"]
    assert (error.loc.line, error.loc.column) == (5, 15)
    assert "`sideways`" in error.message and "generated" in (error.hint or "")


def test_a_composition_of_behaviors_steering_different_positions_is_refused_at_check():
    from behaviorc.lang.check import check_text

    behavior = ('behavior {} on base {{\n  steer {{ pair "p" {{ positive " yes" negative " no" }} {} }}\n'
                '  train {{ example "x" {{ response " y" }} }}\n}}\n')
    text = ('model base = "tiny-gdn"\n' + behavior.format("a", "positions generated")
            + behavior.format("b", "") + "compose c = a + b\n")
    spec, diagnostics = check_text(text, "x.behavior")
    assert spec is None
    [error] = [d for d in diagnostics if d.severity == "error"]
    assert error.loc.line == 10 and "`b` steers `all` positions and `a` `generated`" in error.message
    spec, _ = check_text(text.replace('" no" }  }', '" no" } positions generated }'), "x.behavior")
    assert spec is not None and spec.compositions[0].name == "c"


def test_changing_positions_reruns_what_steers_and_nothing_else(tmp_path):
    from test_lang_plan import keys, pairs

    spec = ('model m = "tiny-gdn"\nbehavior a {{ steer {{ {positions} {p} }}\n'
            '  train {{ {train} }} }}\n')
    for train, steered in (('example "x" { response " y" }', set()),  # trains no steering
                           ('distill steering { prompt "go" }', {"train:a", "task_vector:a"})):
        unset, everywhere, generated = (
            keys(spec.format(positions=setting, p=pairs(6), train=train), tmp_path)
            for setting in ("", "positions all", "positions generated"))
        assert unset == everywhere
        assert {task for task in unset if unset[task] != generated[task]} == {
            "steer.extract:a", "steer.verify:a", *steered}


def _vectors(positions: str = "generated") -> SteeringVectors:
    return SteeringVectors({1: _vector()}, method="mean_diff", model="m", positions=positions)


def test_files_keep_positions_and_combining_different_positions_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    from behaviorc.formats.steering import export_gguf, load_steering, read_gguf, save_steering

    assert load_steering(save_steering(_vectors(), tmp_path / "v.safetensors")).positions == "generated"
    assert read_gguf(export_gguf(_vectors(), tmp_path / "v.gguf")).positions == "generated"
    save_file({"layer.1": _vector()}, str(tmp_path / "old.safetensors"), metadata={"method": "pca"})
    assert load_steering(tmp_path / "old.safetensors").positions == "all"
    save_file({"layer.1": _vector()}, str(tmp_path / "bad.safetensors"), metadata={"positions": "most"})
    with pytest.raises(BehaviorError, match="bad.safetensors.*unknown positions `most`"):
        load_steering(tmp_path / "bad.safetensors")
    assert (_vectors() + 2 * _vectors()).positions == "generated"
    from behaviorc.cli import main
    assert main(["steer", "show", str(tmp_path / "v.safetensors")]) == 0
    assert "positions generated" in capsys.readouterr().out
    assert main(["steer", "convert", str(tmp_path / "v.safetensors"), str(tmp_path / "w.gguf")]) == 0
    assert "llama.cpp steers every position" in capsys.readouterr().err
    with pytest.raises(BehaviorError, match="different positions: `generated` and `all`"):
        SteeringVectors.combine([(_vectors(), 1.0), (_vectors("all"), 1.0)])


# ---------------------------------------------------------------- vLLM's batches

def test_vllm_token_coefficients_steer_generated_rows_across_a_chunked_prefill():
    from behaviorc.engine.vllm.inside.steering import (
        COLUMNS, SERVER_WIDE, ScheduledRequest, token_coefficients, with_server_wide)

    index = {"all": 1, "gen": 2}
    # A 10-token prompt prefilled in chunks of 4 (positions 0-3, 4-7, 8-9), beside a
    # request decoding its 13th token (position 12) and one steered by `all`.
    def batch(first_position: int, rows: int) -> list[ScheduledRequest]:
        return [ScheduledRequest(0, rows, {"steer": "gen:2"}, first_position, prompt_tokens=10),
                ScheduledRequest(rows, rows + 1, {"steer": "gen:3"}, 12, prompt_tokens=5),
                ScheduledRequest(rows + 1, rows + 3, {"steer": "all:1"}, 0, prompt_tokens=2)]

    generated = frozenset({2})
    columns = [token_coefficients(batch(first, rows), index, rows + 3, generated=generated)[:, 1:3].tolist()
               for first, rows in ((0, 4), (4, 4), (8, 2))]
    assert columns[0] == [[0, 0]] * 4 + [[0, 3]] + [[1, 0]] * 2
    assert columns[1] == [[0, 0]] * 4 + [[0, 3]] + [[1, 0]] * 2
    assert columns[2] == [[0, 0], [0, 2]] + [[0, 3]] + [[1, 0]] * 2  # from position 9 on
    # `steer_from` (a prompt that holds a reply to score) moves where `generated` starts
    scored = [ScheduledRequest(0, 6, {"steer": "gen:1", "steer_from": 3}, 0, prompt_tokens=6)]
    assert token_coefficients(scored, index, 6, generated=generated)[:, 2].tolist() == [0, 0, 0, 1, 1, 1]
    # the server-wide column: every row with `all`, each request's generated rows otherwise
    wide = with_server_wide(None, batch(8, 2), 6, "generated")[:, SERVER_WIDE].tolist()
    assert wide == [0, 1, 1, 0, 1, 0]  # the `all:1` request's prompt ends at position 1
    assert with_server_wide(None, batch(8, 2), 6, "all")[:, SERVER_WIDE].tolist() == [1] * 6
    assert with_server_wide(None, [], 3, "generated").shape == (3, COLUMNS)
