"""Optimizer state and step time: torch AdamW, the APOLLO reference code, and ours.

    python bench/apollo.py                       hidden 2048, 2 blocks (~100M parameters)
    python bench/apollo.py --hidden 4096 --blocks 4 --rank 256

The "model" is the weight matrices of transformer blocks (q, k, v, o: hidden x hidden;
gate, up: ffn x hidden; down: hidden x ffn) plus a norm vector per block, with fixed
random gradients: an optimizer step does not care where gradients come from, and this
keeps the forward/backward out of the measurement. Each optimizer gets its own copy.
Rounds interleave the optimizers (one step each per round) so that load from other
processes on the machine hits them alike; the figure is the median step.

Baselines, measured in the same run: torch AdamW with foreach (fused on a GPU) and the
reference APOLLO (`apollo-torch`, CC-BY-NC, used here only as a baseline and never
imported by behaviorc). When it is not importable, the bench installs it and
bitsandbytes (which its package imports), without dependencies, into a private folder
under ~/.cache/behaviorc/bench-deps (never into the environment); when that fails it is
skipped with a note.

Targets (issue 8): state on the projected matrices <= 1/4 of AdamW's; step time
<= 1.5x AdamW foreach on CPU (<= 1.0x fused AdamW on a GPU). The headline ratio is
AdamW's step time / ours; its target is 1/1.5 on CPU, 1.0 on a GPU. Also timed, for the
breakdown: APOLLO's r x d by d x n products alone (`ours_products_only`), the part of its
step no arrangement of the rest removes; and the load average while measuring.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from behaviorc.train.apollo import APOLLO  # noqa: E402

DEPS = Path.home() / ".cache" / "behaviorc" / "bench-deps" / "apollo-torch"


def make_params(hidden: int, ffn: int, blocks: int, device: str) -> list[torch.nn.Parameter]:
    # drawn where they live: 822M parameters drawn on a CPU and copied would take longer
    # than the measurement
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,)]
    params = []
    for _ in range(blocks):
        for shape in shapes:
            p = torch.nn.Parameter(torch.randn(*shape, generator=g, device=device) * 0.02)
            p.grad = torch.randn(*shape, generator=g, device=device)
            params.append(p)
    return params


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> int:
    return sum(v.numel() * v.element_size()
               for p in params for v in optimizer.state[p].values() if isinstance(v, torch.Tensor))


def projection_products(params: list[torch.nn.Parameter], rank: int) -> Callable[[], None]:
    """Only the r x d by d x n products an APOLLO step needs (into reused outputs): the
    floor under its step time, timed beside it to show what the rest of the step costs."""
    work = []
    for p in params:
        if APOLLO.is_projected(p, rank):
            oriented = p.grad.T if p.shape[0] > p.shape[1] else p.grad
            work.append((torch.randn(rank, oriented.shape[0], device=p.device), oriented,
                         torch.empty(rank, oriented.shape[1], device=p.device)))

    def run() -> None:
        for projection, grad, out in work:
            torch.mm(projection, grad, out=out)
    return run


def reference_apollo():
    """The apollo-torch optimizer class, or (None, why not)."""
    for attempt in range(2):
        try:
            if DEPS.is_dir() and str(DEPS) not in sys.path:
                sys.path.insert(0, str(DEPS))
            return importlib.import_module("apollo_torch").APOLLOAdamW, ""
        except Exception as err:  # noqa: BLE001 - any import failure means: no baseline
            if attempt == 1:
                return None, f"apollo-torch not importable: {err}"
            done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                   "--target", str(DEPS), "apollo-torch", "bitsandbytes"], capture_output=True, text=True)
            if done.returncode != 0:
                return None, f"apollo-torch did not install: {done.stderr.strip()[-200:]}"
    return None, "unreachable"


def measure(hidden: int, ffn: int, blocks: int, rank: int, rounds: int, device: str,
            reference: bool = True) -> dict[str, float]:
    """Step time and state of each optimizer, measured side by side (printed as a table);
    the figures by name. `reference=False` leaves out the reference APOLLO (which may
    need installing)."""
    on_gpu = device == "cuda"

    def projected(params):
        return [p for p in params if APOLLO.is_projected(p, rank)]

    def reference_optimizer(params):
        matrices = projected(params)
        others = [p for p in params if not APOLLO.is_projected(p, rank)]
        groups = [{"params": others},
                  {"params": matrices, "rank": rank, "proj": "random", "scale_type": "channel",
                   "scale": 1, "update_proj_gap": 200, "proj_type": "std"}]
        return reference_class(groups, lr=1e-4)

    reference_class, note = reference_apollo() if reference else (None, "not asked for")
    contenders = {
        "adamw_fused" if on_gpu else "adamw_foreach":
            lambda ps: torch.optim.AdamW(ps, lr=1e-4, **({"fused": True} if on_gpu else {"foreach": True})),
        "ours": lambda ps: APOLLO(ps, lr=1e-4, rank=rank),
        # for information: torch also has a fused AdamW on CPU, far faster than foreach
        **({} if on_gpu else {"adamw_fused_cpu": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)}),
        "ours_mini": lambda ps: APOLLO.mini(ps, lr=1e-4),
        # for information on a GPU: the per-matrix path that the grouped one replaces there
        **({"ours_per_matrix": lambda ps: APOLLO(ps, lr=1e-4, rank=rank, grouped=False)} if on_gpu else {}),
    }
    if reference_class is not None:
        contenders["reference"] = reference_optimizer
    else:
        print(f"note: reference APOLLO skipped ({note})")

    setups = {}
    for name, make in contenders.items():
        params = make_params(hidden, ffn, blocks, device)
        optimizer = make(params)
        optimizer.step()  # state allocated, first-step work done
        setups[name] = (params, optimizer)
    count = sum(p.numel() for p in setups["ours"][0])
    print(f"{count / 1e6:.1f}M parameters on {device}, rank {rank}, {torch.get_num_threads()} threads")

    # other processes share this machine's cores: say how busy it was while we measured
    load_before = os.getloadavg()[0]
    steps = {name: optimizer.step for name, (_, optimizer) in setups.items()}
    steps["ours_products_only"] = projection_products(make_params(hidden, ffn, blocks, device), rank)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if on_gpu:
                torch.cuda.synchronize()
            began = time.perf_counter()
            step()
            if on_gpu:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - began)

    baseline = next(iter(setups))
    figures: dict[str, float] = {"load_average_1m": round(max(load_before, os.getloadavg()[0]), 2),
                                 "threads": torch.get_num_threads(), "params_m": round(count / 1e6, 1)}
    print(f"{'optimizer':<16}{'step ms':>10}{'state MB':>11}{'state MB (projected)':>23}")
    for name, (params, optimizer) in setups.items():
        ms = statistics.median(times[name]) * 1000
        total = state_bytes(optimizer, params)
        on_projected = state_bytes(optimizer, projected(params))
        figures[f"{name}_step_ms"] = round(ms, 2)
        figures[f"{name}_state_mb"] = round(total / 1e6, 3)
        figures[f"{name}_projected_state_mb"] = round(on_projected / 1e6, 3)
        print(f"{name:<16}{ms:>10.1f}{total / 1e6:>11.1f}{on_projected / 1e6:>23.2f}")

    figures["ours_products_only_step_ms"] = round(statistics.median(times["ours_products_only"]) * 1000, 2)
    print(f"of ours: the projection products alone {figures['ours_products_only_step_ms']:.1f} ms, "
          f"the rest {figures['ours_step_ms'] - figures['ours_products_only_step_ms']:.1f} ms")
    figures["baseline"] = baseline
    figures["time_ratio"] = round(figures[f"{baseline}_step_ms"] / figures["ours_step_ms"], 3)
    figures["mini_time_ratio"] = round(figures[f"{baseline}_step_ms"] / figures["ours_mini_step_ms"], 3)
    state_ratio = figures[f"{baseline}_projected_state_mb"] / figures["ours_projected_state_mb"]
    figures["state_ratio_adamw_over_ours_projected"] = round(state_ratio, 2)
    figures["state_target"] = 4.0
    if "reference_step_ms" in figures:
        figures["reference_over_ours_step"] = round(figures["reference_step_ms"] / figures["ours_step_ms"], 2)
    print(f"AdamW state / ours on projected matrices: {state_ratio:.1f}x (target >= 4x)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's own, every core, which is what "
                             "`behaviorc build` trains with; 1 shows the single-core figure)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = measure(args.hidden, args.ffn, args.blocks, args.rank, args.rounds, device)
    target = 1.0 if device == "cuda" else round(1 / 1.5, 3)
    print(f"{figures['baseline']} step / ours: {figures['time_ratio']:.2f} (target >= {target}); "
          f"load average {figures['load_average_1m']} on {os.cpu_count()} CPUs")
    print(json.dumps({"bench": "apollo", "figures": figures, "headline": {
        "what": f"{figures['baseline']} step time / APOLLO step time (rank {args.rank}, "
                f"{figures['params_m']:.0f}M params, {device}, {torch.get_num_threads()} threads)",
        "ratio": figures["time_ratio"], "target": target}}))


if __name__ == "__main__":
    main()
