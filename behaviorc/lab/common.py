"""What every experiment shares: the behavior it studies, its points run through the
build executor, and the folder it writes.

The folder an experiment writes is also a build folder: `.store/` keeps each finished
point (a stopped experiment resumes, a rerun reuses), `events.jsonl` lets `behaviorc dash
DIR` show the training curves while it runs, and when it ends `results.json`, the PNG
plots and `summary.md` are written beside them (each file replaced atomically).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError, did_you_mean
from behaviorc.lab.measure import MeasurePoint
from behaviorc.pipeline.plan import Plan
from behaviorc.core.task import Task, TaskResult
from behaviorc.model.task import ResolveModel
from behaviorc.steer.task import ExtractSteering
from behaviorc.train.task import TrainBehavior

if TYPE_CHECKING:
    from behaviorc.pipeline.parallel import Jobs

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


@dataclass(frozen=True)
class Subject:
    """The behavior an experiment studies, and how it is measured."""

    spec_path: Path
    plan: Plan
    behavior: ir.Behavior
    model: ResolveModel
    score: str  # the testbed scorer that rates its generations; "" when there is none
    users: tuple[str, ...]  # held-out user turns the rate is measured on
    eval_pairs: tuple[ir.Pair, ...]
    general: tuple[str, ...]
    arithmetic: bool  # the model knows the testbed's sums: measure forgetting on them

    @property
    def measure(self) -> str:
        """What a point's behavior is read as: the generation rate, else the margin."""
        return "rate" if self.score else "margin"

    def steering(self) -> ExtractSteering:
        """The plan's extraction task for the behavior's steering vectors."""
        name = self.behavior.name
        task = next((t for t in self.plan.tasks if isinstance(t, ExtractSteering) and t.name == name), None)
        if task is None:
            raise BehaviorError(f"behavior `{name}` has no steer section", self.behavior.loc,
                                hint="add `steer { layers ...  pairs ... }` to it")
        return task

    def base_points(self, seeds: Sequence[int], samples: int) -> dict[int, MeasurePoint]:
        """The base model's point for each seed. A rate is sampled, so each seed samples
        its own; a margin and the general NLL are computed, not sampled, so every seed
        shares one point."""
        if self.measure == "rate":
            return {s: self.measure_point(f"base,seed={s}", None, s, samples) for s in seeds}
        shared = self.measure_point("base", None, 0, samples)
        return {s: shared for s in seeds}

    def measure_point(self, label: str, weights: TrainBehavior | None, seed: int, samples: int) -> MeasurePoint:
        """Everything a training experiment reads off one model: the behavior's rate and
        margin, the general NLL and, on the testbed, arithmetic accuracy. The same for
        every such experiment, so they share the base model's points in one folder."""
        return MeasurePoint(name=f"{self.behavior.name}[{label}]", model=self.model, weights=weights,
                            score=self.score, users=self.users, samples=samples, seed=seed,
                            pairs=self.eval_pairs, general=self.general, arithmetic=self.arithmetic)

    def train_point(self, label: str, **changes: Any) -> TrainBehavior:
        """The behavior's training task with some train settings changed."""
        assert self.behavior.train is not None
        train = self.behavior.train.model_copy(update=changes)
        return TrainBehavior(name=f"{self.behavior.name}[{label}]", model=self.model, train=train,
                             eval_pairs=self.eval_pairs, general=self.general, loc=self.behavior.train.loc)


