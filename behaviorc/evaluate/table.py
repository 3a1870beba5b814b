"""The reply table of a behavior: each model's replies scored, side by side, and a verdict.

Rows are the models that answered the held-out prompts (base, prompted: the base model
with the eval's system prompt, steered, trained: steering off). Each row holds its
behavior rate and mean score, distinct-2, repeated 3-gram share and NLL under the base
model, with bootstrap intervals over prompts (measure.replies). The verdict says, in
words, whether steering and training beat, match or lose to the prompt (the baseline
the field measures against), or to the base model when there is no prompt, and whether
each model's text broke (loops, collapsed distinct-2) whatever its rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from behaviorc.core.vocabulary import REPLY_MODELS
from behaviorc.measure.replies import Reply, ReplyStats, summarize, text_broke, versus

SHOWN_PROMPTS = 3  # prompts whose greedy replies the summary prints side by side


@dataclass(frozen=True)
class ReplyTable:
    stats: dict[str, ReplyStats]  # by model, in REPLY_MODELS order
    verdict: tuple[str, ...]  # the comparison and the text's state, in words
    warnings: tuple[str, ...]  # the verdict's reasons not to trust a model

    def metrics(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        for model, stats in self.stats.items():
            figures[f"behavior_rate_{model}"] = stats.rate.mean
            figures[f"behavior_score_{model}"] = stats.score.mean
            figures[f"repeated_share_{model}"] = stats.repeated_share.mean
            if stats.distinct_2.mean == stats.distinct_2.mean:  # NaN: no reply held a bigram
                figures[f"distinct_2_{model}"] = stats.distinct_2.mean
            if stats.nll.mean == stats.nll.mean:
                figures[f"reply_nll_{model}"] = stats.nll.mean
        figures["reply_warnings"] = float(len(self.warnings))
        return figures

    def rows(self) -> list[dict]:
        return [{"model": model, **stats.as_dict()} for model, stats in self.stats.items()]


def reply_table(replies: Mapping[str, Sequence[Reply]], scores: Mapping[str, Sequence[float]]) -> ReplyTable:
    """The table of `replies` by model (keys from REPLY_MODELS, `base` among them), each
    reply scored in `scores`; every model answered the same prompts the same number of
    times."""
    order = [m for m in REPLY_MODELS if m in replies]
    stats = {m: summarize(replies[m], scores[m]) for m in order}
    verdict: list[str] = []
    warnings: list[str] = []
    baseline = "prompted" if "prompted" in stats else "base"
    against = "the prompt" if baseline == "prompted" else "the base model"
    for model in ("steered", "trained"):
        if model not in stats:
            continue
        change = versus(replies[model], scores[model], scores[baseline])
        mine, theirs = stats[model].rate.mean, stats[baseline].rate.mean
        if change.low > 0:
            outcome = "beats"
        elif change.high < 0:
            outcome = "loses to"
            warnings.append(f"the {model} model's behavior rate ({mine:.0%}) is below {against}'s "
                            f"({theirs:.0%})")
        else:
            outcome = "matches"
        verdict.append(f"{model} {outcome} {against}: behavior rate {mine:.0%} vs {theirs:.0%} "
                       f"(difference {change.mean:+.0%}, 95% interval {change.low:+.0%} to "
                       f"{change.high:+.0%})")
    for model in order:
        if model == "base":
            continue
        broke = text_broke(stats[model], stats["base"])
        if broke:
            reasons = "; ".join(broke)
            verdict.append(f"{model}: the text broke: {reasons}")
            warnings.append(f"the {model} model's text broke: {reasons}")
    if not any("broke" in line for line in verdict):
        verdict.append("no model's text broke (no more looping replies than the base model's, "
                       "distinct-2 within 0.05 of it)")
    return ReplyTable(stats, tuple(verdict), tuple(warnings))


def side_by_side(replies: Mapping[str, Sequence[Reply]], count: int = SHOWN_PROMPTS) -> list[dict]:
    """The first `count` prompts with each model's greedy reply: {prompt, base, ...}."""
    order = [m for m in REPLY_MODELS if m in replies]
    prompts = list(dict.fromkeys(r.prompt for r in replies[order[0]]))[:count]
    rows = []
    for prompt in prompts:
        row = {"prompt": prompt}
        for model in order:
            row[model] = next(r.text for r in replies[model] if r.prompt == prompt and not r.sampled).strip()
        rows.append(row)
    return rows
