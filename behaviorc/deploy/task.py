"""The plan's DeployModel task: push a built model (and optionally its steering) into
live vLLM servers while they serve.

Targets are the spec's URLs (replicas: all or nothing), or `auto`: a server of the base
model started for the task, which shows the live push happening and is stopped after.
While the push runs, a probe loop sends completions to every replica; `requests_failed`
counts those that failed (the claim is zero).
"""

from __future__ import annotations

from typing import ClassVar

from behaviorc.core import ir
from behaviorc.core.events import DeployPush
from behaviorc.core.metrics import DEPLOY

from contextlib import ExitStack

from behaviorc.core.diagnostics import located_at
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.model.task import ResolveModel


def deploy_model(task: DeployModel, ctx: TaskContext) -> TaskResult:
    from behaviorc.engine.vllm.push import answering, push_weights
    from behaviorc.engine.vllm.server import serve
    from behaviorc.engine.vllm.traffic import RequestLoop
    from behaviorc.engine.vllm.client import VLLMEngine

    folder = ctx.result(task.source).path(task.source.artifact("model"))
    with ExitStack() as stack:
        if task.deploy.urls == "auto":
            ctx.progress(0, 3, "starting a vLLM server")
            server = stack.enter_context(serve(ctx.result(task.model).data["path"]))
            urls = [server.url]
        else:
            urls = list(task.deploy.urls)
        ctx.check_cancelled()
        api_key, timeout = task.deploy.api_key, task.deploy.timeout
        with located_at(task.deploy.loc):
            answering(urls, api_key, timeout)
        ctx.progress(1, 3, f"pushing {folder.name} to {len(urls)} server(s)")
        with RequestLoop(urls, threads=1, api_key=api_key) as probes:
            with located_at(task.deploy.loc):
                report = push_weights(urls, folder, api_key, timeout)
        ctx.emit(DeployPush(urls=urls, push_ms=report.seconds * 1000.0,
                            requests=len(probes.requests), requests_failed=len(probes.failed)))
        steered = []
        if task.deploy.steering and task.steering is not None:
            ctx.progress(2, 3, "turning steering on")
            directions = _steering_directions(task, ctx)
            for url in urls:
                with VLLMEngine(url, api_key, timeout=timeout) as engine, located_at(task.deploy.loc):
                    engine.set_steering(directions, task.steering_strength)
            steered = sorted(directions)
        ctx.progress(3, 3, "deployed")
    return TaskResult(
        metrics={"push_ms": report.seconds * 1000.0,
                 "requests_failed": float(len(probes.failed)),
                 "requests_served": float(len(probes.requests) - len(probes.failed))},
        data={"urls": urls, "tensors": report.tensors, "steering_layers": steered,
              "auto": task.deploy.urls == "auto"})


def _steering_directions(task: DeployModel, ctx: TaskContext) -> dict:
    from behaviorc.formats.steering import load_steering

    path = ctx.result(task.steering).path(task.steering.artifact("steering"))
    return dict(load_steering(path, task.deploy.loc).directions)


class DeployModel(Task):
    """Push a model folder (and optionally steering) into live vLLM servers, all or
    nothing across replicas. metrics: core.DEPLOY. data: urls."""

    kind: ClassVar[str] = "deploy"
    reports: ClassVar[tuple[str, ...]] = DEPLOY
    deploy: ir.Deploy
    model: ResolveModel
    source: Task  # provides "model": trained, imported or composed
    steering: Task | None = None  # provides "steering"
    steering_strength: float = 1.0  # the behavior's steer strength (1.0 for a composition)

    def execute(self, ctx: TaskContext) -> TaskResult:
        return deploy_model(self, ctx)
