"""Steering per request on the session's vLLM server (tiny-gdn, compiled as `behaviorc
serve` runs it): the registry of named vectors, `vllm_xargs.steer`, the prefix cache, the
CLI and steering-only deploys, and the steering tables the compiled graph reads.

References come from the same server in another state, as a separate server would give
them: unsteered answers with nothing registered and no steering, steered answers with the
vector attached server-wide (which tests/test_vllm_engine.py checks against the embedded
engine). Every test leaves the server with nothing registered and no steering.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from behaviorc.cli import main
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.hooks import add_to_output
from behaviorc.engine.vllm.inside.steer_spec import SteerSpecError, cache_salt, parse_steer
from behaviorc.engine.vllm.inside.steering import (ScheduledRequest, SteeringSlots,
                                                   token_coefficients)
from behaviorc.engine.vllm.named_vectors import (register_vectors, registered_vectors,
                                            unregister_vector)
from behaviorc.engine.vllm.traffic import RequestLoop
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.engine.vllm.server import COMPILING, plain_vllm_server
from behaviorc.formats.steering import save_steering
from behaviorc.steering_vectors import SteeringVectors

PROMPTS = ["I will use the existing", "The model wants", "def add(a, b):", "Yes, and then"]
BF16_TOLERANCE = 0.03
LONG_PROMPT = "The model wants the data and I will use the existing parser. " * 48


def test_steer_argument_is_read_and_refused_clearly():
    assert parse_steer("happy:2, concise:-1") == (("concise", -1.0), ("happy", 2.0))
    assert parse_steer("happy") == (("happy", 1.0),)
    assert parse_steer("") == ()
    for bad, says in [("happy:x", "`x` is not a number"), ("happy:2,happy:1", "twice"),
                      ("9lives:1", "a vector name"), ("happy:inf", "finite"), (3, "a string")]:
        with pytest.raises(SteerSpecError, match=says):
            parse_steer(bad)
    salt = cache_salt((("happy", 2.0),), {"happy": "d1"}, None)
    assert len(salt) <= 128 and "@" not in salt and "/" not in salt
    assert salt != cache_salt((("happy", 1.0),), {"happy": "d1"}, None)
    assert salt != cache_salt((("happy", 2.0),), {"happy": "d2"}, None)  # re-pushed vector


def test_each_request_steers_only_its_own_rows_of_the_batch():
    index = {"concise": 0, "happy": 1}
    batch = [ScheduledRequest(0, 3, {"steer": "happy:2"}),
             ScheduledRequest(3, 4, {}),  # unsteered, batched between steered ones
             ScheduledRequest(4, 6, {"steer": "concise:-1,happy:0.5,gone:3", "other": 1})]
    assert token_coefficients(batch, index, 7, columns=2).tolist() == [
        [0.0, 2.0], [0.0, 2.0], [0.0, 2.0], [0.0, 0.0], [-1.0, 0.5], [-1.0, 0.5],
        [0.0, 0.0]]  # the last row: padding past the scheduled tokens
    unsteered = [ScheduledRequest(0, 2, {}), ScheduledRequest(2, 3, {"steer": "gone:1"})]
    assert token_coefficients(unsteered, index, 3) is None
    assert token_coefficients([], index, 3) is None


def test_a_graph_traced_with_nothing_steered_steers_by_the_tables_written_later():
    """What a compiled server relies on: the graph is traced once, at start-up, when no
    vector exists; afterwards only the tables' values change. A recompile would hide a
    graph that depended on what was steered at tracing time, so one is an error here."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    slots = SteeringSlots(layers=2, hidden=4, max_tokens=8, device=torch.device("cpu"))
    for index, layer in enumerate(layers):
        layer.register_forward_hook(slots.hook(index))
    tokens = torch.randn(3, 4)
    plain = layers(tokens)
    assert torch.equal(layers(tokens), plain)  # eager and idle: no addition at all

    compiled = torch.compile(layers, backend="aot_eager", dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(compiled(tokens), plain)  # traced now, idle: adds zeros
        vector = torch.randn(4)
        slots.write_columns({3: {1: vector}})
        slots.set_tokens(_coefficients(slots, {0: 2.0, 2: -1.0}, column=3))
        steered = compiled(tokens)
        assert torch.allclose(steered[0], plain[0] + 2 * vector, atol=1e-6)
        assert torch.equal(steered[1], plain[1])  # an unsteered token: exactly as before
        assert torch.allclose(steered[2], plain[2] - vector, atol=1e-6)
        assert torch.allclose(layers(tokens), steered, atol=1e-6)  # eager agrees
        slots.set_tokens(None)
        assert torch.equal(compiled(tokens), plain)  # and every row is zero again


def _coefficients(slots: SteeringSlots, rows: dict[int, float], column: int) -> torch.Tensor:
    """Coefficients of 3 tokens: `rows[token]` in `column`, zero elsewhere."""
    coefficients = torch.zeros(3, slots.coefficients.shape[1])
    for row, value in rows.items():
        coefficients[row, column] = value
    return coefficients


def test_one_hook_adds_a_vector_or_per_token_additions_to_either_output_form():
    layer = torch.nn.Identity()
    hidden, residual = torch.zeros(3, 2), torch.ones(3, 2)
    coefficients = torch.tensor([[1.0], [0.0], [2.0]])
    per_token = add_to_output(lambda stream: coefficients[: stream.shape[0]] @ torch.tensor([[1.0, -1.0]]))
    handle = layer.register_forward_hook(per_token)
    out, kept = layer((hidden, residual))
    assert out.tolist() == [[1.0, -1.0], [0.0, 0.0], [2.0, -2.0]] and kept is residual
    handle.remove()
    handle = layer.register_forward_hook(add_to_output(torch.tensor([0.5, 0.5])))
    assert layer(hidden).tolist() == [[0.5, 0.5]] * 3
    handle.remove()
    nothing = layer.register_forward_hook(add_to_output(lambda stream: None))
    assert layer(hidden) is hidden
    nothing.remove()


# ---------------------------------------------------------------- against the server


@pytest.fixture(scope="module")
def live(vllm_server):
    with VLLMEngine(vllm_server.url) as engine:
        yield engine


@pytest.fixture(scope="module")
def directions(live) -> dict[str, dict[int, torch.Tensor]]:
    """Two made-up vectors strong enough to change every answer of the tiny model."""
    generator = torch.Generator().manual_seed(0)
    size = live.info.hidden_size
    return {"happy": {1: 2 * torch.randn(size, generator=generator),
                      2: 2 * torch.randn(size, generator=generator)},
            "concise": {2: 2 * torch.randn(size, generator=generator)}}


@pytest.fixture
def clean(live):
    """The server with nothing registered and no steering, before and after the test."""
    def reset() -> None:
        for name in registered_vectors(live.client):
            unregister_vector(live.client, name)
        live.clear_steering()

    reset()
    yield live
    reset()


def complete(live: VLLMEngine, prompt: str, steer: str | None = None,
             max_tokens: int = 6, ignore_eos: bool = False) -> tuple[str, list[float]]:
    """Greedy text and the log-prob of each generated token."""
    body = {"model": live.served_model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "logprobs": 1, "ignore_eos": ignore_eos}
    if steer is not None:
        body["vllm_xargs"] = {"steer": steer}
    choice = live.client.request("POST", "/v1/completions", "completing", body)["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def unmixed(before: dict, after: dict) -> None:
    """Skip, saying so, when no forward pass held steered and unsteered requests at once:
    the answers were checked, but not in mixed batches. On a loaded 2-core machine the
    server has run concurrent requests one at a time (0 mixed passes in 3,500 steered
    ones), which a test cannot force."""
    if after["mixed_passes"] <= before["mixed_passes"]:
        pytest.skip(f"the server ran no mixed batch ({before} -> {after}): per-request steering "
                    "was checked on separate passes only")


def assert_same(got: tuple[str, list[float]], expected: tuple[str, list[float]]) -> None:
    assert got[0] == expected[0]
    assert max(abs(a - b) for a, b in zip(got[1], expected[1])) <= BF16_TOLERANCE


def differs(a: tuple[str, list[float]], b: tuple[str, list[float]]) -> bool:
    return a[0] != b[0] or max(abs(x - y) for x, y in zip(a[1], b[1])) > 0.1


def served_wide(live: VLLMEngine, vectors: dict[int, torch.Tensor], strength: float,
                prompts: list[str]) -> dict[str, tuple[str, list[float]]]:
    """Each prompt's answer, one at a time, with `vectors` attached to every request."""
    live.set_steering(vectors, strength)
    try:
        return {p: complete(live, p) for p in prompts}
    finally:
        live.clear_steering()


def test_steered_and_unsteered_requests_batched_together_match_separate_servers(
        clean, directions):
    live = clean
    plain = {p: complete(live, p) for p in PROMPTS}
    happy = served_wide(live, directions["happy"], 2.0, PROMPTS)
    mixed_vector = {layer: 2.0 * directions["happy"].get(layer, torch.zeros(1))
                    - 1.5 * directions["concise"].get(layer, torch.zeros(1))
                    for layer in (1, 2)}
    both = served_wide(live, mixed_vector, 1.0, PROMPTS)
    assert all(differs(happy[p], plain[p]) and differs(both[p], happy[p]) for p in PROMPTS)

    for name, vectors in directions.items():
        register_vectors(live.client, name, vectors)
    before = live.client.rpc("behaviorc_steer_stats", doing="reading steering counts")
    work = [(p, steer) for p in PROMPTS for steer in (None, "happy:2", "happy:2,concise:-1.5")] * 3
    expected = {None: plain, "happy:2": happy, "happy:2,concise:-1.5": both}
    with ThreadPoolExecutor(8) as pool:
        # Two long answers, one steered, run all through the short ones: forward passes
        # then hold steered and unsteered requests at once, however fast the short ones go.
        held = [pool.submit(complete, live, PROMPTS[0], steer, 256, ignore_eos=True)
                for steer in (None, "happy:2")]
        answers = list(pool.map(lambda job: complete(live, *job), work))
        for request in held:
            request.result()
    for (prompt, steer), answer in zip(work, answers):
        assert_same(answer, expected[steer][prompt])
    after = live.client.rpc("behaviorc_steer_stats", doing="reading steering counts")
    unmixed(before, after)


def test_the_compiled_server_serves_unsteered_requests_as_plain_vllm_does(
        clean, directions, vllm_server, tmp_path):
    """The session's server runs compiled, the steering tables inside its graph, adding
    exact zeros to the rows of unsteered requests: their answers are plain `vllm
    serve`'s (compiled too), to the last bit, with vectors registered. (Its steered
    answers are the embedded engine's: tests/test_vllm_engine.py.)"""
    live = clean
    assert live.client.rpc("behaviorc_info", doing="describing")["compiled"]
    assert COMPILING in vllm_server.log_path.read_text(errors="replace")  # `serve` names that phase
    for name, vectors in directions.items():
        register_vectors(live.client, name, vectors)
    with plain_vllm_server(vllm_server.model_dir, tmp_path / "plain.log") as plain, \
            VLLMEngine(plain.url) as plain_live:
        for prompt in PROMPTS:
            assert complete(live, prompt) == complete(plain_live, prompt)
            assert differs(complete(live, prompt, "happy:2,concise:-1.5"), complete(live, prompt))


def test_a_steered_request_never_reuses_prefixes_cached_with_other_steering(
        clean, directions):
    """vLLM caches this model's prefixes (attention keys and GDN states) in blocks of 384
    tokens, and serves a block once a prompt has been seen twice: each prompt below is
    sent three times after the blocks it could wrongly reuse are in the cache. The
    strengths are small: the made-up vectors saturate the tiny model above 0.2."""
    live = clean
    register_vectors(live.client, "happy", directions["happy"])
    assert len(live.tokenize(LONG_PROMPT)) > 2 * 384
    live.client.reset_prefix_cache()
    alone = {steer: complete(live, LONG_PROMPT, steer)
             for steer in ("happy:0.1", "happy:0.02")}
    live.client.reset_prefix_cache()

    plain = complete(live, LONG_PROMPT)
    assert_same(complete(live, LONG_PROMPT), plain)
    hits = prefix_cache_hits(live)
    assert_same(complete(live, LONG_PROMPT), plain)
    assert prefix_cache_hits(live) > hits  # the cache is on and serves this prompt
    assert differs(alone["happy:0.1"], plain)
    assert differs(alone["happy:0.02"], alone["happy:0.1"])
    # Had these reused the unsteered blocks, or each other's, they would differ from the
    # answers computed alone.
    for _ in range(3):
        for steer, answer in alone.items():
            assert_same(complete(live, LONG_PROMPT, steer), answer)
    hits = prefix_cache_hits(live)
    assert_same(complete(live, LONG_PROMPT, "happy:0.1"), alone["happy:0.1"])
    assert prefix_cache_hits(live) > hits  # the same steering does share its own prefixes

    # A vector pushed again under the same name never meets blocks of its old values.
    register_vectors(live.client, "happy",
                     {layer: -vector for layer, vector in directions["happy"].items()})
    live_answers = [complete(live, LONG_PROMPT, "happy:0.1") for _ in range(3)]
    live.client.reset_prefix_cache()
    negated = complete(live, LONG_PROMPT, "happy:0.1")
    assert differs(negated, alone["happy:0.1"])
    for answer in live_answers:
        assert_same(answer, negated)


def prefix_cache_hits(live: VLLMEngine) -> float:
    text = live.client._http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


GENERATED_STRENGTH = 0.1  # the made-up vectors saturate the tiny model above 0.2


def scored_reply(live: VLLMEngine, ids: list[int], steer: str | None) -> tuple[list[float], str, list[float]]:
    """A greedy reply to the prompt `ids`: the prompt's log-probs, the reply and its log-probs."""
    body = {"model": live.served_model_name, "prompt": ids, "max_tokens": 6, "temperature": 0.0,
            "logprobs": 0, "prompt_logprobs": 0, "ignore_eos": True}
    if steer is not None:
        body["vllm_xargs"] = {"steer": steer}
    choice = live.client.request("POST", "/v1/completions", "completing", body)["choices"][0]
    prompt = [float(next(iter(entry.values()))["logprob"]) for entry in choice["prompt_logprobs"][1:]]
    return prompt, choice["text"], choice["logprobs"]["token_logprobs"]


def test_generated_steering_per_request_and_server_wide_is_the_embedded_engines(
        clean, directions, vllm_server):
    """`generated` (the last prompt token and after; behaviorc.engine.protocol) on the
    compiled server, per request beside unsteered requests and server-wide, against the
    embedded engine steered the same way on the same weights."""
    live = clean
    embedded = EmbeddedEngine.load(vllm_server.model_dir, dtype="bfloat16")
    vector = directions["happy"]
    register_vectors(live.client, "gen", vector, "generated")
    register_vectors(live.client, "every", vector)  # the same vector at `all` positions
    assert {name: entry["positions"] for name, entry in registered_vectors(live.client).items()} \
        == {"gen": "generated", "every": "all"}
    steer = f"gen:{GENERATED_STRENGTH}"
    rows = {p: embedded._prompt_ids(p) for p in PROMPTS}
    plain = {p: scored_reply(live, rows[p], None) for p in PROMPTS}
    alone = {p: scored_reply(live, rows[p], steer) for p in PROMPTS}
    replies = {p: alone[p][1] for p in PROMPTS}
    embedded.set_steering(vector, GENERATED_STRENGTH, "generated")
    expected = embedded.completion_logprobs(PROMPTS, [replies[p] for p in PROMPTS])
    embedded.clear_steering()
    for p, want in zip(PROMPTS, expected):
        prompt_logprobs, _, reply_logprobs = alone[p]
        # the prompt's tokens are read unsteered (at `all` they are not); the reply is
        # the embedded engine's
        assert max(abs(a - b) for a, b in zip(prompt_logprobs, plain[p][0])) <= BF16_TOLERANCE
        everywhere = scored_reply(live, rows[p], f"every:{GENERATED_STRENGTH}")[0]
        assert max(abs(a - b) for a, b in zip(everywhere, plain[p][0])) > 0.1
        assert len(want) == len(reply_logprobs)
        assert max(abs(a - b) for a, b in zip(reply_logprobs, want)) <= BF16_TOLERANCE
    assert any(differs(alone[p][1:], plain[p][1:]) for p in PROMPTS)

    before = live.client.rpc("behaviorc_steer_stats", doing="reading steering counts")
    work = [(p, s) for p in PROMPTS for s in (None, steer)] * 3
    with ThreadPoolExecutor(8) as pool:
        held = pool.submit(scored_reply, live, rows[PROMPTS[0]] * 8, steer)  # a long one runs through
        answers = list(pool.map(lambda job: scored_reply(live, rows[job[0]], job[1]), work))
        held.result()
    for (p, s), answer in zip(work, answers):
        reference = alone[p] if s else plain[p]
        assert answer[1] == reference[1]
        assert max(abs(a - b) for a, b in zip(answer[0] + answer[2], reference[0] + reference[2])) \
            <= BF16_TOLERANCE
    after = live.client.rpc("behaviorc_steer_stats", doing="reading steering counts")
    mixed = (before, after)

    # server-wide: scoring sends prompt and completion as one vLLM prompt (`steer_from`)
    completions = [replies[p] for p in PROMPTS]
    live.set_steering(vector, GENERATED_STRENGTH, "generated")
    try:
        served = live.completion_logprobs(PROMPTS, completions)
        assert [scored_reply(live, rows[p], None)[1] for p in PROMPTS] == completions
    finally:
        live.clear_steering()
    assert max(abs(a - b) for row, want in zip(served, expected)
               for a, b in zip(row, want)) <= BF16_TOLERANCE
    refused = httpx.post(f"{live.url}/v1/completions", json={
        "model": live.served_model_name, "prompt": "Hi", "vllm_xargs": {"steer": steer, "steer_from": -1}})
    assert refused.status_code == 400 and "`steer_from` must be a token position" in refused.text
    unmixed(*mixed)


def test_unknown_names_and_bad_strengths_get_a_400_naming_them(clean, directions):
    live = clean
    register_vectors(live.client, "happy", directions["happy"])
    for route, extra in [("/v1/completions", {"prompt": "I will"}),
                         ("/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}]})]:
        for steer, says in [("hapy:2", "unknown steering vector `hapy`"),
                            ("happy:lots", "`lots` is not a number")]:
            response = httpx.post(live.url + route, json={
                "model": live.served_model_name, "max_tokens": 2,
                "vllm_xargs": {"steer": steer}, **extra}, timeout=60)
            assert response.status_code == 400, response.text
            assert says in response.json()["error"]["message"]
    assert "did you mean `happy`" in httpx.post(live.url + "/v1/completions", json={
        "model": live.served_model_name, "prompt": "I", "max_tokens": 1,
        "vllm_xargs": {"steer": "hapy"}}, timeout=60).json()["error"]["message"]


def test_push_list_remove_from_the_command_line(clean, directions, tmp_path, capsys):
    live = clean
    path = save_steering(SteeringVectors(directions=directions["happy"], method="mean_diff",
                                         model="tiny-gdn"), tmp_path / "happy.safetensors")
    assert main(["steer", "push", live.url, str(path), "--name", "happy"]) == 0
    assert "happy: layers 1, 2" in capsys.readouterr().out
    assert main(["steer", "list", live.url]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("happy  layers 1, 2  norms {1: ")
    served = registered_vectors(live.client)
    assert served["happy"]["norms"]["1"] == pytest.approx(float(directions["happy"][1].norm()))
    assert differs(complete(live, PROMPTS[0], "happy:2"), complete(live, PROMPTS[0]))

    assert main(["steer", "remove", live.url, "happy"]) == 0
    assert registered_vectors(live.client) == {}
    assert main(["steer", "remove", live.url, "happy"]) == 1
    assert "no steering vector named `happy`" in capsys.readouterr().err
    assert main(["steer", "list", live.url]) == 0
    assert "no named steering vectors" in capsys.readouterr().out


@pytest.mark.parametrize("name, layers, says", [
    ("happy", {1: [0.5] * 7}, "has 7 values, the hidden size is 128"),
    ("happy", {9: [0.5] * 128}, "layer 9 out of range: the model has 4 decoder layers"),
    ("happy", {1: [0.5] * 127 + [float("nan")]}, "has NaN or infinite values"),
    ("happy", {1: [0.5] * 127 + [float("inf")]}, "has NaN or infinite values"),
    ("two words", {1: [0.5] * 128}, "is not a vector name"),
    ("happy", {}, "no layers given"),
])
def test_bad_vectors_are_refused_and_nothing_changes(clean, directions, name, layers, says):
    live = clean
    register_vectors(live.client, "happy", directions["happy"])
    before = registered_vectors(live.client)
    answer = complete(live, PROMPTS[1], "happy:2")
    # A good layer beside the bad one: all or nothing.
    sent = {2: [0.1] * 128, **layers} if layers else {}
    with pytest.raises(BehaviorError, match="refused steering vector") as refused:
        register_vectors(live.client, name, sent)
    assert says in str(refused.value) and "nothing changed" in str(refused.value)
    assert registered_vectors(live.client) == before
    assert_same(complete(live, PROMPTS[1], "happy:2"), answer)


def test_no_request_fails_while_vectors_are_swapped_under_load(clean, directions):
    live = clean
    register_vectors(live.client, "happy", directions["happy"])
    swaps = 0
    with RequestLoop([live.url], threads=2) as plain, \
            RequestLoop([live.url], threads=2, extra={"vllm_xargs": {"steer": "happy:2"}}) as steered:
        for round_ in range(8):
            sign = -1.0 if round_ % 2 else 1.0
            register_vectors(live.client, "happy",
                             {k: sign * v for k, v in directions["happy"].items()})
            register_vectors(live.client, "concise", directions["concise"])
            unregister_vector(live.client, "concise")
            live.set_steering(directions["concise"], sign)
            swaps += 4
        live.clear_steering()
    for loop in (plain, steered):
        assert loop.requests and not loop.failed, loop.failed[:3]
    assert swaps == 32


def test_chat_answers_steered_and_unsteered(clean, directions, capsys):
    live = clean
    register_vectors(live.client, "happy", directions["happy"])
    assert main(["chat", live.url, "I will use", "--steer", "happy:2", "--compare",
                 "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[steered happy:2] ")
    steered, _, unsteered = out.removeprefix("[steered happy:2] ").partition("\n[unsteered] ")
    assert unsteered and steered != unsteered
    assert main(["chat", live.url, "I will use", "--steer", "sad:1"]) == 1
    assert "unknown steering vector `sad`" in capsys.readouterr().err


def test_interactive_chat_switches_steering(clean, directions, monkeypatch, capsys):
    live = clean
    register_vectors(live.client, "happy", directions["happy"])
    lines = iter(["I will use", "/steer happy:2", "/reset", "I will use", "/steer nope:1",
                  "I will use", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", live.url, "--max-tokens", "6"]) == 0
    captured = capsys.readouterr()
    header, _, rest = captured.out.partition("\n")
    assert header.endswith(", unsteered; /steer NAME:STRENGTH, /compare, /reset, /quit")
    plain, _, rest = rest.partition("(steering: happy:2)\n(conversation forgotten)\n")
    steered, _, rest = rest.partition("(steering: nope:1)\n")
    assert rest == "" and plain and steered and plain != steered
    assert "unknown steering vector `nope`" in captured.err


# ---------------------------------------------------------------- steering-only deploys

STEER_ONLY = """model base = "{model}"
behavior happy {{
  steer {{
    layers 1..2
    strength 2.0
    pair "How was the day?" {{ positive " Wonderful, thank you!"  negative " Awful, as usual." }}
    pair "The weather is" {{ positive " bright and lovely."  negative " grey and miserable." }}
  }}
}}
deploy happy to vllm "{url}"{options}
"""


def test_a_behavior_that_only_steers_deploys_with_steering_on_or_off(tmp_path):
    from behaviorc.lang import check_file

    def errors(options: str) -> list[str]:
        path = tmp_path / "happy.behavior"
        path.write_text(STEER_ONLY.format(model="tiny-gdn", url="http://127.0.0.1:8000",
                                          options=options))
        return [d.message for d in check_file(str(path))[1] if d.severity == "error"]

    assert errors(" { steering on }") == errors(" { steering off }") == []
    assert errors(" { steering named }") == []
    assert errors("") == ["`happy` only steers: its deploy must say `steering on` (attach its "
                          "vectors to every request), `steering named` (to the requests that "
                          "ask for `happy`) or `steering off` (detach them)"]
    assert errors(" { steering nmed }") == ["`steering` is `on`, `off` or `named`, not `nmed`"]


def test_steering_only_deploy_attaches_detaches_and_registers_on_the_live_server(
        clean, vllm_server, tmp_path, capsys):
    import json

    live = clean
    plain = {p: complete(live, p) for p in PROMPTS}
    spec = tmp_path / "happy.behavior"
    for options in (" { steering on }", " { steering off }", " { steering named }"):
        spec.write_text(STEER_ONLY.format(model=vllm_server.model_dir, url=live.url,
                                          options=options))
        assert main(["build", str(spec), "--out", str(tmp_path / "out")]) == 0, \
            capsys.readouterr().err
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        deploy = next(t for t in report["tasks"] if t["kind"] == "deploy")
        assert deploy["metrics"]["requests_failed"] == 0
        served = {p: complete(live, p) for p in PROMPTS}
        if "on" in options:
            steered_wide = served
            assert any(differs(served[p], plain[p]) for p in PROMPTS)
        else:
            for p in PROMPTS:
                assert_same(served[p], plain[p])
    # `steering named` registered `happy` at the spec's strength: a request that asks for
    # it is steered as `steering on` steered every request.
    assert list(registered_vectors(live.client)) == ["happy"]
    for p in PROMPTS:
        assert_same(complete(live, p, "happy"), steered_wide[p])
