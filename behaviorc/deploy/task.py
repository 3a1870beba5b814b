"""The DeployModel task: push a built model (and optionally its steering) into live vLLM
servers while they serve, or, for a behavior that only steers, change the servers'
steering.

Targets are the spec's URLs (replicas: all or nothing), or `auto`: a server of the base
model started for the task, which shows the live push happening and is stopped after.
While the push runs, a probe loop sends completions to every replica; `requests_failed`
counts those that failed (the claim is zero).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, located_at
from behaviorc.core.events import DeployPush
from behaviorc.core.metrics import DEPLOY
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.model.task import ResolveModel

if TYPE_CHECKING:
    from behaviorc.steering_vectors import SteeringVectors


def deploy_model(task: DeployModel, ctx: TaskContext) -> TaskResult:
    from behaviorc.engine.vllm.client import VLLMEngine
    from behaviorc.engine.vllm.push import push_weights
    from behaviorc.engine.vllm.traffic import RequestLoop

    if task.source is None:
        return _deploy_steering(task, ctx)
    if task.adapter is not None:
        return _deploy_adapter(task, ctx)
    folder = ctx.result(task.source).path(task.source.artifact("model"))
    api_key, timeout = task.deploy.api_key, task.deploy.timeout
    with ExitStack() as stack:
        urls = _servers(task, ctx, stack)
        ctx.progress(1, 3, f"pushing {folder.name} to {len(urls)} server(s)")
        with RequestLoop(urls, threads=1, api_key=api_key) as probes:
            with located_at(task.deploy.loc):
                report = push_weights(urls, folder, api_key, timeout)
        ctx.emit(DeployPush(urls=urls, push_ms=report.seconds * 1000.0,
                            requests=len(probes.requests), requests_failed=len(probes.failed)))
        steered = []
        if task.deploy.steering and task.steering is not None:
            ctx.progress(2, 3, "turning steering on")
            vectors = _steering_vectors(task, ctx)
            for url in urls:
                with VLLMEngine(url, api_key, timeout=timeout) as engine, located_at(task.deploy.loc):
                    engine.set_steering(vectors.directions, task.steering_strength, vectors.positions)
            steered = list(vectors.layers)
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


def _deploy_adapter(task: DeployModel, ctx: TaskContext) -> TaskResult:
    """`as lora`: the adapter (compose.task.ExportLora) loaded into every server under
    the target's name, replacing an adapter of that name; requests naming it get the
    behavior, the others none, and nothing restarts."""
    from behaviorc.engine.vllm.http import ServerClient
    from behaviorc.engine.vllm.lora import push_adapter
    from behaviorc.engine.vllm.server import LORA_RANKS
    from behaviorc.engine.vllm.traffic import RequestLoop

    assert task.adapter is not None
    exported = ctx.result(task.adapter)
    adapter, name = exported.path(task.adapter.artifact("adapter")), task.deploy.target
    base = Path(ctx.result(task.model).data["path"])
    # a server of ours takes adapters up to the smallest rank vLLM allows above these
    rank = next((r for r in LORA_RANKS if r >= exported.data["max_rank"]), LORA_RANKS[-1])
    with ExitStack() as stack:
        urls = _servers(task, ctx, stack, lora_rank=rank)
        ctx.progress(1, 3, f"loading adapter `{name}` into {len(urls)} server(s)")
        started = time.perf_counter()
        with RequestLoop(urls, threads=1, api_key=task.deploy.api_key) as probes:
            for url in urls:
                client = ServerClient(url, task.deploy.api_key, task.deploy.timeout)
                try:
                    with located_at(task.deploy.loc):
                        push_adapter(client, adapter, name, base, replace=True)
                finally:
                    client.close()
        seconds = time.perf_counter() - started
        ctx.emit(DeployPush(urls=urls, push_ms=seconds * 1000.0, requests=len(probes.requests),
                            requests_failed=len(probes.failed)))
        ctx.progress(3, 3, "deployed")
    return TaskResult(
        metrics={"push_ms": seconds * 1000.0, "requests_failed": float(len(probes.failed)),
                 "requests_served": float(len(probes.requests) - len(probes.failed))},
        data={"urls": urls, "adapter": name, "auto": task.deploy.urls == "auto"})


def _servers(task: DeployModel, ctx: TaskContext, stack: ExitStack,
             lora_rank: int = 0) -> list[str]:
    """The deploy's URLs, each checked to answer; for `auto`, a server of the base model
    held open by `stack` (taking adapters up to `lora_rank`, if not 0)."""
    from behaviorc.engine.vllm.push import answering
    from behaviorc.engine.vllm.server import serve

    if task.deploy.urls == "auto":
        ctx.progress(0, 3, "starting a vLLM server")
        # It serves this task's checks and stops with it: compiling would cost more
        # than it saves.
        urls = [stack.enter_context(serve(ctx.result(task.model).data["path"],
                                          lora_rank=lora_rank, eager=True)).url]
    else:
        urls = list(task.deploy.urls)
    ctx.check_cancelled()
    with located_at(task.deploy.loc):
        answering(urls, task.deploy.api_key, task.deploy.timeout)
    return urls


def _deploy_steering(task: DeployModel, ctx: TaskContext) -> TaskResult:
    """A behavior that only steers: attach its vectors to every request of every
    replica (`steering on`), detach all server-wide steering (`steering off`), or
    register them for the requests that ask (`steering named`), while probes count
    failed requests. Each replica checks the vectors before it changes anything and
    swaps them between two forward passes; if a replica refuses, the replicas already
    steered are detached again."""
    from behaviorc.engine.vllm.client import VLLMEngine
    from behaviorc.engine.vllm.traffic import RequestLoop

    api_key, timeout = task.deploy.api_key, task.deploy.timeout
    vectors = _steering_vectors(task, ctx) if task.deploy.steering else None
    directions = vectors.directions if vectors else {}
    with ExitStack() as stack:
        urls = _servers(task, ctx, stack)
        if task.deploy.named:
            started = time.perf_counter()
            with RequestLoop(urls, threads=1, api_key=api_key) as probes:
                layers = _register_named(task, ctx, urls)
            return _steering_result(task, ctx, urls, probes, time.perf_counter() - started,
                                    layers)
        ctx.progress(1, 3, f"{'attaching' if directions else 'detaching'} steering on "
                           f"{len(urls)} server(s)")
        engines = [stack.enter_context(VLLMEngine(url, api_key, timeout=timeout)) for url in urls]
        started = time.perf_counter()
        with RequestLoop(urls, threads=1, api_key=api_key) as probes:
            done: list[VLLMEngine] = []
            try:
                for engine in engines:
                    with located_at(task.deploy.loc):
                        if directions:
                            engine.set_steering(directions, task.steering_strength, vectors.positions)
                        else:
                            engine.clear_steering()
                    done.append(engine)
            except BehaviorError:
                for engine in done if directions else []:
                    engine.clear_steering()
                raise
        return _steering_result(task, ctx, urls, probes, time.perf_counter() - started,
                                sorted(directions))


def _steering_result(task: DeployModel, ctx: TaskContext, urls: list[str], probes,
                     seconds: float, layers: list[int]) -> TaskResult:
    ctx.emit(DeployPush(urls=urls, push_ms=seconds * 1000.0, requests=len(probes.requests),
                        requests_failed=len(probes.failed)))
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
    from behaviorc.engine.vllm.http import ServerClient
    from behaviorc.engine.vllm.named_vectors import register_vectors

    vectors = _steering_vectors(task, ctx)
    directions = {layer: vector * task.steering_strength for layer, vector in vectors.directions.items()}
    for url in urls:
        client = ServerClient(url, task.deploy.api_key, task.deploy.timeout)
        try:
            with located_at(task.deploy.loc):
                register_vectors(client, task.deploy.target, directions, vectors.positions)
        finally:
            client.close()
    return sorted(directions)


def _steering_vectors(task: DeployModel, ctx: TaskContext) -> SteeringVectors:
    """The behavior's vectors, which carry the positions they steer."""
    from behaviorc.formats.steering import load_steering

    path = ctx.result(task.steering).path(task.steering.artifact("steering"))
    return load_steering(path, task.deploy.loc)


class DeployModel(Task):
    """Push a model folder (and optionally steering) into live vLLM servers, all or
    nothing across replicas, or its adapter (`as lora`, loaded by name); for a behavior
    that only steers (no `source`), attach its
    vectors server-wide (`steering on`), detach all (`steering off`) or register them
    by name for the requests that ask (`steering named`). metrics: core.metrics.DEPLOY.
    data: urls."""

    kind: ClassVar[str] = "deploy"
    reports: ClassVar[tuple[str, ...]] = DEPLOY
    deploy: ir.Deploy
    model: ResolveModel
    source: Task | None  # provides "model": trained, imported or composed; None: steering only
    steering: Task | None = None  # provides "steering"
    adapter: Task | None = None  # provides "adapter": served as LoRA (`as lora`), not pushed
    steering_strength: float = 1.0  # the behavior's steer strength (1.0 for a composition)

    def execute(self, ctx: TaskContext) -> TaskResult:
        return deploy_model(self, ctx)
