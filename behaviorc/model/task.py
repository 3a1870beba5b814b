"""The plan task that makes a model available as a checked local folder."""

from __future__ import annotations

from typing import ClassVar

from behaviorc.core import ir

from behaviorc.core.diagnostics import located_at
from behaviorc.model.loading import validate_model_folder
from behaviorc.model.resolve import resolve_model_folder
from behaviorc.core.task import Task, TaskContext, TaskResult


def resolve_model(task: ResolveModel, ctx: TaskContext) -> TaskResult:
    """data: path, architecture, family, num_layers, hidden_size, layer_kinds."""
    decl = task.decl
    ctx.progress(0, 1, f"resolving {decl.source}")
    # Problems inside the folder name their file; the others, the spec's model line.
    with located_at(decl.loc):
        path = resolve_model_folder(
            decl.source, decl.loc,
            progress=lambda step, steps, loss: ctx.progress(
                step, steps, f"building {decl.source} (once): loss {loss:.3f}"))
        adapter = validate_model_folder(path, decl.loc)
    ctx.progress(1, 1, f"{adapter.family}, {adapter.num_layers} layers")
    return TaskResult(data={
        "path": str(path),
        "architecture": adapter.architecture,
        "family": adapter.family,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "layer_kinds": list(adapter.layer_kinds),
    })


class ResolveModel(Task):
    """Make a model available as a local folder (build a built-in, check a folder, find
    a hub id in the offline cache). data: path, architecture, num_layers."""

    kind: ClassVar[str] = "model"
    decl: ir.ModelDecl

    def execute(self, ctx: TaskContext) -> TaskResult:
        return resolve_model(self, ctx)