def load_subject(spec_path: Path, behavior_name: str | None, score: str | None, needs_train: bool,
                 prompts: int | None = None) -> Subject:
    """The behavior to study; `prompts` limits the held-out prompts rated (spread evenly)."""
    from behaviorc.pipeline.commands import load_plan
    from behaviorc.model.testbed import MODEL_NAME
    from behaviorc.lab.scoring import BEHAVIORS

    plan = load_plan(spec_path)
    behaviors = {b.name: b for b in plan.spec.behaviors}
    if not behaviors:
        raise BehaviorError(f"{spec_path} has no behavior to experiment on",
                            hint="an experiment studies one `behavior NAME { ... }` of the spec")
    if behavior_name is None:
        trained = [b for b in plan.spec.behaviors if b.train is not None]
        behavior = (trained or list(plan.spec.behaviors))[0]
    elif behavior_name in behaviors:
        behavior = behaviors[behavior_name]
    else:
        raise BehaviorError(f"no behavior `{behavior_name}` in {spec_path}",
                            hint=did_you_mean(behavior_name, behaviors) or f"behaviors: {', '.join(behaviors)}")
    if needs_train and behavior.train is None:
        raise BehaviorError(f"behavior `{behavior.name}` has no train section, and this experiment trains it",
                            behavior.loc, hint="add `train { examples \"FILE.jsonl\" ... }`")
    if needs_train and not behavior.train.examples:
        raise BehaviorError(f"behavior `{behavior.name}` has no training examples", behavior.train.loc,
                            hint="add `examples \"FILE.jsonl\"` to its train block")
    model = next(t for t in plan.tasks if isinstance(t, ResolveModel) and t.name == behavior.model)
    on_testbed = model.decl.source == MODEL_NAME
    if score is None:
        score = behavior.name if on_testbed and behavior.name in BEHAVIORS else ""
    elif score == "none":
        score = ""
    elif score not in BEHAVIORS:
        raise BehaviorError(f"no scorer `{score}`", hint=did_you_mean(score, BEHAVIORS)
                            or f"scorers: {', '.join(BEHAVIORS)}, or none")
    eval_pairs = behavior.eval.pairs if behavior.eval and behavior.eval.pairs else \
        (behavior.steer.pairs if behavior.steer else ())
    general = (behavior.eval.general if behavior.eval and behavior.eval.general else
               behavior.train.mix.texts if behavior.train and behavior.train.mix else ())
    if not score and not eval_pairs:
        raise BehaviorError(f"behavior `{behavior.name}` has nothing to be measured by: no eval or steer pairs "
                            "for a margin, and no testbed scorer for a generation rate", behavior.loc,
                            hint="add `eval { pairs \"FILE.jsonl\" }`")
    users = spread(BEHAVIORS[score].eval_prompts(), prompts) if score else ()
    return Subject(spec_path, plan, behavior, model, score, users, eval_pairs, general, on_testbed)


def spread(items: Sequence[str], count: int | None) -> tuple[str, ...]:
    """`count` of the items, evenly spaced (all of them for None)."""
    if count is None or count >= len(items):
        return tuple(items)
    step = len(items) / count
    return tuple(items[int(i * step)] for i in range(count))


# ------------------------------------------------------------------ options

def positive_ints(text: str, option: str) -> list[int]:
    values = _items(text, option)
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise BehaviorError(f"{option} takes whole numbers separated by commas, not `{text}`") from None
    if any(n <= 0 for n in numbers):
        raise BehaviorError(f"{option} values must be at least 1, got `{text}`")
    return sorted(set(numbers))


def floats(text: str, option: str, positive: bool = False) -> list[float]:
    values = _items(text, option)
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise BehaviorError(f"{option} takes numbers separated by commas, not `{text}`") from None
    if positive and any(not n > 0 for n in numbers):
        raise BehaviorError(f"{option} values must be greater than 0, got `{text}`",
                            hint="a learning rate of 0 trains nothing")
    return sorted(set(numbers))


