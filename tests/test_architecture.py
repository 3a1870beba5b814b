"""The shape of the code: import rules, no cycles, one vocabulary of metrics and events,
and the commands that work on specs without touching a model never load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from behaviorc.pipeline.kinds import TASK_KINDS
from behaviorc.core import metrics
from behaviorc.core.events import TASK_EVENTS
from behaviorc.tui.state import EXECUTOR_FOLDS, TASK_EVENT_FOLDS
from behaviorc.lab.measure import GdnStates, MeasurePoint

ROOT = Path(__file__).resolve().parent.parent
ALL_KINDS = {**TASK_KINDS, MeasurePoint.kind: MeasurePoint, GdnStates.kind: GdnStates}


def test_the_import_contract_holds():
    result = subprocess.run(["lint-imports", "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("behaviorc")
    modules = sorted(graph.modules)
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m)
                 if i.startswith("behaviorc") and not m.startswith(i + ".")} for m in modules}
    # Tarjan's strongly connected components: any with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in edges.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in modules:
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("command", ["check", "plan", "fmt --check"])
def test_commands_on_specs_never_import_torch(command):
    script = ("import sys\n"
              "from behaviorc.cli import main\n"
              f"code = main({command.split()!r} + ['specs/persona.behavior'])\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n"
              "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
              "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_a_task_reports_is_named_and_described():
    for kind, cls in ALL_KINDS.items():
        undescribed = set(cls.reports) - set(metrics.METRICS)
        assert not undescribed, f"{kind} reports {undescribed}, not in core.metrics.METRICS"


def test_expect_accepts_every_metric_of_the_tasks_a_behavior_lowers_to():
    for kind in ("steer.extract", "steer.verify", "train"):
        assert set(TASK_KINDS[kind].reports) <= set(metrics.EXPECTABLE), kind


def test_the_dashboard_folds_every_event_a_task_emits():
    # (the registry also holds the events the tests' own tasks define)
    emitted = {event for event in TASK_EVENTS.values() if event.__module__.startswith("behaviorc.")}
    unfolded = emitted - set(TASK_EVENT_FOLDS)
    assert not unfolded, f"the dashboard's state folds no {sorted(e.__name__ for e in unfolded)}"


def test_the_dashboard_handles_no_event_nothing_emits():
    executor_events = {"build_start", "task_start", "progress", "cache_invalid", "task_end",
                       "task_failed", "expectation_unmet", "build_end"}
    assert set(EXECUTOR_FOLDS) <= executor_events, set(EXECUTOR_FOLDS) - executor_events
