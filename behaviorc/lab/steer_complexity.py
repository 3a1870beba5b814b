"""Does steering work for complex patterns, or only for simple features?

Two behaviors of the spec, each with a steer section: a simple feature (on the testbed,
`concise`: the reply's form is fixed by its first word) and a multi-token pattern (on the
testbed, `listen`: following means repeating the user's two-word tool name exactly).
Each is steered by its own extracted vector across a grid of strengths and measured as a
margin on its eval pairs, as the rate of sampled generations that show it (several
sampling seeds), and by the general-NLL cost. The answer compares the largest rate gain
each reaches within the NLL budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.lab import common
from behaviorc.lab.stats import bootstrap_change
from behaviorc.lab.measure import MeasurePoint

NAME = "steer-complexity"
DEFAULT_SEEDS = 3
HELP = "steering a simple feature and a multi-token pattern across strengths"
EPILOG = """\
example:
  behaviorc experiment steer-complexity specs/testbed_listen.behavior --simple concise --complex listen \\
      --strengths 0,0.5,1,2
"""


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="the .behavior file")
    parser.add_argument("--simple", default="concise", help="the simple-feature behavior (default concise)")
    parser.add_argument("--complex", default="listen", help="the multi-token behavior (default listen)")
    parser.add_argument("--strengths", default="0,0.25,0.5,1,2",
                        help="steering strengths (default 0,0.25,0.5,1,2)")
    parser.add_argument("--max-nll-cost", type=float, default=0.5,
                        help="largest acceptable rise of general NLL, nats/token (default 0.5)")
    parser.add_argument("--out", type=Path, help="result folder")
    parser.add_argument("--seeds", type=int, default=None,
                        help="sampling seeds per strength (default 3; only a model with a scorer "
                             "for its replies samples anything)")
    parser.add_argument("--samples", type=int, default=4, help="sampled replies per prompt (default 4)")
    parser.add_argument("--prompts", type=int, help="held-out prompts to rate on (default: all)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    seeds_given = args.seeds is not None
    args.seeds = args.seeds if seeds_given else DEFAULT_SEEDS
    common.check_counts(args)
    strengths = common.floats(args.strengths, "--strengths")
    if 0.0 not in strengths:
        strengths = [0.0, *strengths]  # the unsteered reference every change is measured from
    if args.simple == args.complex:
        raise BehaviorError(f"--simple and --complex both name `{args.simple}`: compare two behaviors")
    subjects = {role: common.load_subject(args.spec, name, None, needs_train=False,
                                                 prompts=args.prompts)
                for role, name in (("simple", args.simple), ("complex", args.complex))}
    seeds = list(range(args.seeds))
    tasks: dict[tuple[str, float, int | None], MeasurePoint] = {}
    for role, subject in subjects.items():
        if not subject.general:
            raise BehaviorError(f"behavior `{subject.behavior.name}` has no general texts for the NLL cost",
                                subject.behavior.loc, hint='add `general "FILE.jsonl"` to its eval')
        steering = subject.steering()
        name = subject.behavior.name
        for strength in strengths:
            tasks[role, strength, None] = MeasurePoint(
                name=f"{name}[strength={strength:g}]", model=subject.model, steering=steering,
                strength=strength, pairs=subject.eval_pairs, general=subject.general)
            if subject.score:
                for s in seeds:
                    tasks[role, strength, s] = MeasurePoint(
                        name=f"{name}[strength={strength:g},seed={s}]", model=subject.model,
                        steering=steering, strength=strength, score=subject.score, users=subject.users,
                        samples=args.samples, seed=s)
    notes = []
    if not any(subject.score for subject in subjects.values()):
        model = subjects["simple"].model.decl.source
        notes.append(f"Nothing is sampled here ({model} has no scorer for its replies): each point's margin "
                     "and general NLL are computed exactly, so "
                     + ("--seeds and --samples changed nothing" if seeds_given else "there are no seeds")
                     + " and no point has an interval.")
        if seeds_given:
            print(f"behaviorc: warning: {notes[-1]}", file=sys.stderr)
    spec_hash = subjects["simple"].plan.spec.sha256
    done = common.run_points(args.out, list(tasks.values()), args.spec, spec_hash, jobs=args.jobs)
    metrics = {key: done[task.key].metrics for key, task in tasks.items()}
    return {**analyze(subjects, strengths, seeds, args.samples, args.max_nll_cost, metrics), "notes": notes}


def analyze(subjects: dict[str, common.Subject], strengths: list[float], seeds: list[int], samples: int,
            max_cost: float, metrics: dict) -> dict[str, Any]:
    behaviors = []
    for role, subject in subjects.items():
        rows = []
        reference = metrics[role, 0.0, None]
        for strength in strengths:
            point = metrics[role, strength, None]
            row: dict[str, Any] = {"strength": strength, "margin": point["margin"],
                                   "general_nll": point["general_nll"],
                                   "nll_cost": point["general_nll"] - reference["general_nll"]}
            if subject.score:
                rates = [metrics[role, strength, s]["rate"] for s in seeds]
                change = bootstrap_change(rates, [metrics[role, 0.0, s]["rate"] for s in seeds],
                                          [len(subject.users) * samples] * len(seeds))
                row.update(rates=rates, rate=sum(rates) / len(rates), rate_change=change.as_dict(),
                           malformed=sum(metrics[role, strength, s]["malformed"] for s in seeds) / len(seeds))
            rows.append(row)
        within = [r for r in rows if r["nll_cost"] <= max_cost and r["strength"] != 0]
        key = (lambda r: r["rate_change"]["mean"]) if subject.score else (lambda r: r["margin"])
        best = max(within, key=key) if within else None
        behaviors.append({**common.describe(subject), "role": role, "points": rows,
                          "best_strength": best["strength"] if best else None})
    return {"experiment": NAME, "spec": str(subjects["simple"].spec_path),
            "model": subjects["simple"].model.decl.source, "strengths": strengths, "seeds": seeds,
            "max_nll_cost": max_cost, "behaviors": behaviors}


def _best(entry: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in entry["points"] if r["strength"] == entry["best_strength"]), None)


def _describe(entry: dict[str, Any]) -> str:
    best = _best(entry)
    if best is None:
        return f"`{entry['behavior']}`: no strength stayed within the NLL budget"
    text = (f"`{entry['behavior']}` at strength {best['strength']:g}: margin {best['margin']:+.3f} "
            f"(unsteered {entry['points'][0]['margin']:+.3f}), NLL cost {best['nll_cost']:+.3f}")
    if "rate_change" in best:
        verdict = "a real change" if best["rate_change"]["low"] > 0 else "not distinguishable from zero"
        text += f", generation rate change {common.fmt_interval(best['rate_change'])} ({verdict})"
    return text


def summary(results: dict[str, Any]) -> str:
    simple, complex_ = results["behaviors"]
    lines = [f"# Steering complexity on {results['model']}", ""]

    def works(entry) -> bool:
        best = _best(entry)
        return best is not None and ("rate_change" not in best or best["rate_change"]["low"] > 0) \
            and best["margin"] > entry["points"][0]["margin"]

    answer = {(True, True): "steering works for both the simple feature and the multi-token pattern",
              (True, False): "steering works for the simple feature but not for the multi-token pattern",
              (False, True): "steering works for the multi-token pattern but not for the simple feature",
              (False, False): "steering moved neither behavior measurably"}[works(simple), works(complex_)]
    nonzero = [s for s in results["strengths"] if s != 0]
    if len(nonzero) < 2:
        lines += [f"**The data cannot support a conclusion:** one nonzero strength ({', '.join(f'{s:g}' for s in nonzero)}) "
                  "was measured, so a difference from strength 0 may belong to that strength alone, not to "
                  "steering; measure several (e.g. `--strengths 0,0.5,1,2`). What it showed: "
                  f"{answer}.", ""]
    else:
        lines += [f"**Answer:** {answer} (within a general-NLL cost of {results['max_nll_cost']} nats/token).", ""]
    lines += [f"- note: {note}" for note in results.get("notes", [])]
    lines += [
              f"- simple: {_describe(simple)}", f"- multi-token: {_describe(complex_)}", ""]
    for entry in results["behaviors"]:
        lines += [f"## {entry['role']}: `{entry['behavior']}`", "",
                  common.measure_note(entry), "",
                  "| strength | margin | rate (mean of seeds) | rate change (95% CI) | NLL cost |", "|---|---|---|---|---|"]
        for row in entry["points"]:
            rate = f"{row['rate']:.3f}" if "rate" in row else "-"
            change = common.fmt_interval(row["rate_change"]) if "rate_change" in row else "-"
            lines.append(f"| {row['strength']:g} | {row['margin']:+.3f} | {rate} | {change} | {row['nll_cost']:+.3f} |")
        lines.append("")
    if any(entry["score"] for entry in results["behaviors"]):
        lines += [f"Rates: {len(results['seeds'])} sampling seeds; intervals are 95% bootstrap intervals over "
                  "seeds and replies, relative to strength 0.", ""]
    else:
        lines += ["Margins are computed on the eval pairs, not sampled, so they carry no interval: steering "
                  "\"works\" here when the margin at the chosen strength is above the unsteered one.", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any]) -> list[tuple[str, Any]]:
    def panel(figure, key: str, label: str) -> None:
        ax = figure.add_subplot()
        for entry in results["behaviors"]:
            rows = [r for r in entry["points"] if key in r]
            if rows:
                ax.plot([r["strength"] for r in rows], [r[key] for r in rows], marker="o",
                        label=f"{entry['role']}: {entry['behavior']}")
        ax.set_xlabel("steering strength")
        ax.set_ylabel(label)
        ax.legend()

    panels = [("steer_margin.png", "margin", "margin (log-prob, positive - negative)"),
              ("steer_rate.png", "rate", "generation rate"),
              ("steer_nll_cost.png", "nll_cost", "general-NLL cost (nats/token)")]
    # a quantity nothing measured (the rate, where no reply is scored) gets no empty picture
    return [(name, lambda f, key=key, label=label: panel(f, key, label)) for name, key, label in panels
            if any(key in r for entry in results["behaviors"] for r in entry["points"])]
