"""The plan's task-vector tasks: ImportModel, ImportTaskVector, ExtractTaskVector,
ComposeBehaviors and ExportLora (behaviorc.pipeline.kinds).

Failures on files the spec named are reported at the spec line that named them.
"""

from __future__ import annotations

from typing import ClassVar

from behaviorc.core import ir
from behaviorc.core.metrics import COMPOSE, LORA_EXPORT, TASK_VECTOR

from pathlib import Path

from behaviorc.core.diagnostics import located_at
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.model.task import ResolveModel

TASK_VECTOR_FILE = "task_vector.safetensors"
MODEL_FOLDER = "model"
STEERING_FILE = "steering.safetensors"
ADAPTER_FOLDER = "adapter"


def import_model(task: ImportModel, ctx: TaskContext) -> TaskResult:
    """artifacts: model (the external folder itself, checked)."""
    from behaviorc.model.loading import validate_model_folder

    path = Path(task.external.path)
    with located_at(task.external.loc or task.loc):
        adapter = validate_model_folder(path, task.external.loc)
    return TaskResult(artifacts={"model": str(path)},
                      data={"path": str(path), "family": adapter.family,
                            "fingerprint": task.external.fingerprint})


def import_task_vector(task: ImportTaskVector, ctx: TaskContext) -> TaskResult:
    """artifacts: task_vector (the external file, checked against the base)."""
    from behaviorc.formats.safetensors_io import content_sha256
    from behaviorc.compose.taskvector import check_task_vector

    path = Path(task.external.path)
    base = ctx.result(task.model).data["path"]
    with located_at(task.external.loc or task.loc):
        metadata = check_task_vector(path, Path(base))
    return TaskResult(artifacts={"task_vector": str(path)},
                      data={"sha256": task.external.fingerprint.removeprefix("sha256:")
                            or content_sha256(path),
                            "metadata": metadata})


def extract_task_vector(task: ExtractTaskVector, ctx: TaskContext) -> TaskResult:
    """artifacts: task_vector. data: sha256, tensors (how many parameters changed)."""
    from behaviorc.compose.taskvector import extract_task_vector as extract

    base = ctx.result(task.model).data["path"]
    finetuned = ctx.result(task.finetuned).path(task.finetuned.artifact("model"))
    ctx.progress(0, 1, f"tau = {finetuned.name} - base")
    with located_at(task.loc):
        metadata = extract(Path(base), finetuned, ctx.out / TASK_VECTOR_FILE, source=task.name,
                           base_fingerprint=task.model.decl.fingerprint,
                           metadata={"task_key": task.key})
    ctx.progress(1, 1, f"{metadata['tensors']} tensors differ")
    return TaskResult(artifacts={"task_vector": TASK_VECTOR_FILE},
                      metrics={"tensors_changed": float(metadata["tensors"])},
                      data={"sha256": metadata["sha256"], "tensors": int(metadata["tensors"])})


def compose_behaviors(task: ComposeBehaviors, ctx: TaskContext) -> TaskResult:
    """artifacts: model, steering (when any term steers). data: provenance."""
    from behaviorc.compose.composition import Composition, Term, compose
    from behaviorc.compose.merge import MergeOptions

    spec = task.compose
    if len(task.vectors) != len(spec.terms):
        raise AssertionError(f"{task.id}: {len(task.vectors)} vectors for {len(spec.terms)} terms")
    terms = tuple(
        Term(label=term.behavior, path=ctx.result(vector).path("task_vector"),
             weight=term.weight, sha256=ctx.result(vector).data.get("sha256", ""))
        for term, vector in zip(spec.terms, task.vectors))
    spec_path = spec.loc.file if spec.loc else ""
    with located_at(spec.loc or task.loc):
        record = compose(
            Composition(base=Path(ctx.result(task.model).data["path"]), terms=terms,
                        options=MergeOptions.from_ir(spec.merge, spec.terms), name=spec.name,
                        expression=spec.expression, spec_path=spec_path,
                        spec_sha256=ctx.spec_sha256,
                        base_fingerprint=task.model.decl.fingerprint,
                        extra={"task_key": task.key}),
            ctx.out / MODEL_FOLDER, progress=ctx.progress)
    artifacts = {"model": MODEL_FOLDER}
    if task.steering:
        with located_at(spec.loc or task.loc):
            _compose_steering(task, ctx)
        artifacts["steering"] = STEERING_FILE
    return TaskResult(artifacts=artifacts, data={"provenance": record},
                      metrics={"parameters_merged": float(record["parameters_merged"])})


