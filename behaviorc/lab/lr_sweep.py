"""Which learning rate suits this behavior?

For each learning rate of a log-spaced grid and each seed: train the behavior as the
spec says at that rate, and measure the gain (the rate or margin after training minus
the base model's) and the cost (general NLL after minus before). The best rate is the
one with the largest mean gain among those whose mean cost stays within
`--max-nll-cost`; one at either end of the grid means the grid should be widened.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.lab import common
from behaviorc.lab.stats import bootstrap_change

NAME = "lr-sweep"
HELP = "a log-spaced learning-rate grid: behavior gain against general-NLL cost"
EPILOG = """\
examples:
  behaviorc experiment lr-sweep specs/testbed_listen.behavior
  behaviorc experiment lr-sweep specs/testbed_listen.behavior --lr-min 1e-5 --lr-max 1e-3 --points 5
  behaviorc experiment lr-sweep specs/testbed_listen.behavior --lrs 3e-5,1e-4,3e-4
"""


def add_options(parser: argparse.ArgumentParser) -> None:
    common.add_common_options(parser)
    parser.add_argument("--lr-min", type=float, default=1e-5, help="lowest learning rate (default 1e-5)")
    parser.add_argument("--lr-max", type=float, default=1e-4, help="highest learning rate (default 1e-4)")
    parser.add_argument("--points", type=int, default=4, help="grid points, log-spaced (default 4)")
    parser.add_argument("--lrs", help="an explicit grid instead, e.g. 1e-5,3e-5,1e-4")
    parser.add_argument("--max-nll-cost", type=float, default=0.1,
                        help="largest acceptable rise of general NLL, nats/token (default 0.1)")


def grid(args: argparse.Namespace) -> list[float]:
    if args.lrs is not None:
        return common.floats(args.lrs, "--lrs", positive=True)
    if not (args.lr_min > 0 and args.lr_max > 0):
        raise BehaviorError(f"learning rates must be greater than 0 (--lr-min {args.lr_min:g}, "
                            f"--lr-max {args.lr_max:g})", hint="a learning rate of 0 trains nothing")
    if args.points < 1:
        raise BehaviorError(f"--points must be at least 1, not {args.points}", hint="the grid would be empty")
    if args.lr_min > args.lr_max:
        raise BehaviorError(f"--lr-min {args.lr_min:g} is above --lr-max {args.lr_max:g}")
    if args.points == 1:
        return [args.lr_min]
    return [float(v) for v in np.geomspace(args.lr_min, args.lr_max, args.points)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_counts(args)
    lrs = grid(args)
    subject = common.load_subject(args.spec, args.behavior, args.score, needs_train=True,
                                  prompts=args.prompts)
    if not subject.general:
        raise BehaviorError(f"behavior `{subject.behavior.name}` has no general texts to measure the NLL "
                            "cost on", subject.behavior.loc,
                            hint='add `general "FILE.jsonl"` to its eval, or a `mix general` to its train')
    common.check_seed_spread(args.seeds, "the general-NLL cost")
    seeds = list(range(args.seeds))
    base = subject.base_points(seeds, args.samples)
    points = {}
    for lr in lrs:
        for s in seeds:
            label = f"lr={lr:.3g},seed={s}"
            train = subject.train_point(label, lr=lr, seed=s, **common.train_changes(args))
            points[lr, s] = subject.measure_point(label, train, s, args.samples)
    done = common.run_points(args.out, [*base.values(), *points.values()], args.spec,
                             subject.plan.spec.sha256, jobs=args.jobs)
    before = {s: done[t.key].metrics for s, t in base.items()}
    after = {k: done[t.key].metrics for k, t in points.items()}
    return analyze(subject, lrs, seeds, args.samples, args.max_nll_cost, before, after)


def analyze(subject: common.Subject, lrs: list[float], seeds: list[int], samples: int, max_cost: float,
            before: dict[int, dict], after: dict[tuple[float, int], dict]) -> dict[str, Any]:
    measure = subject.measure
    totals = [len(subject.users) * samples] * len(seeds) if measure == "rate" else None
    rows = []
    for lr in lrs:
        gain = bootstrap_change([after[lr, s][measure] for s in seeds], [before[s][measure] for s in seeds], totals)
        cost = bootstrap_change([after[lr, s]["general_nll"] for s in seeds],
                                [before[s]["general_nll"] for s in seeds])
        rows.append({"lr": lr, "gain": gain.as_dict(), "nll_cost": cost.as_dict(),
                     "within_cost": cost.mean <= max_cost})
    acceptable = [r for r in rows if r["within_cost"]]
    best = max(acceptable, key=lambda r: r["gain"]["mean"]) if acceptable else None
    edge = None
    if best is not None and len(rows) > 1:
        edge = "low" if best["lr"] == lrs[0] else "high" if best["lr"] == lrs[-1] else None
    return {"experiment": NAME, **common.describe(subject), "lrs": lrs, "seeds": seeds,
            "max_nll_cost": max_cost, "points": rows, "best_lr": best["lr"] if best else None,
            "best_at_edge": edge}


def summary(results: dict[str, Any]) -> str:
    measure = results["measure"]
    lines = [f"# Learning-rate sweep: `{results['behavior']}` on {results['model']}", ""]
    if results["best_lr"] is None:
        lines.append(f"**Answer:** every learning rate raised the general NLL by more than "
                     f"{results['max_nll_cost']} nats/token; none is acceptable.")
    else:
        edge = results["best_at_edge"]
        where = (f"It is at the {edge} edge of the grid: the best rate may lie beyond it; widen the grid."
                 if edge else "It lies inside the grid.")
        lines.append(f"**Answer:** the best learning rate is {results['best_lr']:.3g}: the largest mean gain "
                     f"in {measure} among rates whose general-NLL cost stays within "
                     f"{results['max_nll_cost']} nats/token. {where}")
    lines += ["", common.measure_note(results)]
    lines += ["", f"| LR | gain in {measure} (95% CI) | general-NLL cost (95% CI) | within cost |",
              "|---|---|---|---|"]
    for row in results["points"]:
        lines.append(f"| {row['lr']:.3g} | {common.fmt_interval(row['gain'])} | "
                     f"{common.fmt_interval(row['nll_cost'])} | {'yes' if row['within_cost'] else 'no'} |")
    lines += ["", f"Seeds per point: {len(results['seeds'])}; intervals are 95% bootstrap intervals over "
              "seeds (and sampled replies, for rates).", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = results["points"]
    lrs = [r["lr"] for r in rows]

    def errorbars(ax, key: str, label: str, color: str) -> None:
        means = [r[key]["mean"] for r in rows]
        ax.errorbar(lrs, means, yerr=[[m - r[key]["low"] for m, r in zip(means, rows)],
                                      [r[key]["high"] - m for m, r in zip(means, rows)]],
                    marker="o", capsize=4, label=label, color=color)

    def gain_and_cost(figure) -> None:
        ax = figure.add_subplot()
        errorbars(ax, "gain", f"gain in {results['measure']}", "tab:blue")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"gain in {results['measure']}")
        other = ax.twinx()
        errorbars(other, "nll_cost", "general-NLL cost", "tab:red")
        other.set_ylabel("general-NLL cost (nats/token)", color="tab:red")
        if results["best_lr"] is not None:
            ax.axvline(results["best_lr"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"learning rate: {results['behavior']}")

    def tradeoff(figure) -> None:
        ax = figure.add_subplot()
        costs = [r["nll_cost"]["mean"] for r in rows]
        gains = [r["gain"]["mean"] for r in rows]
        ax.plot(costs, gains, marker="o")
        for lr, x, y in zip(lrs, costs, gains):
            ax.annotate(f"{lr:.2g}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.axvline(results["max_nll_cost"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("general-NLL cost (nats/token)")
        ax.set_ylabel(f"gain in {results['measure']}")
        ax.set_title("gain against cost")
    return [("lr_gain_cost.png", gain_and_cost), ("lr_tradeoff.png", tradeoff)]

