"""The plan's DeployModel task: push a built model (and optionally its steering) into
live vLLM servers while they serve.

Targets are the spec's URLs (replicas: all or nothing), or `auto`: a server of the base
model started for the task, which shows the live push happening and is stopped after.
While the push runs, a probe loop sends completions to every replica; `requests_failed`
counts those that failed (the claim is zero).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from behaviorc.diagnostics import BehaviorError
from behaviorc.plan.task import TaskContext, TaskResult
from behaviorc.plan.tasks import ComposeBehaviors, DeployModel


def deploy_model(task: DeployModel, ctx: TaskContext) -> TaskResult:
    from behaviorc.engine.push import answering, push_weights
    from behaviorc.engine.server import serve
    from behaviorc.engine.traffic import RequestLoop
    from behaviorc.engine.vllm import VLLMEngine

    folder = ctx.result(task.source).path("model")
    with ExitStack() as stack:
        if task.deploy.urls == "auto":
            ctx.progress(0, 3, "starting a vLLM server")
            server = stack.enter_context(serve(ctx.result(task.model).data["path"]))
            urls = [server.url]
        else:
            urls = list(task.deploy.urls)
        ctx.check_cancelled()
        api_key, timeout = task.deploy.api_key, task.deploy.timeout
        _located(task, lambda: answering(urls, api_key, timeout))
        ctx.progress(1, 3, f"pushing {folder.name} to {len(urls)} server(s)")
        with RequestLoop(urls, threads=1, api_key=api_key) as probes:
            report = _located(task, lambda: push_weights(urls, folder, api_key, timeout))
        ctx.emit("deploy.push", urls=urls, push_ms=report.seconds * 1000.0,
                 requests=len(probes.requests), requests_failed=len(probes.failed))
        steered = []
        if task.deploy.steering and task.steering is not None:
            ctx.progress(2, 3, "turning steering on")
            directions = _steering_directions(task, ctx)
            for url in urls:
                with VLLMEngine(url, api_key, timeout=timeout) as engine:
                    _located(task, lambda: engine.set_steering(directions,
                                                              task.steering_strength))
            steered = sorted(directions)
        ctx.progress(3, 3, "deployed")
    return TaskResult(
        metrics={"push_ms": report.seconds * 1000.0,
                 "requests_failed": float(len(probes.failed)),
                 "requests_served": float(len(probes.requests) - len(probes.failed))},
        data={"urls": urls, "tensors": report.tensors, "steering_layers": steered,
              "auto": task.deploy.urls == "auto"})


def _steering_directions(task: DeployModel, ctx: TaskContext) -> dict:
    from behaviorc.steer.vectors import load_steering

    result = ctx.result(task.steering)
    name = "steering" if isinstance(task.steering, ComposeBehaviors) else "vectors"
    return dict(load_steering(Path(result.path(name)), task.deploy.loc).directions)


def _located(task: DeployModel, call):
    """Run `call`; a BehaviorError without a place gets the deploy statement's."""
    try:
        return call()
    except BehaviorError as err:
        raise err.located(task.deploy.loc) from None
