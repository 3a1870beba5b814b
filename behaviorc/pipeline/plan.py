"""A Plan: the tasks of a checked spec in dependency order, and how to show them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from behaviorc.core import ir
from behaviorc.core.task import Task


@dataclass(frozen=True)
class TaskExpectation:
    """An `expect` line of the spec, bound to the task whose metrics answer it."""

    task_id: str
    expect: ir.Expectation

    def holds(self, value: float) -> bool:
        op, bound = self.expect.op, self.expect.value
        return {">": value > bound, ">=": value >= bound, "<": value < bound,
                "<=": value <= bound}[op]


@dataclass(frozen=True)
class Plan:
    spec: ir.Spec
    tasks: tuple[Task, ...]  # dependencies first, each once
    notes: tuple[str, ...] = ()  # choices lowering made that a user should know about
    expectations: tuple[TaskExpectation, ...] = ()

    def task(self, task_id: str) -> Task:
        return next(t for t in self.tasks if t.id == task_id)

    def render_tree(self) -> str:
        """Each task with its key prefix and source line, its dependencies beneath it;
        a task shown once already is named, not expanded again."""
        needed = {dep.key for task in self.tasks for dep in task.arguments().values()}
        rows: list[tuple[str, str]] = []  # (tree part, key and location)
        shown: set[str] = set()

        def visit(task: Task, prefix: str, branch: str) -> None:
            if task.key in shown:
                rows.append((f"{prefix}{branch}{task.id} (above)", ""))
                return
            shown.add(task.key)
            where = f"  {task.loc.file}:{task.loc.line}" if task.loc else ""
            rows.append((f"{prefix}{branch}{task.id}", f"{task.key[:8]}{where}"))
            deps = list({dep.key: dep for dep in task.arguments().values()}.values())
            inner = prefix + {"": "", "├── ": "│   ", "└── ": "    "}[branch]
            for i, dep in enumerate(deps):
                visit(dep, inner, "└── " if i == len(deps) - 1 else "├── ")

        for root in (t for t in self.tasks if t.key not in needed):
            visit(root, "", "")
        width = max((len(tree) for tree, detail in rows if detail), default=0)
        count = len(self.tasks)
        lines = [f"{self.spec.path}: {count} task{'s' if count != 1 else ''}"]
        lines += [f"{tree:<{width}}  {detail}".rstrip() for tree, detail in rows]
        lines += [f"note: {note}" for note in self.notes]
        for expectation in self.expectations:
            e = expectation.expect
            lines.append(f"expect: {e.metric} {e.op} {e.value:g} (from {expectation.task_id})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.path,
            "sha256": self.spec.sha256,
            "tasks": [_task_dict(t) for t in self.tasks],
            "notes": list(self.notes),
            "expectations": [{"task": e.task_id, **e.expect.model_dump(mode="json")}
                             for e in self.expectations],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _task_dict(task: Task) -> dict[str, Any]:
    upstream = task.arguments()
    task_fields = {name.split(".")[0] for name in upstream}
    return {
        "id": task.id,
        "kind": task.kind,
        "name": task.name,
        "key": task.key,
        "deps": list(dict.fromkeys(t.id for t in upstream.values())),
        "loc": str(task.loc) if task.loc else None,
        "fields": task.model_dump(mode="json", exclude=task_fields | {"loc"}),
    }
