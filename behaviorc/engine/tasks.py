"""The plan's DeployModel task: push a built model (and optionally its steering) into
live vLLM servers while they serve.

Targets are the spec's URLs (replicas: all or nothing), or `auto`: a server of the base
model started for the task, which shows the live push happening and is stopped after.
While the push runs, a probe loop sends completions to every replica; `requests_failed`
counts those that failed (the claim is zero).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from behaviorc.diagnostics import BehaviorError, Diagnostic
from behaviorc.plan.task import TaskContext, TaskResult
from behaviorc.plan.tasks import ComposeBehaviors, DeployModel


def deploy_model(task: DeployModel, ctx: TaskContext) -> TaskResult:
    from behaviorc.engine.push import push_weights
    from behaviorc.engine.traffic import RequestLoop
    from behaviorc.engine.vllm import VLLMEngine

    if task.source is None:
        return _deploy_steering(task, ctx)
    folder = ctx.result(task.source).path("model")
    with ExitStack() as stack:
        urls = _servers(task, ctx, stack)
        ctx.progress(1, 3, f"pushing {folder.name} to {len(urls)} server(s)")
        with RequestLoop(urls, threads=1) as probes:
            report = _located(task, lambda: push_weights(urls, folder))
        ctx.emit("deploy.push", urls=urls, push_ms=report.seconds * 1000.0,
                 requests=len(probes.requests), requests_failed=len(probes.failed))
        steered = []
        if task.deploy.steering and task.steering is not None:
            ctx.progress(2, 3, "turning steering on")
            directions = _steering_directions(task, ctx)
            for url in urls:
                with VLLMEngine(url) as engine:
                    _located(task, lambda: engine.set_steering(directions,
                                                              task.steering_strength))
            steered = sorted(directions)
        if task.deploy.named:
            ctx.progress(2, 3, f"registering `{task.deploy.target}`")
            steered = _register_named(task, ctx, urls)
        ctx.progress(3, 3, "deployed")
    return TaskResult(
        metrics={"push_ms": report.seconds * 1000.0,
                 "requests_failed": float(len(probes.failed)),
                 "requests_served": float(len(probes.requests) - len(probes.failed))},
        data={"urls": urls, "tensors": report.tensors, "steering_layers": steered,
              "auto": task.deploy.urls == "auto"})


def _servers(task: DeployModel, ctx: TaskContext, stack: ExitStack) -> list[str]:
    """The deploy's URLs; for `auto`, a server of the base model held open by `stack`."""
    from behaviorc.engine.server import serve

    if task.deploy.urls != "auto":
        return list(task.deploy.urls)
    ctx.progress(0, 3, "starting a vLLM server")
    server = stack.enter_context(serve(ctx.result(task.model).data["path"]))
    ctx.check_cancelled()
    return [server.url]


def _deploy_steering(task: DeployModel, ctx: TaskContext) -> TaskResult:
    """A behavior that only steers: attach its vectors to every request of every
    replica (`steering on`), detach all server-wide steering (`steering off`), or
    register them for the requests that ask (`steering named`), while probes count
    failed requests. Each replica checks the vectors before it changes
    anything and swaps them between two forward passes; if a replica refuses, the
    replicas already steered are detached again."""
    from behaviorc.engine.traffic import RequestLoop
    from behaviorc.engine.vllm import VLLMEngine

    directions = _steering_directions(task, ctx) if task.deploy.steering else {}
    with ExitStack() as stack:
        urls = _servers(task, ctx, stack)
        if task.deploy.named:
            started = time.perf_counter()
            with RequestLoop(urls, threads=1) as probes:
                layers = _register_named(task, ctx, urls)
            return _steering_result(task, ctx, urls, probes, time.perf_counter() - started,
                                    layers)
        ctx.progress(1, 3, f"{'attaching' if directions else 'detaching'} steering on "
                           f"{len(urls)} server(s)")
        engines = [stack.enter_context(VLLMEngine(url)) for url in urls]
        started = time.perf_counter()
        with RequestLoop(urls, threads=1) as probes:
            done: list[VLLMEngine] = []
            try:
                for engine in engines:
                    if directions:
                        _located(task, lambda: engine.set_steering(directions,
                                                                  task.steering_strength))
                    else:
                        _located(task, engine.clear_steering)
                    done.append(engine)
            except BehaviorError:
                for engine in done if directions else []:
                    engine.clear_steering()
                raise
        return _steering_result(task, ctx, urls, probes, time.perf_counter() - started,
                                sorted(directions))


def _steering_result(task: DeployModel, ctx: TaskContext, urls: list[str], probes,
                     seconds: float, layers: list[int]) -> TaskResult:
    ctx.emit("deploy.push", urls=urls, push_ms=seconds * 1000.0,
             requests=len(probes.requests), requests_failed=len(probes.failed))
    ctx.progress(3, 3, "deployed")
    return TaskResult(
        metrics={"push_ms": seconds * 1000.0,
                 "requests_failed": float(len(probes.failed)),
                 "requests_served": float(len(probes.requests) - len(probes.failed))},
        data={"urls": urls, "tensors": 0, "steering_layers": layers,
              "steering_strength": task.steering_strength if layers else 0.0,
              "named": task.deploy.target if task.deploy.named else None,
              "auto": task.deploy.urls == "auto"})


def _register_named(task: DeployModel, ctx: TaskContext, urls: list[str]) -> list[int]:
    """`steering named`: the target's vectors, times its strength, registered under its
    name on every replica, so `"vllm_xargs": {"steer": "NAME"}` is the spec's steering
    and `NAME:2` twice it. Each replica checks them before it changes anything."""
    from behaviorc.engine.named_vectors import register_vectors
    from behaviorc.engine.vllm import ServerClient

    directions = {layer: vector * task.steering_strength
                  for layer, vector in _steering_directions(task, ctx).items()}
    for url in urls:
        client = ServerClient(url)
        try:
            _located(task, lambda: register_vectors(client, task.deploy.target, directions))
        finally:
            client.close()
    return sorted(directions)


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
        if task.deploy.loc is None or any(d.loc for d in err.diagnostics):
            raise
        raise BehaviorError(str(err), diagnostics=[
            Diagnostic(d.severity, d.message, task.deploy.loc, d.hint)
            for d in err.diagnostics]) from None
