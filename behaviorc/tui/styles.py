"""How the terminal progress and the dashboard show a build: a task's status, its
numbers, its running sub-phase, a reply table and an event's fields, from the state
folded in `behaviorc.tui.state`.
"""

from __future__ import annotations

import json
from typing import Any

from behaviorc.tui.state import TaskState

STATUS_STYLE = {
    "pending": ("·", "dim"), "running": ("▶", "bold yellow"), "done": ("✓", "green"),
    "cached": ("≡", "cyan"), "failed": ("✗", "bold red"), "skipped": ("-", "dim"),
    "cancelled": ("■", "magenta"),
}
SHOWN_METRICS = 3
# What a finished task's terminal line shows first: the behavior before and after; for a
# steering verification, the effect beside the random control's and the shares of pairs
# moved the right and the wrong (anti-steerable) way.
HEADLINE_METRICS = ("margin_before", "margin_steered", "margin_after", "steer_effect",
                    "control_effect", "right_share", "anti_steerable_share", "steered_share",
                    "push_ms", "requests_failed")
LINE_METRICS = 6


def format_metrics(metrics: dict[str, float], limit: int = SHOWN_METRICS) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:limit])


def headline_first(metrics: dict[str, float]) -> dict[str, float]:
    first = {k: metrics[k] for k in HEADLINE_METRICS if k in metrics}
    return {**first, **{k: v for k, v in metrics.items() if k not in first}}


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_text(task: TaskState, now: float | None) -> str:
    """A running task's sub-phase, count and ETA in a few words, e.g.
    `sampling 10 prompts x 4 · 0/30` or `loss 0.41 · 12/30 (40%) · ETA 1m05s`; no ETA
    without a clock (`now` None)."""
    if task.progress is None:
        return task.note or ""
    done, total, what = task.progress
    parts = [what] if what else []
    if total > 0:
        parts.append(f"{done}/{total} ({100 * done // total}%)")
    eta = task.phase.eta(done, now) if task.phase is not None and now is not None else None
    if eta is not None:
        parts.append(f"ETA {format_seconds(eta)}")
    return " · ".join(parts)


def reply_table_lines(table: dict[str, Any]) -> list[str]:
    """A reply table (eval.replies' fields, evaluate.table's data) as text: a row
    per model with 95% intervals, the verdict, then greedy replies side by side."""
    def cell(figure: dict[str, float] | None, percent: bool = False) -> str:
        if not figure or figure.get("mean") != figure.get("mean"):  # absent or NaN
            return "–"
        show = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:.2f}")
        return f"{show(figure['mean'])} [{show(figure['low'])}, {show(figure['high'])}]"

    lines = [f"  {'model':<9} {'behavior rate':<16} {'mean score':<19} {'distinct-2':<19} "
             f"{'NLL under base':<19} loops"]
    for row in table.get("rows") or []:
        lines.append(f"  {row['model']:<9} {cell(row.get('rate'), True):<16} "
                     f"{cell(row.get('score')):<19} {cell(row.get('distinct_2')):<19} "
                     f"{cell(row.get('nll')):<19} {row.get('looping', 0):.0%}")
    lines += [f"  verdict: {line}" for line in table.get("verdict") or []]
    for row in table.get("side_by_side") or []:
        lines.append(f"  prompt: {row['prompt']}")
        lines += [f"    {model + ':':<10}{' '.join(str(text).split())}" for model, text in row.items()
                  if model != "prompt"]
    return lines


def summarize(event: dict[str, Any]) -> str:
    """One line for an event in a log: its fields other than t/type/task."""
    fields = {k: v for k, v in event.items() if k not in ("t", "type", "task", "tasks", "data")}
    parts = []
    for name, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            value = _short(value)
        elif isinstance(value, str) and "\n" in value:
            value = value.splitlines()[0]
        parts.append(f"{name}={value}")
    return " ".join(parts)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
