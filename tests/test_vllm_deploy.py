"""The DeployModel task, run by the real executor against the session's vLLM server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.core import ir
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.engine.vllm.push import push_weights
from behaviorc.engine.vllm.server import free_port
from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.pipeline.kinds import DeployModel, ImportModel, ResolveModel
from behaviorc.pipeline.executor import Executor

pytestmark = pytest.mark.vllm

PROMPTS = ["I will use", "def add(a, b):"]
COMPLETIONS = [" the existing parser.", "\n    return a + b"]


@pytest.fixture
def finetuned(vllm_server, tmp_path) -> Path:
    """A model folder with other weights, as a training task would leave it."""
    folder = tmp_path / "finetuned"
    shutil.copytree(vllm_server.model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(7)
    save_file({name: tensor + 0.02 * torch.randn(tensor.shape, generator=generator)
               for name, tensor in weights.items()}, str(folder / "model.safetensors"))
    return folder


def deploy_task(model_dir: Path, folder: Path, urls: tuple[str, ...]) -> DeployModel:
    model = ResolveModel(name="base", decl=ir.ModelDecl(name="base", source=str(model_dir),
                                                         kind="folder"))
    source = ImportModel(name="listen", external=ir.External(kind="model", path=str(folder)))
    return DeployModel(name="listen", deploy=ir.Deploy(target="listen", urls=urls),
                       model=model, source=source)


def test_deploy_pushes_into_the_live_server(vllm_server, finetuned, tmp_path):
    try:
        outcome = Executor(tmp_path / "out").run(
            [deploy_task(vllm_server.model_dir, finetuned, (vllm_server.url,))])
        assert outcome.ok, [r.error for r in outcome.failed]
        record = outcome.record("deploy:listen")
        assert record.result.metrics["requests_failed"] == 0
        assert record.result.metrics["push_ms"] > 0
        embedded = EmbeddedEngine.load(finetuned, dtype="bfloat16")
        with VLLMEngine(vllm_server.url) as live:
            served = live.completion_logprobs(PROMPTS, COMPLETIONS)
        expected = embedded.completion_logprobs(PROMPTS, COMPLETIONS)
        assert max(abs(a - b) for row_a, row_b in zip(served, expected)
                   for a, b in zip(row_a, row_b)) < 0.03
    finally:
        push_weights([vllm_server.url], vllm_server.model_dir)


def test_deploy_to_an_unreachable_replica_fails_and_changes_nothing(
        vllm_server, finetuned, tmp_path):
    with VLLMEngine(vllm_server.url) as live:
        before = live.completion_logprobs(PROMPTS, COMPLETIONS)
        dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        outcome = Executor(tmp_path / "out").run(
            [deploy_task(vllm_server.model_dir, finetuned, (vllm_server.url, dead))])
        assert not outcome.ok
        assert f"lost the vLLM server at {dead}" in outcome.record("deploy:listen").error
        assert live.completion_logprobs(PROMPTS, COMPLETIONS) == before
