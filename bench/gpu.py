"""Every GPU figure in one run, each beside its baseline (an H100 or H200).

    python bench/gpu.py                  all of it, about two minutes on an H200 (plus the
                                         serving figures where vLLM is installed)
    python bench/gpu.py --rounds 20      steadier medians
    python bench/gpu.py --smoke          the same code at toy sizes on any device, to check
                                         the script itself (its figures mean nothing)

Each figure comes from the measuring function of its own bench, which times the
baseline and ours side by side, interleaved round by round:

  optimizer step, 822M parameters, fp32 (bench/apollo.py --hidden 2048 --ffn 5632
      --blocks 16): fused AdamW against APOLLO r256 and APOLLO-Mini (the grouped path,
      CUDA's default); the per-matrix path they replace is timed too, for information
  context-frozen step, bf16, 4 x 1024 tokens, 75% context (bench/frozen_context.py):
      a dense Qwen3 of 58.7M (hidden 1024, 8 layers) and a Qwen3-Next of 80M (GDN),
      the full-sequence step against the context recomputed each step and reused
  hidden states at the middle layer, 983M GDN, bf16 (bench/extract.py --large): a full
      forward with output_hidden_states against the engine's early exit
  served throughput (bench/serve.py, `--serve-model`, only where vLLM is installed):
      `behaviorc serve` compiled, its steering idle, steering every request with one
      vector and with 16 different ones, against a plain `vllm serve` of the same folder

Targets: APOLLO r256 and APOLLO-Mini steps no slower than fused AdamW's (ratio >= 1,
stretch 1/0.7); context-frozen recompute >= 1.5x and reuse >= 2.5x the full step, dense
and GDN; early exit >= 1.8x; served throughput >= 0.97x plain vLLM's. The headline is APOLLO r256's ratio. Without CUDA it stops
at once with a message (the CPU figures come from the three benches themselves).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
TARGETS = {"apollo": 1.0, "apollo_mini": 1.0, "recompute": 1.5, "reuse": 2.5, "extract": 1.8, "serve": 0.97}
# (hidden, ffn, blocks, rank) of the optimizer step; (hidden, layers, tokens, batch) of the
# context-frozen step; the extraction model's size is bench/extract.py's LARGE
SIZES = {"optimizer": (2048, 5632, 16, 256), "frozen": (1024, 8, 1024, 4)}
SMOKE_SIZES = {"optimizer": (256, 512, 2, 32), "frozen": (128, 4, 64, 2)}
SMOKE_EXTRACT = dict(hidden=128, layers=4, intermediate=256, heads=2, kv_heads=1, key_heads=2,
                     value_heads=2, linear_head_dim=32, pairs=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per measurement (median)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on any device: checks the script, measures nothing")
    parser.add_argument("--serve-model", default="smollm2-135m",
                        help="the model served for the serving figures: a built-in or a folder "
                             "(default smollm2-135m)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit(f"bench/gpu.py: error: no CUDA device: torch {torch.__version__} sees none "
                 f"(torch.cuda.is_available() is False). These figures are GPU figures; on a CPU "
                 f"run bench/apollo.py, bench/frozen_context.py and bench/extract.py.")

    sys.path[:0] = [str(BENCH.parent), str(BENCH)]
    import apollo as apollo_bench
    import extract as extract_bench
    import frozen_context as frozen_bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    sizes, large = (SMOKE_SIZES, SMOKE_EXTRACT) if args.smoke else (SIZES, extract_bench.LARGE)
    print(f"device: {name}, torch {torch.__version__}{', smoke sizes' if args.smoke else ''}", flush=True)
    figures: dict[str, Any] = {"device": name, "torch": torch.__version__, "smoke": args.smoke}
    rows: list[tuple[str, str, str, float, float]] = []

    print("\n== optimizer step, fp32 ==", flush=True)
    step = apollo_bench.measure(*sizes["optimizer"], args.rounds, device, reference=False)
    figures["apollo"] = step
    adamw = f"{step['baseline']} {step[step['baseline'] + '_step_ms']:.1f} ms"
    rank = sizes["optimizer"][3]
    rows.append((f"optimizer step, {step['params_m']:.0f}M, APOLLO r{rank}", adamw,
                 f"{step['ours_step_ms']:.1f} ms", step["time_ratio"], TARGETS["apollo"]))
    rows.append((f"optimizer step, {step['params_m']:.0f}M, APOLLO-Mini", adamw,
                 f"{step['ours_mini_step_ms']:.1f} ms", step["mini_time_ratio"], TARGETS["apollo_mini"]))
    _release(device)

    for arch in ("dense", "gdn"):
        print(f"\n== context-frozen step, {arch}, bf16 ==", flush=True)
        hidden, layers, tokens, batch = sizes["frozen"]
        frozen = frozen_bench.measure(arch, hidden, layers, tokens, batch, 0.75, args.rounds, device, torch.bfloat16)
        figures[f"frozen_{arch}"] = frozen
        full = f"full {frozen['full_step_ms']:.1f} ms"
        for way in ("recompute", "reuse"):
            rows.append((f"context-frozen {way}, {arch} {frozen['params_m']:.0f}M", full,
                         f"{frozen[f'{way}_step_ms']:.1f} ms", frozen[f"{way}_ratio"], TARGETS[way]))
        _release(device)

    print("\n== hidden states at the middle layer, bf16 ==", flush=True)
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.model.builtin import ensure_builtin
    from behaviorc.model.loading import load_model

    torch.set_grad_enabled(False)
    _, tokenizer = load_model(ensure_builtin("tiny-gdn"), dtype="bfloat16", device="cpu")
    model = extract_bench.random_qwen3_next(large, len(tokenizer), "bfloat16", device)
    reading = extract_bench.measure("gdn-1b", EmbeddedEngine(model, tokenizer, batch_size=16),
                                    large["pairs"], max(args.rounds // 2, 3))
    figures["extract"] = reading
    rows.append((f"extraction, {reading['params_m']:.0f}M GDN", f"full forward {reading['full_forward_tok_s'] / 1e3:.1f}k tok/s",
                 f"early exit {reading['early_exit_tok_s'] / 1e3:.1f}k tok/s", reading["ratio"], TARGETS["extract"]))

    print("\n== served throughput ==", flush=True)
    skipped = ("smoke sizes: `python bench/serve.py --model tiny-gdn` checks that bench" if args.smoke
               else "vLLM is not installed here" if importlib.util.find_spec("vllm") is None else "")
    if skipped:
        print(f"skipped: {skipped}", flush=True)
        figures["serve"] = f"skipped: {skipped}"
    else:
        import serve as serve_bench

        served = serve_bench.measure(args.serve_model, rounds=max(args.rounds // 5, 1))
        figures["serve"] = served
        plain = f"vllm {served['tok_s']['vllm']:.0f} tok/s"
        for run in ("behaviorc idle", "behaviorc one vector", f"behaviorc {serve_bench.VECTORS} vectors"):
            rows.append((f"served, {run.removeprefix('behaviorc ')}", plain,
                         f"{served['tok_s'][run]:.0f} tok/s", served["over_plain"][run], TARGETS["serve"]))

    print(f"\n{'work':<42}{'baseline':<26}{'behaviorc':<26}{'ratio':>7}{'target':>8}")
    for work, baseline, ours, ratio, target in rows:
        mark = "" if ratio >= target else "  below target"
        print(f"{work:<42}{baseline:<26}{ours:<26}{ratio:>6.2f}x{target:>7.2f}x{mark}")
    figures["ratios"] = {work: ratio for work, _, _, ratio, _ in rows}
    figures["targets"] = {work: target for work, _, _, _, target in rows}
    print(json.dumps({"bench": "gpu", "figures": figures, "headline": {
        "what": f"{step['baseline']} step time / APOLLO r{rank} step time ({step['params_m']:.0f}M params, fp32, "
                f"{figures['device']})",
        "ratio": step["time_ratio"], "target": TARGETS["apollo"]}}))


def _release(device: str) -> None:
    """Hand back the cached memory of the measurement done, before the next one."""
    if device == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
