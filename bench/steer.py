"""Steering extraction throughput: behaviorc's extraction beside the usual one.

Both extract a mean-difference direction at the middle layer, (num_layers - 1) // 2
(the output of the layer halfway up the stack), reading the last token of each text,
from the same model object in the same process:

  baseline  what repeng and steering-vectors do: texts in input order (positive,
            negative, positive, ...), batches of --batch, a full forward with
            `output_hidden_states=True` (every layer and the LM head), the layer picked
            out afterwards.
  ours      `behaviorc.steer.extract.extract` through the embedded engine: texts
            bucketed by length, batches of --batch, one forward per batch that stops
            after the deepest layer asked for.

The pairs have prompts of very different lengths (1 to 8 sentences), as real steering
data does. Reported: tokens/s of each (real tokens, padding not counted; the best of
--repeat interleaved runs), their ratio, and the largest difference between the two
directions (they must agree).

Models (random weights, built here in memory, never saved):
  tiny-gdn    the built-in Qwen3-Next (4 layers, hidden 128)
  dense-100m  Qwen3, hidden 768, 16 layers (the default ~100M model)
  gdn-100m    (--big gdn) Qwen3-Next layout (3 GDN : 1 attention), hidden 768, 16
              layers, dense MLP; on CPU transformers runs reference GDN kernels, slowly

  python bench/steer.py                        # both models, 1-2 minutes on 2 CPU cores
  python bench/steer.py --pairs 128 --repeat 3 --big gdn --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from behaviorc.core import ir
from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.model.builtin import BUILTINS, ensure_builtin
from behaviorc.model.tiny import build_tokenizer, tokenizer_corpus
from behaviorc.model.loading import load_model, quiet_transformers
from behaviorc.steer.extract import extract

TARGET_RATIO = 2.0


def make_pairs(count: int) -> list[ir.Pair]:
    """Deterministic pairs whose prompts run from one sentence to eight."""
    sentences = tokenizer_corpus()
    pairs = []
    for i in range(count):
        length = 1 + (i * 5) % 8
        prompt = " ".join(sentences[(i * 13 + k * 5) % len(sentences)] for k in range(length))
        pairs.append(ir.Pair(prompt=prompt, positive=" I will use the existing parser.",
                             negative=" I would rather write a new parser."))
    return pairs


def baseline_direction(model: Any, tokenizer: Any, pairs: list[ir.Pair], layer: int,
                       batch: int) -> torch.Tensor:
    """repeng's `batched_get_hiddens` shape of work, then the mean difference."""
    texts = [pair.prompt + side for pair in pairs for side in (pair.positive, pair.negative)]
    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            encoded = tokenizer(texts[start:start + batch], padding=True, return_tensors="pt").to(device)
            out = model(**encoded, output_hidden_states=True)
            last = encoded["attention_mask"].sum(dim=1) - 1  # right padding
            states = out.hidden_states[layer + 1]  # [0] is the embeddings
            rows.append(states[torch.arange(len(last)), last].float().cpu())
    hidden = torch.cat(rows)
    return (hidden[0::2] - hidden[1::2]).mean(dim=0)


def ours_direction(engine: EmbeddedEngine, pairs: list[ir.Pair], layer: int, batch: int) -> torch.Tensor:
    return extract(engine, pairs, [layer], "mean_diff", "last", batch_size=batch).vectors.directions[layer]


def timed(run: Callable[[], torch.Tensor], sync: Callable[[], None]) -> tuple[float, torch.Tensor]:
    sync()
    started = time.perf_counter()
    result = run()
    sync()
    return time.perf_counter() - started, result


