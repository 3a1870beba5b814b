"""The dashboard's widgets. Each draws from a `BuildState`; none reads files or events.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static, Tree

from behaviorc.tui.state import BuildState, TaskState
from behaviorc.tui.styles import STATUS_STYLE, format_metrics, progress_text, reply_table_lines, summarize

BLOCKS = "▁▂▃▄▅▆▇█"
CURVE_WIDTH = 40
PLOT_HEIGHT = 5
REPLY_CHARS = 160  # of a reply shown in a panel
DISTILLED_SHOWN = 3
SWEEP_COLUMNS = 4  # columns per strength in the sweep's plot


def _resample(values: list[float], width: int) -> list[float]:
    """At most `width` values: the mean of each column's share of the points."""
    if len(values) <= width:
        return list(values)
    step = len(values) / width
    return [sum(chunk) / len(chunk) for chunk in
            (values[int(i * step): max(int((i + 1) * step), int(i * step) + 1)] for i in range(width))]


def render_curve(values: list[float], width: int = CURVE_WIDTH) -> str:
    """A one-line plot: the values resampled to `width` columns, as block heights."""
    if not values:
        return ""
    values = _resample(values, width)
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(BLOCKS[min(int((v - low) / span * (len(BLOCKS) - 1) + 0.5), len(BLOCKS) - 1)] for v in values)


def render_plot(values: list[float], height: int = PLOT_HEIGHT, width: int = CURVE_WIDTH,
                label: str = "") -> Text:
    """A plot `height` rows tall (each row eight block heights), the highest and lowest
    value on its axis, `label` under it."""
    if not values:
        return Text("")
    values = _resample(values, width)
    low, high = min(values), max(values)
    span = high - low or 1.0
    eighths = [1 + round((v - low) / span * (height * 8 - 1)) for v in values]
    lines = []
    for row in range(height - 1, -1, -1):
        cells = "".join(" " if e <= row * 8 else BLOCKS[min(e - row * 8, 8) - 1] for e in eighths)
        axis = f"{high:>9.4g} ┤" if row == height - 1 else f"{low:>9.4g} ┤" if row == 0 else " " * 10 + "│"
        lines.append(Text.assemble((axis, "dim"), cells))
    lines.append(Text(" " * 11 + label, style="dim"))
    return Text("\n").join(lines)


def task_seconds(task: TaskState, now: float) -> str:
    if task.status == "running" and task.started is not None:
        return f"{max(now - task.started, 0.0):.1f}s"
    if task.seconds is not None and task.status not in ("pending", "skipped"):
        return f"{task.seconds:.1f}s"
    return ""


def task_label(task: TaskState, now: float) -> Text:
    icon, style = STATUS_STYLE.get(task.status, ("?", ""))
    label = Text.assemble((icon + " ", style), (task.kind, style))
    seconds = task_seconds(task, now)
    if task.status == "running" and task.progress and task.progress[1]:
        seconds = f"{task.progress[0]}/{task.progress[1]} {seconds}"
    if seconds:
        label.append(f" {seconds}", "dim")
    return label


class PlanTree(Tree[str]):
    """The plan: one branch per model, behavior or composition, its tasks as leaves
    (data: the task id); enter opens a task's detail."""

    def __init__(self, **kwargs: Any):
        super().__init__("plan", **kwargs)
        self.show_root = False
        self._leaves: dict[str, Any] = {}

    def show_plan(self, state: BuildState, now: float) -> None:
        self.clear()
        self._leaves.clear()
        branches: dict[str, Any] = {}
        for task in state.tasks.values():
            name = task.id.split(":", 1)[-1]
            if name not in branches:
                branches[name] = self.root.add(Text(name), expand=True)  # names hold [..]: not markup
            self._leaves[task.id] = branches[name].add_leaf(task_label(task, now), data=task.id)

    def node_for(self, task_id: str) -> Any:
        return self._leaves[task_id]

    def labels(self) -> dict[str, str]:
        """Each task's label as shown, by task id."""
        return {task_id: node.label.plain for task_id, node in self._leaves.items()}

    def refresh_labels(self, state: BuildState, now: float) -> None:
        if set(self._leaves) != set(state.tasks):
            self.show_plan(state, now)
            return
        for task_id, node in self._leaves.items():
            node.set_label(task_label(state.tasks[task_id], now))


class StatePanel(Static):
    """A panel drawn entirely from the build state by a render function."""

    def __init__(self, draw: Callable[[BuildState], RenderableType], **kwargs: Any):
        super().__init__(**kwargs)
        self.draw = draw

    def show(self, state: BuildState) -> None:
        self.update(self.draw(state))


def _heading(text: str) -> Text:
    return Text(text, style="bold")


def _metric(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.3f}" if name in metrics else "–"


