"""Context-frozen training step against a full-sequence step, at 75% context.

    python bench/frozen_context.py                        Qwen3-Next shape, hidden 512, 512 tokens
    python bench/frozen_context.py --arch dense --tokens 1024 --hidden 768

One training step = forward, response-token loss, backward (every parameter trainable),
on a batch of examples whose first 75% of tokens are context. Three ways, measured side
by side in one run, interleaved round by round so machine load hits them alike:

  full        the whole sequence forward and backward (the baseline)
  recompute   the context forward without gradient every step, then the response
              segment forward and backward on its frozen state
  reuse       each example's frozen context computed once (before timing) and reused,
              as across epochs; only the segment runs

The model is a randomly initialised Qwen3-Next (3 GDN layers : 1 attention layer, dense
MLP) or Qwen3, built in memory. Targets (issue 8): full / recompute >= 1.7, full / reuse
>= 3. The headline is the recompute ratio; the reuse ratio is in the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from behaviorc.train.data import TrainSequence  # noqa: E402
from behaviorc.train.loop import ResponseLoss  # noqa: E402


def build_model(arch: str, hidden: int, layers: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=2 * hidden,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    if arch == "gdn":
        config = AutoConfig.for_model(
            "qwen3_next", **common, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4),
            full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=64,
            linear_value_head_dim=64, linear_num_key_heads=hidden // 128, linear_num_value_heads=hidden // 64,
            mlp_only_layers=list(range(layers)), partial_rotary_factor=0.25)
    else:
        config = AutoConfig.for_model("qwen3", **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device=device, dtype=dtype).eval()


def measure(arch: str, hidden: int, layers: int, tokens: int, batch_size: int, context: float, rounds: int,
            device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Step times of the three ways, side by side (printed), and their ratios."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    model = build_model(arch, hidden, layers, device, dtype)
    g = torch.Generator().manual_seed(1)
    context_tokens = int(tokens * context)
    batch = [TrainSequence(tuple(torch.randint(1, 1024, (context_tokens,), generator=g).tolist()),
                           tuple(torch.randint(1, 1024, (tokens - context_tokens,), generator=g).tolist()))
             for _ in range(batch_size)]
    ways = {
        "full": ResponseLoss(model, "full", pad_id=0),
        "recompute": ResponseLoss(model, "frozen", pad_id=0),
        "reuse": ResponseLoss(model, "frozen", pad_id=0, reuse_contexts=True),
    }
    on_gpu = device == "cuda"

    def step(loss_of) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        began = time.perf_counter()
        loss, _ = loss_of(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - began

    for loss_of in ways.values():  # warm up; `reuse` computes its contexts here, untimed
        step(loss_of)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, loss_of in ways.items():
            times[name].append(step(loss_of))

    ms = {name: statistics.median(v) * 1000 for name, v in times.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{arch}: {params:.1f}M parameters, {str(dtype).removeprefix('torch.')} on {device}, batch {batch_size} x "
          f"{tokens} tokens, {context_tokens} of them context, {torch.get_num_threads()} threads")
    for name in ways:
        print(f"{name:<10}{ms[name]:>10.1f} ms/step   full/this {ms['full'] / ms[name]:.2f}x")
    figures = {f"{name}_step_ms": round(v, 1) for name, v in ms.items()}
    figures.update(params_m=round(params, 1), recompute_ratio=round(ms["full"] / ms["recompute"], 3),
                   reuse_ratio=round(ms["full"] / ms["reuse"], 3))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gdn", "dense"], default="gdn")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512, help="per example, context + response")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=float, default=0.75, help="share of tokens that are context")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: steadier timings on this shared 2-core machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = measure(args.arch, args.hidden, args.layers, args.tokens, args.batch, args.context, args.rounds)
    print("targets: recompute >= 1.7x, reuse >= 3x")
    figures.update(recompute_target=1.7, reuse_target=3.0)
    print(json.dumps({"bench": "frozen_context", "figures": figures, "headline": {
        "what": f"full-sequence step / context-frozen step, context recomputed each step "
                f"({args.arch}, {args.tokens} tokens, {int(args.context * 100)}% context)",
        "ratio": figures["recompute_ratio"], "target": 1.7}}))


if __name__ == "__main__":
    main()
