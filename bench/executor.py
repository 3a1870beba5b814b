"""The executor's own cost per task, on a plan of no-op tasks.

    python bench/executor.py [--tasks 1000] [--depth 10]

Side by side in one run: calling each task's `execute` directly in dependency order
(the floor: what any runner must do), a fresh build (stage, hash, fsync, rename, events,
report per task) and an unchanged rebuild (verify each stored result). The headline is
the issue's budget over our per-task overhead on a fresh build: 5 ms / ours.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import ClassVar

from behaviorc.core.task import Task, TaskContext, TaskResult
from behaviorc.pipeline.executor import Executor, plan_order

BUDGET_MS = 5.0


class Noop(Task):
    kind: ClassVar[str] = "bench.noop"
    reports: ClassVar[tuple[str, ...]] = ('index',)
    after: "Noop | None" = None

    def execute(self, ctx: TaskContext) -> TaskResult:
        return TaskResult(metrics={"index": 1.0})


def make_plan(tasks: int, depth: int) -> list[Task]:
    """`tasks` no-op tasks in chains of `depth` (deep chains would only test recursion)."""
    plan, previous = [], None
    for i in range(tasks):
        previous = Noop(name=f"t{i}", after=previous if i % depth else None)
        plan.append(previous)
    return plan


class DirectContext:
    """The least a task needs to run: a folder."""

    def __init__(self, out: Path):
        self.out = out


def run_directly(tasks: list[Task], root: Path) -> float:
    started = time.perf_counter()
    for i, task in enumerate(plan_order(tasks)):
        folder = root / str(i)
        folder.mkdir()
        task.execute(DirectContext(folder))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=10)
    args = parser.parse_args()
    tasks = make_plan(args.tasks, args.depth)
    n = len(plan_order(tasks))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "direct").mkdir()
        direct = run_directly(tasks, root / "direct")

        started = time.perf_counter()
        fresh = Executor(root / "build").run(tasks)
        fresh_s = time.perf_counter() - started
        assert fresh.ok and all(r.status == "done" for r in fresh.records)

        started = time.perf_counter()
        cached = Executor(root / "build").run(tasks)
        cached_s = time.perf_counter() - started
        assert cached.ok and all(r.status == "cached" for r in cached.records)

    direct_ms = direct / n * 1000
    fresh_ms = fresh_s / n * 1000
    cached_ms = cached_s / n * 1000
    overhead_ms = max(fresh_ms - direct_ms, 1e-6)
    print(f"{n} no-op tasks")
    print(f"  calling execute directly  {direct_ms:8.3f} ms/task  (the floor)")
    print(f"  executor, fresh build     {fresh_ms:8.3f} ms/task  (overhead {overhead_ms:.3f} ms)")
    print(f"  executor, cached rebuild  {cached_ms:8.3f} ms/task")
    print(f"  budget                    {BUDGET_MS:8.3f} ms/task")
    print(json.dumps({
        "bench": "executor",
        "figures": {"tasks": n, "direct_ms_per_task": round(direct_ms, 4),
                    "fresh_ms_per_task": round(fresh_ms, 4), "overhead_ms_per_task": round(overhead_ms, 4),
                    "cached_ms_per_task": round(cached_ms, 4), "budget_ms_per_task": BUDGET_MS},
        "headline": {"what": "5 ms budget / executor overhead per no-op task (fresh build)",
                     "ratio": round(BUDGET_MS / overhead_ms, 2), "target": 1.0},
    }))


if __name__ == "__main__":
    main()