# An experiment's measured numbers, in the order its points table shows them.
POINT_COLUMNS = (("rate", "rate"), ("margin", "margin"), ("general_nll", "gen nll"),
                 ("arithmetic_accuracy", "arith"))


def draw_points(state: BuildState) -> list[RenderableType]:
    """An experiment's measured points so far, as a table (nothing outside experiments)."""
    planned = [t.id for t in state.tasks.values() if t.kind == "experiment.measure"]
    if not planned and not state.points:
        return []
    measured = [task_id for task_id in dict.fromkeys(planned + list(state.points)) if task_id in state.points]
    columns = [(name, title) for name, title in POINT_COLUMNS if any(name in state.points[t] for t in measured)]
    table = Table("point", *(title for _, title in columns), box=None, pad_edge=False)
    for task_id in measured:
        numbers = state.points[task_id]
        table.add_row(Text(task_id.split(":", 1)[-1]),
                      *(f"{numbers[name]:.3f}" if name in numbers else "–" for name, _ in columns))
    return [_heading(f"measured points  {len(measured)}/{len(planned) or len(measured)}"), table, Text("")]


def draw_training(state: BuildState) -> RenderableType:
    trains = [t for t in state.tasks.values() if t.kind == "train"]
    points = draw_points(state)
    if not trains and not state.losses and not points:
        return Text("no training in this plan", style="dim")
    parts: list[RenderableType] = list(points)
    for task_id in dict.fromkeys([t.id for t in trains] + list(state.losses)):
        task = state.tasks.get(task_id)
        losses = state.losses.get(task_id, [])
        margins = state.train_margins.get(task_id, [])
        status = task.status if task else "?"
        parts.append(_heading(f"{task_id}  [{status}]"))
        if task is not None and task.status == "running":
            # no ETA here: the status line gives it by the dashboard's clock; panels draw
            # from events alone, so a replayed build looks as it did
            parts.append(Text(f"▶ {progress_text(task, None) or 'starting'}", style="yellow"))
        if task is not None and task.metrics:
            parts.append(_train_margins(task.metrics))
        if losses:
            step, loss = losses[-1]
            parts.append(render_plot([l for _, l in losses], label=f"loss per step · step {step}: {loss:.4f}"))
        if margins:
            step, margin = margins[-1]
            parts.append(Text(f"margin {render_curve([m for _, m in margins])}  {margin:+.3f}"))
        served = state.served.get(task_id, [])
        if served:
            step, margin, strength = served[-1]
            parts.append(Text(f"served {render_curve([m for _, m, _ in served])}  {margin:+.3f} "
                              f"at strength {strength:g} (step {step})"))
        distilled = state.distilled.get(task_id)
        if distilled:
            parts.append(Text(f"distilled: kept {distilled.get('kept')} of {distilled.get('generated')} "
                              f"samples (mean score {distilled.get('mean_score', float('nan')):.3f}, "
                              f"{distilled.get('engine', '')})", style="dim"))
        for note in state.notes.get(task_id, []):
            parts.append(Text(f"! {note}", style="yellow"))
        if task is not None:
            parts += _distilled_samples(task) + _final_replies(task)
        if task and task.metrics:
            parts.append(Text(format_metrics(task.metrics, limit=8), style="dim"))
        parts.append(Text(""))
    return Group(*parts)


# What a training says about the behavior, first: the margin before, steered and after
# (steering removed), and the share of the steered gain the weights carry.
TRAIN_MARGINS = (("before", "margin_before"), ("steered", "margin_steered"), ("after", "margin_after"),
                 ("steered_share", "steered_share"))


def _train_margins(metrics: dict[str, float]) -> Text:
    shown = [(title, metrics[key]) for title, key in TRAIN_MARGINS if key in metrics]
    return Text("margin  " + "  ".join(f"{title} {value:+.3f}" for title, value in shown), style="bold")


def _distilled_samples(task: TaskState) -> list[RenderableType]:
    """A few of the steered replies distillation trained on (the task's data.samples)."""
    samples = task.data.get("samples") or []
    if not samples:
        return []
    parts: list[RenderableType] = [_heading(f"distilled samples ({len(samples)} shown)")]
    for sample in samples[:DISTILLED_SHOWN]:
        parts.append(Text.assemble(("  " + _one_line(sample.get("prompt", "")), "bold"),
                                   (f"  score {sample['score']:+.3f}" if "score" in sample else "", "dim")))
        parts.append(Text("    " + _one_line(sample.get("response", ""))))
    return parts


