"""The plan task that makes a model available as a checked local folder."""

from __future__ import annotations

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.model.loading import resolve_model_source, validate_model_folder
from behaviorc.core.task import TaskContext, TaskResult
from behaviorc.build.kinds import ResolveModel


def resolve_model(task: ResolveModel, ctx: TaskContext) -> TaskResult:
    """data: path, architecture, family, num_layers, hidden_size, layer_kinds."""
    decl = task.decl
    ctx.progress(0, 1, f"resolving {decl.source}")
    try:
        path = resolve_model_source(
            decl.source, decl.loc,
            progress=lambda step, steps, loss: ctx.progress(
                step, steps, f"building {decl.source} (once): loss {loss:.3f}"))
        adapter = validate_model_folder(path, decl.loc)
    except BehaviorError as err:
        # Problems inside the folder name their file; point at the spec's model line too.
        first = err.diagnostics[0]
        if first.loc is not None or decl.loc is None:
            raise
        raise BehaviorError(str(err), decl.loc, hint=first.hint) from None
    ctx.progress(1, 1, f"{adapter.family}, {adapter.num_layers} layers")
    return TaskResult(data={
        "path": str(path),
        "architecture": adapter.architecture,
        "family": adapter.family,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "layer_kinds": list(adapter.layer_kinds),
    })
