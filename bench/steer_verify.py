"""What a steering verification costs, part by part, on smollm2-135m (the demo's pairs).

The demo's cheerful pairs (specs/demo.behavior) are extracted once at a fixed layer (not
timed). Then, on the held-out pairs, with the vectors at the demo's strength, each part
of a sweep point is timed alone:

  margins         per-pair margins (what a verification cannot do without)
  general_nll     the general-text NLL
  capability_all  the whole 44-question capability probe (what every point ran before)
  capability      the default probe (every other question; now only steering off and
                  the strength used)
  replies_3       greedy replies to 3 prompts (before), replies to 8 (now), one batched call
  projection      reading the replies back for the projection score

and then as a build runs them:

  base            steer.verify.measure_base: steering off, the probe included (a task of
                  its own, cached across strengths, layers and methods)
  verify          steer.verify.verify with that base: the default sweep (or --sweep),
                  the probe at the strength used, the random control: what a change of
                  strength reruns

Before this split a change of strength reran steering off and the strength, each with
every part and the whole probe, and the control's margins; `before_estimate` is that
sum from the parts timed in this run (the old code no longer exists to time as a
whole). The headline: before_estimate / verify (above 1: a strength change costs less
than it did), beside the margins alone.

  nice -n 5 python bench/steer_verify.py                  # ~5-10 minutes on one busy CPU thread
  python bench/steer_verify.py --sweep 1,2,4 --layer 23
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from behaviorc.engine.embedded import EmbeddedEngine  # noqa: E402
from behaviorc.engine.protocol import steered  # noqa: E402
from behaviorc.lang.check import load_spec  # noqa: E402
from behaviorc.measure.capability import capability_accuracy, default_questions, probe_questions  # noqa: E402
from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS  # noqa: E402
from behaviorc.measure.margin import per_pair_margins  # noqa: E402
from behaviorc.measure.nll import general_nll  # noqa: E402
from behaviorc.measure.projection import projection_score  # noqa: E402
from behaviorc.measure.replies import sample_replies, reply_prompts  # noqa: E402
from behaviorc.model.builtin import ensure_builtin  # noqa: E402
from behaviorc.model.loading import quiet_transformers  # noqa: E402
from behaviorc.steer.extract import extract  # noqa: E402
from behaviorc.steer import verify as verification  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "specs" / "demo.behavior"
TARGET_RATIO = 1.5


def timed(what: Callable[[], object]) -> tuple[float, object]:
    began = time.perf_counter()
    value = what()
    return time.perf_counter() - began, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=23, help="the layer to steer (the demo's choice)")
    parser.add_argument("--strength", type=float, default=2.0)
    parser.add_argument("--sweep", default="", help="comma-separated sweep strengths (default: steer.verify's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    behavior = load_spec(str(SPEC)).behavior("cheerful")
    held_out = behavior.eval.pairs
    engine = EmbeddedEngine.load(ensure_builtin("smollm2-135m"), name="smollm2-135m")
    vectors = extract(engine, behavior.steer.pairs, [args.layer]).vectors
    prompts = reply_prompts(held_out, verification.SAMPLE_PROMPTS)
    parts: dict[str, float] = {}
    with steered(engine, vectors.directions, args.strength):
        parts["margins"], _ = timed(lambda: per_pair_margins(engine, held_out))
        parts["general_nll"], _ = timed(lambda: general_nll(engine, DEFAULT_GENERAL_TEXTS))
        parts["capability_all"], _ = timed(lambda: capability_accuracy(engine, probe_questions()))
        parts["capability"], _ = timed(lambda: capability_accuracy(engine))
        parts["replies_3"], _ = timed(lambda: sample_replies(engine, prompts[:3], verification.SAMPLE_TOKENS))
        parts["replies"], replies = timed(lambda: sample_replies(engine, prompts, verification.SAMPLE_TOKENS))
    parts["projection"], _ = timed(lambda: projection_score(engine, vectors.directions, prompts, replies))
    sweep = tuple(float(s) for s in args.sweep.split(",") if s)
    base_s, base = timed(lambda: verification.measure_base(engine, held_out, DEFAULT_GENERAL_TEXTS))
    verify_s, result = timed(lambda: verification.verify(
        engine, vectors, args.strength, held_out, DEFAULT_GENERAL_TEXTS, sweep, base=base))
    point_before = (parts["margins"] + parts["general_nll"] + parts["capability_all"]
                    + parts["replies_3"] + parts["projection"])
    before_estimate = 2 * point_before + parts["margins"]
    figures = {"parts_s": {k: round(v, 2) for k, v in parts.items()},
               "base_s": round(base_s, 2), "verify_s": round(verify_s, 2),
               "before_estimate_s": round(before_estimate, 2),
               "strengths": [p.strength for p in result.sweep],
               "margin_before": result.before.margin, "margin_steered": result.steered.margin,
               "held_out_pairs": len(held_out), "reply_prompts": len(prompts),
               "capability_questions": len(default_questions()),
               "capability_questions_before": len(probe_questions())}
    for name, seconds in figures["parts_s"].items():
        print(f"{name:>16}  {seconds:7.2f} s")
    print(f"{'base':>16}  {base_s:7.2f} s  (steering off, cached by a build)")
    print(f"{'verify':>16}  {verify_s:7.2f} s  (strength {args.strength:g}, sweep "
          f"{[p.strength for p in result.sweep]}: what a strength change reruns)")
    print(f"{'before':>16}  {before_estimate:7.2f} s  (estimated: off and strength {args.strength:g} "
          "with every part and the whole probe, and the control)")
    print(json.dumps({
        "bench": "steer_verify",
        "figures": figures,
        "headline": {
            "what": "smollm2-135m, demo pairs, a change of strength: the verification before "
                    "(estimated from its parts) / now (base cached, default sweep, probe at the "
                    f"strength used); margins alone {parts['margins']:.1f} s",
            "ratio": before_estimate / verify_s,
            "target": TARGET_RATIO,
        },
    }))


if __name__ == "__main__":
    main()