def _items(text: str, option: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise BehaviorError(f"{option} is empty", hint=f"give values like `{option} 10,50,500`")
    return values


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """The options of every experiment that trains the behavior."""
    parser.add_argument("spec", type=Path, help="the .behavior file")
    parser.add_argument("--behavior", help="the behavior to study (default: the first that trains)")
    parser.add_argument("--out", type=Path, help="result folder (default: out/experiments/NAME-SPEC)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds per point (default 3; at least 2 where a margin or the general NLL "
                             "is compared: their only spread is between seeds)")
    parser.add_argument("--samples", type=int, default=4,
                        help="sampled replies per held-out prompt for the rate (default 4)")
    parser.add_argument("--score", help="testbed scorer for generation rates: listen, listen-exact, "
                                        "concise, arithmetic or none (default: the behavior's name on "
                                        "the testbed)")
    parser.add_argument("--prompts", type=int, help="held-out prompts to rate on (default: all)")
    parser.add_argument("--steps", type=int, help="training steps per point (default: the spec's)")


def check_counts(args: argparse.Namespace) -> None:
    if args.seeds < 1:
        raise BehaviorError(f"--seeds must be at least 1, not {args.seeds}")
    if args.samples < 1:
        raise BehaviorError(f"--samples must be at least 1, not {args.samples}")
    if args.prompts is not None and args.prompts < 1:
        raise BehaviorError(f"--prompts must be at least 1, not {args.prompts}")
    if getattr(args, "steps", None) is not None and args.steps < 1:
        raise BehaviorError(f"--steps must be at least 1, not {args.steps}")


def check_seed_spread(seeds: int, what: str) -> None:
    """A change that is computed rather than sampled (a margin, the general NLL) varies
    only between training seeds: with one seed its bootstrap interval is a single point,
    and any change at all would read as distinguishable from zero."""
    if seeds < 2:
        raise BehaviorError(f"{what} is computed, not sampled, so its 95% interval comes from the spread "
                            f"between training seeds alone: it needs --seeds 2 or more, not {seeds}",
                            hint="pass --seeds 2 (or more, for a narrower interval)")


def train_changes(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps} if getattr(args, "steps", None) else {}


# ------------------------------------------------------------------ running

# Every point computes with one torch thread, in a worker or in this process: the
# thread count changes how float sums are split, so this way a point's numbers depend on
# its inputs only, not on --jobs or the machine's cores. Tiny models gain little from
# more threads per point; the cores go to points side by side instead.
POINT_THREADS = 1


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Stopped(Exception):
    """The user stopped the experiment; finished points are kept."""


def run_points(out: Path, tasks: Sequence[Task], spec_path: Path, sha256: str,
               jobs: "Jobs") -> dict[str, TaskResult]:
    """Run the tasks (and what they need) through the build executor with a progress
    display, up to `jobs` points at once; results by task key. A failed point stops the
    experiment with its error."""
    from rich.console import Console

    from behaviorc.pipeline.commands import open_out_folder
    from behaviorc.pipeline.executor import Executor, cancel_on_sigint
    from behaviorc.pipeline.progress import TerminalProgress

    cancel = open_out_folder(out, "experiment")
    progress = TerminalProgress(Console(file=sys.stderr), cancel)
    executor = Executor(out, listeners=[progress], spec_path=str(spec_path.resolve()),
                        spec_sha256=sha256, cancel=cancel, jobs=replace(jobs, threads_each=POINT_THREADS))
    with cancel_on_sigint(cancel), progress, _torch_threads(POINT_THREADS):
        outcome = executor.run(list({t.key: t for t in tasks}.values()))  # points shared by seeds once
    if outcome.cancelled:
        raise Stopped()
    if outcome.failed:
        first = outcome.failed[0]
        raise BehaviorError(f"experiment point {first.task.id} failed:\n{first.error}",
                            hint=f"{len(outcome.failed)} point(s) failed; see {outcome.report_path}")
    return {r.task.key: r.result for r in outcome.records if r.result is not None}


def write_results(out: Path, results: dict[str, Any], summary: str,
                  plots: Sequence[tuple[str, Callable[[Any], None]]]) -> list[Path]:
    """results.json, each plot (a function drawing on a matplotlib figure) and summary.md,
    each written beside its final name and renamed."""
    from behaviorc.pipeline import outputs
    from behaviorc.pipeline.plots import write_png
    from behaviorc.core.atomic import write_json_atomic, write_text_atomic

    outputs.record(out, [RESULTS_FILE, SUMMARY_FILE, *(name for name, _ in plots)])
    written = [write_png(out / name, draw) for name, draw in plots]
    results = {**results, "plots": [p.name for p in written]}
    write_json_atomic(out / RESULTS_FILE, results)
    write_text_atomic(out / SUMMARY_FILE, summary)
    return [out / RESULTS_FILE, *written, out / SUMMARY_FILE]


def describe(subject: Subject) -> dict[str, Any]:
    """Who was studied: for results.json."""
    return {"spec": str(subject.spec_path), "behavior": subject.behavior.name,
            "model": subject.model.decl.source, "measure": subject.measure, "score": subject.score,
            "held_out_prompts": len(subject.users), "eval_pairs": len(subject.eval_pairs)}


def measure_note(described: dict[str, Any]) -> str:
    """What a summary's numbers are, in words (from `describe`'s fields): a generation
    rate scored exactly, or, on a model without a scorer for its replies, the margin."""
    model, score = described["model"], described["score"]
    held_out_prompts, eval_pairs = described["held_out_prompts"], described["eval_pairs"]
    if score:
        return (f"**Measure:** the rate: the share of replies sampled (temperature 1) to {held_out_prompts} "
                f"held-out prompts that the testbed's exact scorer `{score}` classes as the behavior.")
    return (f"**Measure:** the margin, not a generation rate: the mean over {eval_pairs} eval pairs of the "
            "log-probability the model gives the positive completion minus the negative one (teacher-forced; "
            f"nothing is sampled). {model} has no exact scorer for its replies (those exist only for the "
            "testbed's fixed reply forms), so whether its sampled text shows the behavior is not measured here.")


def fmt_interval(interval: dict[str, float], digits: int = 3) -> str:
    return (f"{interval['mean']:+.{digits}f} (95% CI {interval['low']:+.{digits}f} .. "
            f"{interval['high']:+.{digits}f})")
