"""The reply-table tasks: AnswerPrompts (one model's replies to the held-out prompts) and
ReplyTable (every model's replies scored, compared and judged).

Each model's replies are their own task, so a change to training regenerates only the
trained model's replies, and a change of scorer (or a judge that fails) only rescores.
The steering vectors and the trained model folder come from upstream task results, by
the role they provide, never by importing the capability that made them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from behaviorc.core.vocabulary import ReplyModel
from behaviorc.core import ir
from behaviorc.core.events import EvalReplies
from behaviorc.core.metrics import REPLY_TABLE
from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.model.task import ResolveModel



def _base_engine(task: AnswerPrompts | ReplyTable, ctx: TaskContext):
    decl = task.model.decl
    return ctx.engine(ctx.result(task.model).data["path"], decl.dtype, decl.device)


def answer_prompts(task: AnswerPrompts, ctx: TaskContext) -> TaskResult:
    from behaviorc.formats.steering import load_steering
    from behaviorc.measure.replies import answer, read_by

    base = _base_engine(task, ctx)
    engine, steering, strength, positions, data = base, None, 0.0, "all", {}
    if task.variant == "steered":
        vectors = load_steering(ctx.result(task.source).path(task.source.artifact("steering")), task.loc)
        steering, positions = vectors.directions, vectors.positions
        strength = ctx.result(task.verification).data["strength"] if task.strength == "auto" \
            else task.strength
        data["strength"] = strength
    elif task.variant == "trained":
        folder = ctx.result(task.source).path(task.source.artifact("model"))
        engine = ctx.engine(str(folder), task.model.decl.dtype, task.model.decl.device)
    ctx.progress(0, 2, f"{task.variant} model answering {len(task.prompts)} prompts")
    replies = answer(engine, task.prompts, task.samples, system=task.system, steering=steering,
                     strength=strength, positions=positions, max_new_tokens=task.max_tokens)
    ctx.progress(1, 2, "reading the replies with the base model")
    replies = read_by(base, replies)
    return TaskResult(data={**data, "variant": task.variant,
                            "answers": [r.as_dict() for r in replies]})


def score_replies(task: ReplyTable, ctx: TaskContext) -> TaskResult:
    from behaviorc.evaluate.table import reply_table, side_by_side
    from behaviorc.measure.replies import Reply

    scorer = _scorer(task, ctx)
    replies, scores = {}, {}
    for i, answers in enumerate(task.answers):
        replies[answers.variant] = [Reply.from_dict(row) for row in ctx.result(answers).data["answers"]]
        ctx.progress(i, len(task.answers), f"scoring the {answers.variant} model's replies")
        scores[answers.variant] = scorer.scores(replies[answers.variant])
    table = reply_table(replies, scores)
    shown = side_by_side(replies)
    ctx.emit(EvalReplies(scorer=scorer.name, rows=table.rows(), verdict=list(table.verdict),
                             side_by_side=shown))
    return TaskResult(metrics=table.metrics(), data={
        "scorer": scorer.name,
        "rows": table.rows(),
        "verdict": list(table.verdict),
        "warnings": list(table.warnings),
        "side_by_side": shown,
        "scored": {model: [{**r.as_dict(), "score": s} for r, s in zip(replies[model], scores[model])]
                    for model in replies},
    })


def _scorer(task: ReplyTable, ctx: TaskContext):
    from behaviorc.measure.replies import Markers, Projection

    score = task.score
    if score.kind == "markers":
        return Markers(pattern=score.pattern, words=score.words)
    if score.kind == "projection":
        from behaviorc.formats.steering import load_steering

        vectors = load_steering(ctx.result(task.steering).path(task.steering.artifact("steering")), task.loc)
        return Projection.calibrate(_base_engine(task, ctx), vectors.directions, task.pairs)
    from behaviorc.measure.judge import Judge

    judge = score.judge
    return Judge(judge.url, judge.model, judge.rubric, guided=judge.guided, timeout=judge.timeout)


class AnswerPrompts(Task):
    """One model's replies to the held-out prompts: per prompt one greedy reply and
    `samples` sampled ones, each read by the base model (length, NLL). The model is the
    base (`base`), the base with a system prompt (`prompted`), the base steered by the
    `source`'s vectors (`steered`) or the `source`'s trained folder (`trained`).
    data: variant, answers [{prompt, text, sampled, tokens, nll}], strength (steered)."""

    kind: ClassVar[str] = "evaluate.answer"
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel  # the base model: it answers (base, prompted, steered) and reads
    variant: ReplyModel
    prompts: tuple[str, ...]
    samples: int
    max_tokens: int
    system: str | None = None  # prompted
    source: Task | None = None  # steered: provides "steering"; trained: provides "model"
    strength: float | Literal["auto"] = 0.0  # steered; auto: the verification's choice
    verification: Task | None = None  # steered at `strength auto`: data["strength"]

    def execute(self, ctx: TaskContext) -> TaskResult:
        return answer_prompts(self, ctx)


class ReplyTable(Task):
    """The behavior's reply table: every model's replies scored (markers, projection on
    the steering direction calibrated on `pairs`, or a judge), with intervals, the
    verdict and a few greedy replies side by side. metrics: core.metrics.REPLY_TABLE
    (for the models that answered). data: scorer, table [{model, replies, rate, score,
    distinct_2, repeated_share, nll, tokens, looping}], verdict, warnings,
    side_by_side [{prompt, base, ...}], scored {model: [{prompt, text, ..., score}]}."""

    kind: ClassVar[str] = "evaluate.table"
    reports: ClassVar[tuple[str, ...]] = REPLY_TABLE
    parallel_safe: ClassVar[bool] = True
    model: ResolveModel
    answers: tuple[AnswerPrompts, ...]
    score: ir.Score
    steering: Task | None = None  # projection: provides "steering"
    pairs: tuple[ir.Pair, ...] = ()  # projection: its calibration

    def models(self) -> tuple[Task, ...]:
        """Only the projection reads the model."""
        return (self.model,) if self.score.kind == "projection" else ()

    def execute(self, ctx: TaskContext) -> TaskResult:
        return score_replies(self, ctx)
