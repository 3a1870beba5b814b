"""Pictures of a build, as PNGs beside its results: `DIR/<name>/loss.png` (training loss
per step, and the margin where it was measured) and `DIR/<name>/margin_per_strength.png`
(a steering verification's sweep: the margin, and the general NLL it cost). Drawn from
the build's events, the same state the dashboard draws its text plots from.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

from behaviorc.pipeline import outputs
from behaviorc.tui.state import BuildState

LOSS_PNG = "loss.png"
SWEEP_PNG = "margin_per_strength.png"


def write_png(target: Path, draw: Callable[[Any], None]) -> Path:
    """Draw on a new matplotlib figure (the Agg backend: no display needed) and write it
    beside `target`, then rename it into place."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from behaviorc.core.atomic import atomic_file

    figure = plt.figure(figsize=(6.4, 4.2))
    try:
        with warnings.catch_warnings():
            # a layout matplotlib cannot tighten is still a readable figure; its notice
            # would only clutter the terminal
            warnings.filterwarnings("ignore", category=UserWarning, module="matplotlib")
            draw(figure)
            figure.tight_layout()
        with atomic_file(target, overwrite=True) as staging:
            figure.savefig(staging, dpi=110, format="png")
    finally:
        plt.close(figure)
    return target


def write_build_plots(out: Path, state: BuildState) -> list[Path]:
    """The PNGs of every training and steering sweep in `state`, under `out/<name>/`."""
    written = []
    for task_id, losses in state.losses.items():
        if len(losses) < 2:
            continue
        margins = state.train_margins.get(task_id, [])
        outputs.record(out, [f"{_name(task_id)}/{LOSS_PNG}"])
        written.append(write_png(out / _name(task_id) / LOSS_PNG,
                                 lambda figure: _draw_loss(figure, task_id, losses, margins)))
    for task_id, sweep in state.sweeps.items():
        points = sorted((float(p["strength"]), float(p["margin"]), p.get("general_nll"))
                        for p in sweep if "strength" in p and "margin" in p)
        if len({strength for strength, _, _ in points}) < 2:
            continue  # one strength is a point, not a curve
        outputs.record(out, [f"{_name(task_id)}/{SWEEP_PNG}"])
        written.append(write_png(out / _name(task_id) / SWEEP_PNG,
                                 lambda figure: _draw_sweep(figure, task_id, points)))
    return written


def _name(task_id: str) -> str:
    return task_id.split(":", 1)[-1]


def _draw_loss(figure: Any, task_id: str, losses: list[tuple[int, float]],
               margins: list[tuple[int, float]]) -> None:
    axes = figure.add_subplot()
    axes.plot([s for s, _ in losses], [l for _, l in losses], color="tab:blue", label="loss")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss", color="tab:blue")
    axes.set_title(f"{task_id}: loss per step")
    if margins:
        other = axes.twinx()
        other.plot([s for s, _ in margins], [m for _, m in margins], "o-", color="tab:orange")
        other.set_ylabel("margin (steering off)", color="tab:orange")


def _draw_sweep(figure: Any, task_id: str, points: list[tuple[float, float, Any]]) -> None:
    axes = figure.add_subplot()
    axes.plot([s for s, _, _ in points], [m for _, m, _ in points], "o-", color="tab:blue")
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.set_xlabel("strength")
    axes.set_ylabel("margin (held-out pairs)", color="tab:blue")
    axes.set_title(f"{task_id}: margin per strength")
    costs = [(s, n) for s, _, n in points if n is not None]
    if len(costs) >= 2:
        other = axes.twinx()
        other.plot([s for s, _ in costs], [n for _, n in costs], "s--", color="tab:red")
        other.set_ylabel("general NLL", color="tab:red")
