"""Per-request steering on a real model (SmolLM2-135M-Instruct, the `smollm2-135m`
built-in): a cheerful-minus-gloomy direction, registered on a live server, raises the
cheerful margin of the requests that ask for it and of no other.

It runs on the session's smollm2 server, registering its vector under its own name.
The layer is fixed (21: where the demo's cheerful pairs move the margin most), since
what is tested is the serving, not the layer choice.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from behaviorc.core import ir

pytestmark = pytest.mark.vllm
LAYER = 21

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


def test_steering_one_request_moves_its_margin_and_no_other(smollm2, smollm2_server):
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.vllm.named_vectors import register_vectors, unregister_vector
    from behaviorc.engine.vllm.client import VLLMEngine
    from behaviorc.steer.extract import extract

    embedded = EmbeddedEngine.load(smollm2, dtype="float32")
    vectors = extract(embedded, PAIRS, [LAYER], "mean_diff", "mean").vectors
    del embedded
    with VLLMEngine(smollm2_server.url) as live:
        register_vectors(live.client, "cheerful", vectors.directions)

        def margin(pair: ir.Pair, steer: str | None) -> float:
            sides = [score(live, pair.prompt, completion, steer)
                     for completion in (pair.positive, pair.negative)]
            return sides[0] - sides[1]

        try:
            plain = [margin(pair, None) for pair in HELD_OUT]
            jobs = [(pair, steer) for pair in HELD_OUT for steer in (None, "cheerful:2")] * 2
            with ThreadPoolExecutor(8) as pool:
                margins = list(pool.map(lambda job: margin(*job), jobs))
        finally:
            unregister_vector(live.client, "cheerful")
    for (pair, steer), found in zip(jobs, margins):
        expected = plain[HELD_OUT.index(pair)]
        if steer is None:
            assert found == pytest.approx(expected, abs=0.03)
        else:
            assert found > expected + 0.3, (plain, margins)


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
