"""How many examples make a measurable behavioral change?

For each N of the grid and each seed: train the behavior on N of its examples (a
seeded draw) with everything else as the spec says, then measure it on held-out prompts.
The change is the trained rate (or margin) minus the base model's under the same
sampling seed; its 95% bootstrap interval resamples seeds and replies. The answer is the
smallest N whose interval excludes zero.
"""

from __future__ import annotations

import argparse
import math
import random
from typing import Any

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.lab import common
from behaviorc.lab.stats import bootstrap_change

NAME = "sample-efficiency"
HELP = "train on N examples for N over a grid: the smallest N that changes the behavior"
EPILOG = """\
example:
  behaviorc experiment sample-efficiency specs/testbed_listen.behavior --grid 10,50,500 --seeds 3
"""


def add_options(parser: argparse.ArgumentParser) -> None:
    common.add_common_options(parser)
    parser.add_argument("--grid", help="example counts (default: the behavior's example count divided by "
                                       "50 and by 10, rounded up, and all of them: 10,50,500 for 500 "
                                       "examples, 1,2,14 for 14)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_counts(args)
    subject = common.load_subject(args.spec, args.behavior, args.score, needs_train=True,
                                  prompts=args.prompts)
    if subject.measure == "margin":
        common.check_seed_spread(args.seeds, "the margin")
    examples = subject.behavior.train.examples
    grid = common.positive_ints(args.grid, "--grid") if args.grid is not None else default_grid(len(examples))
    if grid[-1] > len(examples):
        raise BehaviorError(f"--grid asks for {grid[-1]} examples, behavior `{subject.behavior.name}` "
                            f"has {len(examples)}", subject.behavior.train.loc,
                            hint=f"use N up to {len(examples)}, or add examples")
    seeds = range(args.seeds)
    base = subject.base_points(seeds, args.samples)
    points = {}
    for n in grid:
        for s in seeds:
            chosen = tuple(random.Random(s).sample(examples, n))
            train = subject.train_point(f"n={n},seed={s}", examples=chosen, seed=s,
                                        **common.train_changes(args))
            points[n, s] = subject.measure_point(f"n={n},seed={s}", train, s, args.samples)
    done = common.run_points(args.out, [*base.values(), *points.values()], args.spec,
                             subject.plan.spec.sha256, jobs=args.jobs)
    return analyze(subject, grid, list(seeds), args.samples,
                   {s: done[t.key].metrics for s, t in base.items()},
                   {k: done[t.key].metrics for k, t in points.items()})


def default_grid(examples: int) -> list[int]:
    """A small, a middle and the full share of the examples, spaced roughly tenfold."""
    return sorted({math.ceil(examples / 50), math.ceil(examples / 10), examples})


def analyze(subject: common.Subject, grid: list[int], seeds: list[int], samples: int,
            base: dict[int, dict], points: dict[tuple[int, int], dict]) -> dict[str, Any]:
    measure = subject.measure
    totals = [len(subject.users) * samples] * len(seeds) if measure == "rate" else None
    before = [base[s][measure] for s in seeds]
    rows = []
    for n in grid:
        after = [points[n, s][measure] for s in seeds]
        change = bootstrap_change(after, before, totals)
        rows.append({"n": n, "after": after, "change": change.as_dict(),
                     "distinguishable": change.excludes_zero,
                     "margin_after": [points[n, s].get("margin") for s in seeds]})
    smallest = next((r["n"] for r in rows if r["distinguishable"]), None)
    return {"experiment": NAME, **common.describe(subject), "grid": grid, "seeds": seeds,
            "before": before, "points": rows, "smallest_n": smallest}


def summary(results: dict[str, Any]) -> str:
    measure = results["measure"]
    lines = [f"# Sample efficiency: `{results['behavior']}` on {results['model']}", ""]
    if results["smallest_n"] is None:
        lines.append(f"**Answer:** no N in {results['grid']} changed the {measure} distinguishably "
                     "from zero (every 95% interval includes 0).")
    else:
        count = "1 example is" if results["smallest_n"] == 1 else f"{results['smallest_n']} examples are"
        lines.append(f"**Answer:** {count} the fewest in the grid whose "
                     f"change in {measure} is distinguishable from zero (its 95% bootstrap interval "
                     "excludes 0).")
        if results["smallest_n"] == results["grid"][0] > 1:
            lines.append(f"That is the grid's smallest N: fewer may do; try `--grid` below "
                         f"{results['smallest_n']}.")
    lines += ["", common.measure_note(results)]
    lines += ["", f"Base {measure} per seed: " + ", ".join(f"{v:.3f}" for v in results["before"]), "",
              f"| N | {measure} after (per seed) | change, mean and 95% CI | distinguishable |",
              "|---|---|---|---|"]
    for row in results["points"]:
        lines.append(f"| {row['n']} | {', '.join(f'{v:.3f}' for v in row['after'])} | "
                     f"{common.fmt_interval(row['change'])} | {'yes' if row['distinguishable'] else 'no'} |")
    paired = ("the base model sampled under the same seed" if measure == "rate" else
              "the base model's margin (computed once: nothing is sampled)")
    lines += ["", f"Seeds: {len(results['seeds'])}. The interval resamples seeds and, for rates, the "
              f"sampled replies (binomially). The change pairs each trained point with {paired}.", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any]) -> list[tuple[str, Any]]:
    def change(figure) -> None:
        ax = figure.add_subplot()
        rows = results["points"]
        ns = [r["n"] for r in rows]
        means = [r["change"]["mean"] for r in rows]
        low = [r["change"]["mean"] - r["change"]["low"] for r in rows]
        high = [r["change"]["high"] - r["change"]["mean"] for r in rows]
        ax.errorbar(ns, means, yerr=[low, high], marker="o", capsize=4)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training examples N")
        ax.set_ylabel(f"change in {results['measure']} (95% CI)")
        ax.set_title(f"sample efficiency: {results['behavior']}")
    return [("change_vs_n.png", change)]
