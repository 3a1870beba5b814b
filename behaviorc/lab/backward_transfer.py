"""Does mixing general data into training give positive backward transfer?

Two arms, each over several seeds: the behavior trained with no general mix, and with
`--mix` of each batch drawn from the spec's general texts (its train's `mix general`
texts, else its eval's `general`). Before and after each run: the general NLL on the
eval's general texts (lower is better) and, on the testbed, the accuracy on an unrelated skill
(single-digit sums, greedy). Backward transfer is the change on that old material: a
general NLL that falls or an accuracy that rises is positive transfer, the opposite is
forgetting. Each change has a 95% bootstrap interval over seeds. When the mixed texts
are the measured ones, a falling NLL is memory of them rather than transfer, and the
summary says so.
"""

from __future__ import annotations

import argparse
from typing import Any

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.lab import common
from behaviorc.lab.stats import bootstrap_change

NAME = "backward-transfer"
HELP = "with and without the general mix: general NLL and an unrelated skill before and after"
EPILOG = """\
example:
  behaviorc experiment backward-transfer specs/testbed_listen.behavior --mix 0.25 --seeds 3
"""


def add_options(parser: argparse.ArgumentParser) -> None:
    common.add_common_options(parser)
    parser.add_argument("--mix", type=float, default=0.25,
                        help="share of general data in the mixed arm, 0 < mix < 1 (default 0.25)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_counts(args)
    if not 0 < args.mix < 1:
        raise BehaviorError(f"--mix must be between 0 and 1 (a share of each batch), not {args.mix:g}",
                            hint="e.g. --mix 0.25 for 25% general data")
    subject = common.load_subject(args.spec, args.behavior, args.score, needs_train=True,
                                  prompts=args.prompts)
    if not subject.general:
        raise BehaviorError(f"behavior `{subject.behavior.name}` has no general texts to mix in and measure on",
                            subject.behavior.loc,
                            hint='add `mix general 25% "FILE.jsonl"` to its train, or `general` to its eval')
    common.check_seed_spread(args.seeds, "the general NLL's change")
    seeds = list(range(args.seeds))
    spec_mix = subject.behavior.train.mix
    mixed_texts = spec_mix.texts if spec_mix else subject.general
    arms = {"no mix": None, f"mix {args.mix:g}": ir.Mix(ratio=args.mix, texts=mixed_texts)}
    base = subject.base_points(seeds, args.samples)
    points = {}
    for arm, mix in arms.items():
        for s in seeds:
            train = subject.train_point(f"{arm},seed={s}", mix=mix, seed=s, **common.train_changes(args))
            points[arm, s] = subject.measure_point(f"{arm},seed={s}", train, s, args.samples)
    done = common.run_points(args.out, [*base.values(), *points.values()], args.spec,
                             subject.plan.spec.sha256, jobs=args.jobs)
    return analyze(subject, list(arms), seeds, args.mix, args.samples,
                   {s: done[t.key].metrics for s, t in base.items()},
                   {k: done[t.key].metrics for k, t in points.items()},
                   measured_texts_mixed=len(set(mixed_texts) & set(subject.general)))


def analyze(subject: common.Subject, arms: list[str], seeds: list[int], mix: float, samples: int,
            before: dict[int, dict], after: dict[tuple[str, int], dict],
            measured_texts_mixed: int) -> dict[str, Any]:
    measured = ["general_nll", subject.measure] + (["arithmetic_accuracy"] if subject.arithmetic else [])
    rows = []
    for arm in arms:
        row: dict[str, Any] = {"arm": arm}
        for metric in measured:
            totals = None
            if metric == "rate":
                totals = [len(subject.users) * samples] * len(seeds)
            elif metric == "arithmetic_accuracy":
                totals = [100] * len(seeds)
            change = bootstrap_change([after[arm, s][metric] for s in seeds],
                                      [before[s][metric] for s in seeds], totals)
            row[metric] = {"before": [before[s][metric] for s in seeds],
                           "after": [after[arm, s][metric] for s in seeds], "change": change.as_dict()}
        rows.append(row)
    return {"experiment": NAME, **common.describe(subject), "mix": mix, "seeds": seeds,
            "metrics": measured, "arms": rows, "measured_texts_mixed": measured_texts_mixed}


def _verdict(row: dict[str, Any], metric: str) -> str:
    change = row[metric]["change"]
    better = change["high"] < 0 if metric == "general_nll" else change["low"] > 0
    worse = change["low"] > 0 if metric == "general_nll" else change["high"] < 0
    return "positive transfer" if better else "forgetting" if worse else "no clear change"


def summary(results: dict[str, Any]) -> str:
    lines = [f"# Backward transfer: `{results['behavior']}` on {results['model']}", ""]
    mixed, plain = results["arms"][1], results["arms"][0]
    lines.append(f"**Answer:** with the general mix ({results['mix']:.0%}) the general NLL changed by "
                 f"{common.fmt_interval(mixed['general_nll']['change'])} ({_verdict(mixed, 'general_nll')}); "
                 f"without it by {common.fmt_interval(plain['general_nll']['change'])} "
                 f"({_verdict(plain, 'general_nll')}).")
    if "arithmetic_accuracy" in results["metrics"]:
        lines.append(f"Arithmetic accuracy changed by "
                     f"{common.fmt_interval(mixed['arithmetic_accuracy']['change'])} with the mix "
                     f"({_verdict(mixed, 'arithmetic_accuracy')}) and by "
                     f"{common.fmt_interval(plain['arithmetic_accuracy']['change'])} without "
                     f"({_verdict(plain, 'arithmetic_accuracy')}).")
    if results["measured_texts_mixed"]:
        lines.append(f"Caution: {results['measured_texts_mixed']} of the texts the general NLL is measured on "
                     "were also mixed into training, so the mixed arm's NLL change is partly memory of them, "
                     "not transfer; give the eval held-out `general` texts.")
    lines += ["", common.measure_note(results)]
    lines += ["", "| arm | metric | before (per seed) | after (per seed) | change (95% CI) |", "|---|---|---|---|---|"]
    for row in results["arms"]:
        for metric in results["metrics"]:
            m = row[metric]
            lines.append(f"| {row['arm']} | {metric} | {', '.join(f'{v:.3f}' for v in m['before'])} | "
                         f"{', '.join(f'{v:.3f}' for v in m['after'])} | {common.fmt_interval(m['change'])} |")
    lines += ["", "General NLL is in nats per token (lower is better). Intervals: 95% bootstrap over "
              f"{len(results['seeds'])} seeds (and replies, for rates and accuracy).", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any]) -> list[tuple[str, Any]]:
    def bars(figure) -> None:
        metrics = results["metrics"]
        for i, metric in enumerate(metrics):
            ax = figure.add_subplot(1, len(metrics), i + 1)
            arms = results["arms"]
            means = [a[metric]["change"]["mean"] for a in arms]
            errors = [[m - a[metric]["change"]["low"] for m, a in zip(means, arms)],
                      [a[metric]["change"]["high"] - m for m, a in zip(means, arms)]]
            ax.bar([a["arm"] for a in arms], means, yerr=errors, capsize=4, color=["tab:grey", "tab:blue"])
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"change in {metric}", fontsize=9)
    return [("transfer.png", bars)]