def _final_replies(task: TaskState) -> list[RenderableType]:
    """Greedy replies to held-out prompts of the base, steered and trained model."""
    rows = task.data.get("replies") or []
    if not rows:
        return []
    parts: list[RenderableType] = [_heading("replies (greedy)")]
    for row in rows:
        parts.append(Text("  " + _one_line(row.get("prompt", "")), style="bold"))
        for model, reply in row.items():
            if model != "prompt":
                parts.append(Text.assemble((f"    {model + ':':<9} ", "dim"), _one_line(str(reply))))
    return parts


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= REPLY_CHARS else text[:REPLY_CHARS - 1] + "…"


def draw_steering(state: BuildState) -> RenderableType:
    verifies = [t for t in state.tasks.values() if t.kind == "steer.verify"]
    if not verifies:
        return Text("no steering in this plan", style="dim")
    # The steerability figures (effect beside the random control's, pairs moved the
    # right and the wrong way) where the build measured them.
    report = [("effect", "steer_effect"), ("control", "control_effect"),
              ("right", "right_share"), ("wrong", "anti_steerable_share")]
    report = [(title, key) for title, key in report if any(key in t.metrics for t in verifies)]
    table = Table("behavior", "before", "steered", "after", *(t for t, _ in report),
                  box=None, pad_edge=False)
    for task in verifies:
        m, name = task.metrics, task.id.split(":", 1)[-1]
        # after: the trained model without steering, as its training measured it
        trained = state.tasks.get(f"train:{name}")
        table.add_row(name, _metric(m, "margin_before"), _metric(m, "margin_steered"),
                      _metric(trained.metrics if trained else {}, "margin_after"),
                      *(_metric(m, key) for _, key in report))
    parts: list[RenderableType] = [_heading("margins"), table]
    for task_id, layers in state.layer_scores.items():
        parts += [Text(""), _heading(f"layers auto  {task_id.split(':', 1)[-1]}: chose {layers['chosen']}")]
        # effect, lift and distillable: the steered candidates only (steer.extract)
        steered = ("effect", "lift", "distillable")
        rows = Table("layer", "consistency", "accuracy", *steered, box=None, pad_edge=False)
        for score in layers["scores"]:
            rows.add_row(str(score.get("layer")), f"{score.get('consistency', 0):.3f}",
                         f"{score.get('accuracy', 0):.3f}",
                         *(f"{score[key]:+.3f}" if score.get(key) is not None else "–" for key in steered))
        parts.append(rows)
    for task in verifies:
        for warning in task.data.get("warnings") or []:
            parts.append(Text(f"⚠ {task.id.split(':', 1)[-1]}: {warning}", style="bold yellow"))
        if task.data.get("choice"):
            parts.append(Text(f"{task.id.split(':', 1)[-1]}: {task.data['choice']}", style="dim"))
    for task_id, sweep in state.sweeps.items():
        parts += [Text(""), _heading(f"strength sweep  {task_id.split(':', 1)[-1]}")]
        # capability is measured only where a strength is used (None elsewhere)
        costs = [key for key in ("capability", "repetition") if any(p.get(key) is not None for p in sweep)]
        rows = Table("strength", "margin", "general nll", *costs, box=None, pad_edge=False)
        for point in sweep:
            rows.add_row(f"{point.get('strength', 0):g}", f"{point.get('margin', 0):+.3f}",
                         f"{point['general_nll']:.3f}" if "general_nll" in point else "–",
                         *(f"{point[key]:.3f}" if point.get(key) is not None else "–" for key in costs))
        ordered = sorted(sweep, key=lambda p: p.get("strength", 0.0))
        strengths = ", ".join(f"{p.get('strength', 0):g}" for p in ordered)
        parts += [render_plot([p.get("margin", 0.0) for p in ordered for _ in range(SWEEP_COLUMNS)],
                              label=f"margin per strength ({strengths})"), rows]
        parts += _sample_replies(state.tasks.get(task_id), sweep)
    return Group(*parts)


def _sample_replies(task: TaskState | None, sweep: list[dict]) -> list[RenderableType]:
    """Each sampled prompt, then the greedy reply at every strength tried."""
    prompts = (task.data.get("sample_prompts") if task else None) or []
    if not any(point.get("samples") for point in sweep):
        return []
    parts: list[RenderableType] = [Text(""), _heading("sample replies (greedy)")]
    count = max(len(point.get("samples") or []) for point in sweep)
    for index in range(count):
        prompt = prompts[index] if index < len(prompts) else f"prompt {index + 1}"
        parts.append(Text(prompt, style="bold"))
        for point in sweep:
            samples = point.get("samples") or []
            reply = " ".join(samples[index].split()) if index < len(samples) else ""
            parts.append(Text.assemble((f"  {point.get('strength', 0):>5g}  ", "dim"), reply or "–"))
    return parts