def _compose_steering(task: ComposeBehaviors, ctx: TaskContext) -> None:
    """The same weighted sum of the steering vectors of the terms that steer."""
    from behaviorc.formats.steering import load_steering, save_steering
    from behaviorc.steering_vectors import SteeringVectors

    by_behavior = {steering.name: steering for steering in task.steering}
    strength = dict(zip(by_behavior, task.steering_strengths))
    def vectors(steering: Task):
        return load_steering(ctx.result(steering).path(steering.artifact("steering")), task.compose.loc)

    weighted = [(vectors(by_behavior[term.behavior]), term.weight * strength[term.behavior])
                for term in task.compose.terms if term.behavior in by_behavior]
    save_steering(SteeringVectors.combine(weighted, provenance=task.compose.expression),
                  ctx.out / STEERING_FILE)


class ImportModel(Task):
    """A fine-tuned model folder trained elsewhere. artifacts: model (the folder itself)."""

    kind: ClassVar[str] = "import.model"
    provides: ClassVar[dict[str, str]] = {"model": "model"}
    external: ir.External

    def execute(self, ctx: TaskContext) -> TaskResult:
        return import_model(self, ctx)


class ImportTaskVector(Task):
    """A task-vector file made elsewhere, checked against the base. artifacts: task_vector."""

    kind: ClassVar[str] = "import.task_vector"
    provides: ClassVar[dict[str, str]] = {"task_vector": "task_vector"}
    model: ResolveModel
    external: ir.External

    def execute(self, ctx: TaskContext) -> TaskResult:
        return import_task_vector(self, ctx)


class ExtractTaskVector(Task):
    """tau = W_finetuned - W_base over the tensors that differ. artifacts: task_vector."""

    kind: ClassVar[str] = "task_vector"
    reports: ClassVar[tuple[str, ...]] = TASK_VECTOR
    provides: ClassVar[dict[str, str]] = {"task_vector": "task_vector"}
    model: ResolveModel
    finetuned: Task  # provides "model": trained here or imported

    def execute(self, ctx: TaskContext) -> TaskResult:
        return extract_task_vector(self, ctx)


class ComposeBehaviors(Task):
    """W_base + merge(weight_i * tau_i) as a model folder, and the same combination of
    the behaviors' steering vectors. artifacts: model, steering (when any term steers).
    data: provenance (expression, terms, vector hashes)."""

    kind: ClassVar[str] = "compose"
    reports: ClassVar[tuple[str, ...]] = COMPOSE
    provides: ClassVar[dict[str, str]] = {"model": "model", "steering": "steering"}
    model: ResolveModel
    compose: ir.Compose
    vectors: tuple[ExtractTaskVector | ImportTaskVector, ...]  # aligned with compose.terms
    steering: tuple[Task, ...]  # each provides "steering";  # for the terms whose behavior steers, by name
    # Each of `steering`'s behavior strengths, in order: a composed vector is
    # sum(weight * strength * vector), served at strength 1.
    steering_strengths: tuple[float, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        return compose_behaviors(self, ctx)


def export_adapter(task: ExportLora, ctx: TaskContext) -> TaskResult:
    from behaviorc.compose.lora import RankChoice, export_lora

    choice = RankChoice.given(task.form.rank, task.form.energy)
    folder = ctx.result(task.source).path(task.source.artifact("model"))
    with located_at(task.loc):
        exported = export_lora(folder, Path(ctx.result(task.model).data["path"]),
                               ctx.out / ADAPTER_FOLDER, choice,
                               progress=lambda done, total, _: ctx.progress(
                                   done, total, "factoring the weights' change"))
    summary = exported.summary()
    return TaskResult(metrics={"energy_kept": summary["energy_kept"],
                               "uncarried_energy": summary["uncarried_energy"]},
                      artifacts={"adapter": ADAPTER_FOLDER},
                      data={**summary, "adapter": ADAPTER_FOLDER, "ranks": exported.ranks})


class ExportLora(Task):
    """A model's change from its base as a PEFT LoRA adapter (`as lora`): per matrix a
    truncated SVD of the delta (compose.lora). artifacts: adapter. data: ranks, energy
    kept, what LoRA cannot carry."""

    kind: ClassVar[str] = "lora.export"
    reports: ClassVar[tuple[str, ...]] = LORA_EXPORT
    provides: ClassVar[dict[str, str]] = {"adapter": "adapter"}
    model: ResolveModel
    source: Task  # provides "model": trained, imported or composed
    form: ir.LoraForm

    def execute(self, ctx: TaskContext) -> TaskResult:
        return export_adapter(self, ctx)
