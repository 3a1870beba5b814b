"""Every kind of task a plan can hold.

Each class names its inputs as fields; `execute` hands itself to the method that does
the work, imported lazily so that checking and planning never import torch. The
implementing functions take `(task, ctx)` and return a TaskResult with the artifact
and metric names documented on each class.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from behaviorc import ir
from behaviorc.plan.task import Task, TaskContext, TaskResult


class ResolveModel(Task):
    """Make a model available as a local folder (build a built-in, check a folder, find
    a hub id in the offline cache). data: path, architecture, num_layers."""

    kind: ClassVar[str] = "model"
    decl: ir.ModelDecl

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.model.tasks import resolve_model
        return resolve_model(self, ctx)


class ExtractSteering(Task):
    """Steering vectors from contrast pairs. artifacts: vectors (safetensors, a
    `layer.{L}` tensor per layer), control_vector (GGUF). data: layers, norms, and for
    `auto` the per-layer separation scores that chose them."""

    kind: ClassVar[str] = "steer.extract"
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    # Only what extraction reads, so changing a strength does not re-extract.
    layers: tuple[int, ...] | Literal["auto"]
    method: Literal["mean_diff", "pca"]
    read: Literal["last", "mean"]
    pairs: tuple[ir.Pair, ...]  # the extraction split

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.steer.tasks import extract_steering
        return extract_steering(self, ctx)


class VerifySteering(Task):
    """The behavior margin on held-out pairs with steering off and on. metrics:
    margin_before, margin_steered, margin_after (= margin_steered), general_nll_before,
    general_nll_steered. data: sweep [{strength, margin, general_nll}]."""

    kind: ClassVar[str] = "steer.verify"
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    vectors: ExtractSteering
    strength: float
    sweep: tuple[float, ...]
    pairs: tuple[ir.Pair, ...]  # held out from extraction
    general: tuple[str, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.steer.tasks import verify_steering
        return verify_steering(self, ctx)


class TrainBehavior(Task):
    """APOLLO fine-tuning of the behavior's targets. artifacts: model (a Hugging Face
    folder). metrics: loss_first, loss_last, margin_before, margin_after,
    general_nll_before, general_nll_after, steps_skipped."""

    kind: ClassVar[str] = "train"
    model: ResolveModel
    train: ir.Train
    eval_pairs: tuple[ir.Pair, ...]
    general: tuple[str, ...]
    # Set when train.distill makes the steered behavior permanent, or a hand-off serves
    # it steered while it trains: the vectors, at `strength`.
    steering: ExtractSteering | None = None
    strength: float = 0.0
    # Set when a live deploy of this behavior says `handoff on`: this task then owns
    # the deploy's servers and hands the steering over to the weights while it trains.
    handoff: ir.Deploy | None = None

    @property
    def parallel_safe(self) -> bool:  # type: ignore[override]
        """A worker may train it, unless it owns a live deploy's servers."""
        return self.handoff is None

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.train.tasks import train_behavior
        return train_behavior(self, ctx)


class ImportModel(Task):
    """A fine-tuned model folder trained elsewhere. artifacts: model (the folder itself)."""

    kind: ClassVar[str] = "import.model"
    external: ir.External

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.vectors.tasks import import_model
        return import_model(self, ctx)


class ImportTaskVector(Task):
    """A task-vector file made elsewhere, checked against the base. artifacts: task_vector."""

    kind: ClassVar[str] = "import.task_vector"
    model: ResolveModel
    external: ir.External

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.vectors.tasks import import_task_vector
        return import_task_vector(self, ctx)


class ExtractTaskVector(Task):
    """tau = W_finetuned - W_base over the tensors that differ. artifacts: task_vector."""

    kind: ClassVar[str] = "task_vector"
    model: ResolveModel
    finetuned: TrainBehavior | ImportModel

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.vectors.tasks import extract_task_vector
        return extract_task_vector(self, ctx)


class ComposeBehaviors(Task):
    """W_base + merge(weight_i * tau_i) as a model folder, and the same combination of
    the behaviors' steering vectors. artifacts: model, steering (when any term steers).
    data: provenance (expression, terms, vector hashes)."""

    kind: ClassVar[str] = "compose"
    model: ResolveModel
    compose: ir.Compose
    vectors: tuple[ExtractTaskVector | ImportTaskVector, ...]  # aligned with compose.terms
    steering: tuple[ExtractSteering, ...]  # for the terms whose behavior steers, by name
    # Each of `steering`'s behavior strengths, in order: a composed vector is
    # sum(weight * strength * vector), served at strength 1.
    steering_strengths: tuple[float, ...]

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.vectors.tasks import compose_behaviors
        return compose_behaviors(self, ctx)


class DeployModel(Task):
    """Push a model folder (and optionally steering) into live vLLM servers, all or
    nothing across replicas; for a behavior that only steers (no `source`), attach its
    vectors server-wide (`steering on`) or detach all (`steering off`).
    metrics: push_ms, requests_failed. data: urls."""

    kind: ClassVar[str] = "deploy"
    deploy: ir.Deploy
    model: ResolveModel
    source: TrainBehavior | ImportModel | ComposeBehaviors | None
    steering: ExtractSteering | ComposeBehaviors | None = None
    steering_strength: float = 1.0  # the behavior's steer strength (1.0 for a composition)

    def execute(self, ctx: TaskContext) -> TaskResult:
        from behaviorc.engine.tasks import deploy_model
        return deploy_model(self, ctx)


TASK_KINDS: dict[str, type[Task]] = {
    cls.kind: cls
    for cls in (ResolveModel, ExtractSteering, VerifySteering, TrainBehavior, ImportModel,
                ImportTaskVector, ExtractTaskVector, ComposeBehaviors, DeployModel)
}