def model_100m(arch: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A random ~100M-parameter model on the built-in tokenizer: Qwen3 (`dense`) or the
    Qwen3-Next layout with a dense MLP (`gdn`; slow on CPU, where transformers runs the
    reference Gated DeltaNet kernels)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    builtin = "tiny-gdn" if arch == "gdn" else "tiny-dense"
    fields = BUILTINS[builtin].config(len(tokenizer))
    layers = 16
    fields.update({"hidden_size": 768, "num_hidden_layers": layers, "intermediate_size": 2048,
                   "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64})
    if arch == "gdn":
        fields.update({
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4),
            "linear_num_key_heads": 4, "linear_num_value_heads": 8,
            "linear_key_head_dim": 64, "linear_value_head_dim": 64,
            "mlp_only_layers": list(range(layers)),
        })
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=dtype)
    return model.to(device).eval(), tokenizer


def measure(name: str, model: Any, tokenizer: Any, pairs: list[ir.Pair], batch: int, repeat: int) -> dict:
    engine = EmbeddedEngine(model, tokenizer, name=name)
    engine.batch_size = batch
    layer = (engine.info.num_layers - 1) // 2
    texts = [pair.prompt + side for pair in pairs for side in (pair.positive, pair.negative)]
    tokens = sum(len(tokenizer(text).input_ids) for text in texts)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # warm both paths (allocator, kernels) on a few pairs before timing
    baseline_direction(model, tokenizer, pairs[:4], layer, batch)
    ours_direction(engine, pairs[:4], layer, batch)
    baseline_s = ours_s = float("inf")
    for _ in range(repeat):  # interleaved, so machine load hits both alike
        seconds, base = timed(lambda: baseline_direction(model, tokenizer, pairs, layer, batch), sync)
        baseline_s = min(baseline_s, seconds)
        seconds, mine = timed(lambda: ours_direction(engine, pairs, layer, batch), sync)
        ours_s = min(ours_s, seconds)
    params = sum(p.numel() for p in model.parameters())
    figures = {
        "params_m": round(params / 1e6, 1),
        "layers": engine.info.num_layers,
        "layer": layer,
        "tokens": tokens,
        "baseline_tok_s": round(tokens / baseline_s, 1),
        "ours_tok_s": round(tokens / ours_s, 1),
        "ratio": round(baseline_s / ours_s, 3),
        "max_abs_diff": float((base - mine).abs().max()),
        "direction_norm": float(mine.norm()),
    }
    print(f"{name:9s} {figures['params_m']:6.1f}M params, layer {layer} of {figures['layers']}, "
          f"{tokens} tokens: baseline {figures['baseline_tok_s']:9.1f} tok/s   "
          f"ours {figures['ours_tok_s']:9.1f} tok/s   x{figures['ratio']:.2f}   "
          f"max |diff| {figures['max_abs_diff']:.2e} (norm {figures['direction_norm']:.3f})")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="contrast pairs (2 texts each)")
    parser.add_argument("--batch", type=int, default=16, help="texts per forward, both sides")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs; the best counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--big", choices=["dense", "gdn"], default="dense",
                        help="layout of the ~100M model (gdn is slow on CPU)")
    parser.add_argument("--only", choices=["tiny-gdn", "100m"], help="one model only")
    args = parser.parse_args()
    quiet_transformers()
    dtype = getattr(torch, args.dtype)
    pairs = make_pairs(args.pairs)
    figures = {}
    if args.only in (None, "tiny-gdn"):
        model, tokenizer = load_model(ensure_builtin("tiny-gdn"), dtype=args.dtype, device=args.device)
        figures["tiny-gdn"] = measure("tiny-gdn", model, tokenizer, pairs, args.batch, args.repeat + 1)
    if args.only in (None, "100m"):
        name = f"{args.big}-100m"
        model, tokenizer = model_100m(args.big, args.device, dtype)
        figures[name] = measure(name, model, tokenizer, pairs, args.batch, args.repeat)
    headline_model = next(name for name in figures if name.endswith("100m")) \
        if args.only != "tiny-gdn" else "tiny-gdn"
    headline = figures[headline_model]
    print(json.dumps({
        "bench": "steer",
        "figures": figures,
        "headline": {
            "what": f"steering extraction tokens/s at the middle layer, {headline_model}: "
                    "ours (length buckets, early exit) / repeng-style full forward",
            "ratio": headline["ratio"],
            "target": TARGET_RATIO,
        },
    }))


if __name__ == "__main__":
    main()
