"""Which optimizer carries a distilled behavior: APOLLO, APOLLO-Mini and AdamW side by side.

    python bench/distill.py                      the demo's cheerful pairs, layer 23, defaults
    python bench/distill.py --layer 22 --steps 60
    python bench/distill.py --objective sft      the samples' tokens instead of the teacher's distribution

Each optimizer distils the same behavior in the same way: `specs/demo.behavior` with a
fixed layer, built with `behaviorc build --only train:cheerful` (the build's own train
task: the steered model samples the prompts with the same seeds, the student trains the
same number of steps from the same base weights; only `optimizer` differs). The
steering is extracted once and reused from the build's store. For each: `steered_share`
(the part of the steered margin gain the trained model keeps without steering), the
general NLL change, the capability probe before and after, and the training seconds
(`seconds_train`: the loop alone, sampling and measuring left out), printed side by
side in one run, on this machine.

APOLLO-Mini is rank 1 with one scaling factor per tensor (Zhu et al. 2024, "APOLLO:
SGD-like Memory, AdamW-level Performance"); "Subliminal Learning Is Steering Vector
Distillation" (2026) finds that an adaptive optimizer is needed for a student to pick
up a teacher's steering. The headline is APOLLO's (the default) share over AdamW's:
target >= 0.9, APOLLO carries nearly what AdamW does at its memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("apollo", "apollo_mini", "adamw")
TARGET_RATIO = 0.9

SPEC = """model base = "{model}"
behavior cheerful {{
  steer {{
    layers {layer}
    pairs "data/cheerful_pairs.jsonl"
  }}
  train {{
    distill steering {{ prompts "data/cheerful_prompts.jsonl"  objective {objective} }}
    steps {steps}
    optimizer {optimizer}
  }}
  eval {{
    pairs "data/cheerful_eval.jsonl"
  }}
}}
"""


def distil(folder: Path, model: str, optimizer: str, layer: int, steps: int, objective: str) -> dict[str, float]:
    spec = folder / f"{optimizer}.behavior"
    spec.write_text(SPEC.format(model=model, layer=layer, steps=steps, objective=objective, optimizer=optimizer))
    out = folder / "out"  # one store for all three: the steering is extracted once
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "behaviorc.cli", "build", str(spec), "--out", str(out),
                           "--only", "train:cheerful"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {optimizer} build failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    task = next(t for t in report["tasks"] if t["id"] == "train:cheerful")
    return task["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=23, help="the steered layer (default: the demo's pick)")
    parser.add_argument("--steps", type=int, default=30, help="training steps, the same for each optimizer")
    parser.add_argument("--objective", choices=("kl", "sft"), default="kl")
    parser.add_argument("--model", default="smollm2-135m",
                        help="a built-in or a folder (tiny-dense checks the bench runs, in seconds)")
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "data").symlink_to(ROOT / "specs" / "data")
        for optimizer in OPTIMIZERS:
            m = distil(folder, args.model, optimizer, args.layer, args.steps, args.objective)
            figures[optimizer] = {
                "steered_share": m.get("steered_share", float("nan")),
                "nll_change": m["general_nll_after"] / m["general_nll_before"] - 1,
                "capability_before": m.get("capability_before", float("nan")),
                "capability_after": m.get("capability_after", float("nan")),
                "seconds_train": m["seconds_train"], "loss_last": m["loss_last"]}
            print(f"  {optimizer} done", file=sys.stderr)
    print(f"demo cheerful on {args.model}, layer {args.layer}, {args.steps} steps, objective {args.objective}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'optimizer':<12} {'share kept':>10} {'NLL change':>11} {'capability':>13} {'train s':>8}")
    for name, f in figures.items():
        print(f"{name:<12} {f['steered_share']:>10.2f} {f['nll_change']:>+10.1%} "
              f"{f['capability_before']:>6.2f}->{f['capability_after']:.2f} {f['seconds_train']:>8.1f}")
    ratio = figures["apollo"]["steered_share"] / figures["adamw"]["steered_share"]
    print(json.dumps({"bench": "distill", "figures": figures, "headline": {
        "what": f"steered share kept by APOLLO / by AdamW (demo cheerful on {args.model}, layer {args.layer}, "
                f"{args.steps} steps, objective {args.objective})",
        "ratio": round(ratio, 3), "target": TARGET_RATIO}}))


if __name__ == "__main__":
    main()