def draw_replies(state: BuildState) -> RenderableType:
    """Each behavior's reply table: its models' scored replies, the verdict, and greedy
    replies side by side (the lines the build's summary prints)."""
    parts: list[RenderableType] = []
    for task_id, table in state.reply_tables.items():
        parts += [Text("")] if parts else []
        parts.append(_heading(f"replies  {task_id.split(':', 1)[-1]}  (scored by {table.get('scorer')}; "
                              "95% intervals over prompts)"))
        for line in reply_table_lines(table):
            warn = line.startswith("  verdict:") and ("broke" in line or "loses" in line)
            parts.append(Text(line, style="bold yellow" if warn else ""))
    return Group(*parts) if parts else Text("no reply table in this plan (an eval's `score` "
                                            "makes one)", style="dim")


def draw_compose_deploy(state: BuildState) -> RenderableType:
    parts: list[RenderableType] = []
    for task_id, weights in state.weights.items():
        parts += [Text("")] if parts else []
        parts.append(_heading(f"composition {task_id.split(':', 1)[-1]}"))
        table = Table("behavior", "weight", box=None, pad_edge=False)
        for term in weights["terms"]:
            table.add_row(str(term.get("behavior")), f"{term.get('weight', 0):+g}")
        parts.append(table)
        merge = weights.get("merge")
        if merge:
            parts.append(Text(f"merge: {merge if isinstance(merge, str) else json.dumps(merge)}", style="dim"))
    deploys = [t for t in state.tasks.values() if t.kind == "deploy"]
    for task in deploys:
        parts += [Text(""), _heading(f"deploy {task.id.split(':', 1)[-1]}  [{task.status}]")]
        if task.data.get("urls"):
            parts.append(Text(", ".join(task.data["urls"])))
        if task.metrics:
            parts.append(Text(format_metrics(task.metrics, limit=4), style="dim"))
    if state.pushes:
        parts += [Text(""), _heading(f"pushes ({len(state.pushes)})")]
        table = Table("url", "step", "ms", "ok", box=None, pad_edge=False)
        for push in state.pushes[-8:]:
            table.add_row(str(push.get("url", "")), str(push.get("step", "")),
                          f"{push.get('ms', 0):.0f}", "yes" if push.get("ok") else f"no {push.get('error', '')}")
        parts.append(table)
    return Group(*parts) if parts else Text("no composition or deploy in this plan", style="dim")


def draw_errors(state: BuildState) -> RenderableType:
    failed = state.failed
    notes = [t for t in state.tasks.values() if t.note]
    if not failed and not notes and not state.unmet:
        return Text("no errors", style="green")
    parts: list[RenderableType] = []
    for unmet in state.unmet:
        loc = unmet.get("loc")
        where = f"{loc['file']}:{loc['line']}:{loc['column']}: " if loc else ""
        actual = "not measured" if unmet.get("actual") is None else f"measured {unmet['actual']:.4g}"
        parts.append(Text(f"{where}expect {unmet['metric']} {unmet['op']} {unmet['value']:g}: "
                          f"{actual} by {unmet['task']}", style="bold red"))
    for task in failed:
        parts.append(Text(f"✗ {task.id}" + (" (internal error)" if task.internal else ""), style="bold red"))
        parts.append(Text(task.error or "", style="red"))
    for task in notes:
        parts.append(Text(f"! {task.id}: {task.note}", style="yellow"))
    return Group(*parts)


def draw_task_detail(state: BuildState, task_id: str, now: float) -> RenderableType:
    task = state.tasks[task_id]
    facts = Table.grid(padding=(0, 1))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("task", task.id)
    facts.add_row("status", task.status + (f"  {task_seconds(task, now)}" if task_seconds(task, now) else ""))
    facts.add_row("key", task.key)
    facts.add_row("spec", task.where or "–")
    facts.add_row("needs", ", ".join(task.deps) or "–")
    for name, value in task.metrics.items():
        facts.add_row(name, f"{value:.5g}")
    for name, path in task.artifacts.items():
        facts.add_row(name, path)
    if task.log:
        facts.add_row("traceback", task.log)
    parts: list[RenderableType] = [facts]
    if task.error:
        parts += [Text(""), Text(task.error, style="red")]
    if task.note:
        parts += [Text(""), Text(task.note, style="yellow")]
    if task.data:
        parts += [Text(""), _heading("data"), Text(json.dumps(task.data, indent=1, default=str)[:4000])]
    own = [e for e in state.recent if e.get("task") == task_id][-12:]
    if own:
        parts += [Text(""), _heading("recent events")]
        parts += [Text(f"{e['type']}  {summarize(e)}", style="dim") for e in own]
    return Group(*parts)


class TaskDetail(ModalScreen[None]):
    """Everything known about one task; escape closes."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "close")]

    def __init__(self, body: RenderableType):
        super().__init__()
        self.body = body

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static(self.body)
