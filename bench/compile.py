"""Compile speed: check and plan a generated spec with many behaviors and inline pairs.

    python bench/compile.py                      500 behaviors, 5,000 inline pairs
    python bench/compile.py --behaviors 2000 --pairs 10

The baseline is the issue's budget: 1 s for the default size on this machine. The figure
is the best wall time of --repeat runs of check + lower, every task's content key
included, in this process (the grammar's tables are loaded before timing, and their
load time is printed apart); the first run and the CPU time are printed too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from behaviorc.lang.check import check_file
from behaviorc.lang.parse import parse_text
from behaviorc.pipeline.lower import lower

TARGET_SECONDS = 1.0


def generate(behaviors: int, pairs_per_behavior: int) -> str:
    lines = ['model base = "tiny-gdn"', ""]
    for b in range(behaviors):
        lines.append(f"behavior b{b} {{")
        lines.append("  steer {")
        lines.append(f"    layers {b % 3}..3")
        lines.append(f"    strength {1 + b % 7}.5")
        for p in range(pairs_per_behavior):
            lines.append(f'    pair "Request {b}.{p}: use the tool I named." {{')
            lines.append(f'      positive " I will use the tool you named ({p})."')
            lines.append(f'      negative " I will use another tool instead ({p})."')
            lines.append("    }")
        lines.append("  }")
        lines.append("  train {")
        lines.append(f'    example "Use approach {b}." {{ response " Using approach {b}." }}')
        lines.append(f"    steps {10 + b % 5}")
        lines.append("  }")
        lines.append("}")
        lines.append("")
    terms = " + ".join(f"b{b} * 0.{1 + b % 9}" for b in range(min(behaviors, 50)))
    lines.append(f"compose mix = {terms} {{ merge ties {{ density 0.2 }} }}")
    return "\n".join(lines) + "\n"


def compile_once(path: str) -> tuple[float, float, int]:
    """Wall and CPU seconds of check + lower (every task's content key included)."""
    wall, cpu = time.perf_counter(), time.process_time()
    spec, diagnostics = check_file(path)
    if spec is None:
        raise SystemExit("the generated spec has errors:\n" + "\n".join(d.render() for d in diagnostics))
    plan = lower(spec)
    keys = {task.key for task in plan.tasks}
    return time.perf_counter() - wall, time.process_time() - cpu, len(keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behaviors", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=10, help="inline pairs per behavior")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    text = generate(args.behaviors, args.pairs)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "generated.behavior")
        Path(path).write_text(text)
        start = time.perf_counter()
        parse_text("", "warm-up")  # loads the grammar's tables (cached on disk by lark)
        load_seconds = time.perf_counter() - start
        runs = [compile_once(path) for _ in range(max(1, args.repeat))]
    seconds = min(r[0] for r in runs)
    cpu_seconds = min(r[1] for r in runs)
    tasks = runs[0][2]
    pairs = args.behaviors * args.pairs
    print(f"spec: {args.behaviors} behaviors, {pairs} inline pairs, "
          f"{text.count(chr(10))} lines, {len(text) / 1e6:.2f} MB")
    print(f"grammar load: {load_seconds:.3f} s; first check + plan: {runs[0][0]:.3f} s")
    print(f"check + plan: {seconds:.3f} s wall, {cpu_seconds:.3f} s CPU, best of {len(runs)} "
          f"({tasks} tasks), {seconds / args.behaviors * 1000:.2f} ms per behavior")
    print("(wall time depends on what else runs on the machine; CPU time is this process's)")
    print(f"budget: {TARGET_SECONDS:.1f} s -> {'within' if seconds <= TARGET_SECONDS else 'OVER'} budget")
    print(json.dumps({
        "bench": "compile",
        "figures": {"seconds": round(seconds, 4), "cpu_seconds": round(cpu_seconds, 4),
                    "first_seconds": round(runs[0][0], 4),
                    "grammar_load_seconds": round(load_seconds, 4),
                    "ms_per_behavior": round(seconds / args.behaviors * 1000, 3),
                    "behaviors": args.behaviors, "pairs": pairs, "tasks": tasks,
                    "baseline_seconds": TARGET_SECONDS},
        "headline": {"what": "check + plan of 500 behaviors / 5,000 pairs vs a 1 s budget",
                     "ratio": round(TARGET_SECONDS / seconds, 3), "target": 1.0},
    }))


if __name__ == "__main__":
    main()
