"""Judging a spec's `expect` lines against the metrics a build measured.

An expectation whose task ran (or was cached) is met or unmet; one whose task finished
without reporting the metric is unmet too (it cannot pass unchecked). Expectations of
tasks that did not finish, or are not part of this build (`--only`), are not judged:
the build fails for those tasks already, or did not try them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from behaviorc.core.diagnostics import Diagnostic, Location
from behaviorc.core.task import TaskResult
from behaviorc.pipeline.plan import TaskExpectation


@dataclass(frozen=True)
class Verdict:
    task_id: str
    metric: str
    op: str
    value: float
    actual: float | None
    met: bool
    loc: Location | None

    def render(self) -> str:
        if self.actual is None:
            message = f"expectation not measured: {self.task_id} reported no `{self.metric}`"
        else:
            message = (f"expectation not met: {self.metric} {self.op} {self.value:g} "
                       f"(measured {self.actual:.4g} by {self.task_id})")
        return Diagnostic("error", message, self.loc).render()

    def as_json(self) -> dict[str, Any]:
        return {"task": self.task_id, "metric": self.metric, "op": self.op, "value": self.value,
                "actual": self.actual, "met": self.met,
                "loc": self.loc.model_dump() if self.loc else None}


def judge(expectations: Sequence[TaskExpectation], finished: Mapping[str, TaskResult]) -> list[Verdict]:
    """Verdicts on the expectations whose task finished (`finished`: results by task id)."""
    verdicts = []
    for expectation in expectations:
        result = finished.get(expectation.task_id)
        if result is None:
            continue
        e = expectation.expect
        actual = result.metrics.get(e.metric)
        met = actual is not None and expectation.holds(actual)
        verdicts.append(Verdict(expectation.task_id, e.metric, e.op, e.value, actual, met, e.loc))
    return verdicts
