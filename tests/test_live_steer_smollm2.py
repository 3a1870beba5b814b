"""Per-request steering on a real model (SmolLM2-135M-Instruct, the `smollm2-135m`
built-in): a cheerful-minus-gloomy direction, registered on a live server, raises the
cheerful margin of the requests that ask for it and of no other.

It starts its own server (the model is not the session's) and skips where the built-in
is not available.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from behaviorc.core import ir

pytestmark = pytest.mark.vllm

PROMPTS = ["How was your weekend?", "What do you think of the new office?",
           "How did the exam go?", "What is the weather like today?",
           "How is the project going?", "Did you enjoy the film?",
           "How are you feeling this morning?", "What was the trip like?"]
CHEERFUL = [" It was wonderful, I loved every minute!", " I love it, it is bright and lovely!",
            " Great, I am so happy with it!", " Sunny and beautiful, a perfect day!",
            " Brilliantly, we are all delighted!", " Yes, it was a joy from start to end!",
            " Fantastic, full of energy and hope!", " Amazing, the best trip ever!"]
GLOOMY = [" It was awful, I hated every minute.", " I hate it, it is dark and depressing.",
          " Terribly, I am so miserable about it.", " Grey and cold, a miserable day.",
          " Badly, we are all exhausted and sad.", " No, it was dreary from start to end.",
          " Awful, tired and hopeless.", " Dreadful, the worst trip ever."]
PAIRS = [ir.Pair(prompt=p, positive=c, negative=g) for p, c, g in zip(PROMPTS, CHEERFUL, GLOOMY)]
HELD_OUT = [ir.Pair(prompt="How was dinner?", positive=" Delicious, I loved it!",
                    negative=" Horrible, I hated it."),
            ir.Pair(prompt="How is your new job?", positive=" Wonderful, I am so happy there!",
                    negative=" Miserable, I dread every day.")]


@pytest.fixture(scope="module")
def smollm2():
    from behaviorc.model.builtin import BUILTINS, ensure_builtin

    if "smollm2-135m" not in BUILTINS:
        pytest.skip("the smollm2-135m built-in is not in this tree")
    return ensure_builtin("smollm2-135m")


def test_steering_one_request_moves_its_margin_and_no_other(smollm2):
    check_per_request_margins(smollm2)


def check_per_request_margins(folder) -> dict[str, list[float]]:
    """The held-out margins, unsteered and steered per request; asserts the claim."""
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.vllm.named_vectors import register_vectors
    from behaviorc.engine.vllm.server import serve
    from behaviorc.engine.vllm.client import VLLMEngine
    from behaviorc.steer.extract import extract

    embedded = EmbeddedEngine.load(folder, dtype="float32")
    vectors = extract(embedded, PAIRS, "auto", "mean_diff", "mean").vectors
    del embedded
    with serve(folder) as server, VLLMEngine(server.url) as live:
        register_vectors(live.client, "cheerful", vectors.directions)

        def margin(pair: ir.Pair, steer: str | None) -> float:
            sides = [score(live, pair.prompt, completion, steer)
                     for completion in (pair.positive, pair.negative)]
            return sides[0] - sides[1]

        plain = [margin(pair, None) for pair in HELD_OUT]
        jobs = [(pair, steer) for pair in HELD_OUT for steer in (None, "cheerful:2")] * 2
        with ThreadPoolExecutor(8) as pool:
            margins = list(pool.map(lambda job: margin(*job), jobs))
    for (pair, steer), found in zip(jobs, margins):
        expected = plain[HELD_OUT.index(pair)]
        if steer is None:
            assert found == pytest.approx(expected, abs=0.03)
        else:
            assert found > expected + 0.3
    return {"plain": plain, "batched": margins}


def score(live, prompt: str, completion: str, steer: str | None) -> float:
    """Mean log-prob per token of `completion` after `prompt`, steered per request."""
    ids, start = live._encode(prompt, completion)
    body = {"model": live.served_model_name, "prompt": ids, "max_tokens": 1,
            "temperature": 0.0, "prompt_logprobs": 0}
    if steer:
        body["vllm_xargs"] = {"steer": steer}
    choice = live.client.request("POST", "/v1/completions", "scoring", body)["choices"][0]
    rows = choice["prompt_logprobs"]
    values = [rows[i][str(ids[i])]["logprob"] for i in range(start, len(ids))]
    return sum(values) / len(values)
