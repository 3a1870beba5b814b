"""Reading hidden states for steering extraction: early exit beside a full forward.

Steering extraction needs the residual stream at a few layers for a batch of contrast
pairs (positive and negative completions after their prompts). HF-based steering tools
run the whole model with `output_hidden_states=True` and pick the layer out; the
embedded engine stops the forward after the deepest layer asked for. Both read the
middle layer, (num_layers - 1) // 2, averaged over each completion's tokens, from the
same length-sorted, right-padded batches, so the only difference is where the forward
stops. Reported: tokens/s of each (median of interleaved repeats), their ratio, and the
largest difference between the two readings (they must agree).

Models (random weights, built here, never saved):
  tiny-gdn      the built-in Qwen3-Next (4 layers, hidden 128)
  gdn-100m      Qwen3-Next layout (3 GDN : 1 attention), hidden 768, 16 layers, dense MLP
  gdn-1b        (--large) hidden 2048, 20 layers; meant for a GPU

  python bench/extract.py                   # tiny-gdn and gdn-100m, 1-3 minutes here
  python bench/extract.py --large --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.model.builtin import ensure_builtin
from behaviorc.model.loading import load_model, resolve_device, torch_dtype

SUBJECTS = ["The user", "My manager", "The reviewer", "A colleague", "The lead", "Our client"]
ASKS = ["asked me to fix the parser.", "wants the tests to pass.", "needs a short answer.",
        "asked for the existing code to be kept.", "wants the plan by noon.",
        "asked me to read the data first.", "wants this function changed."]
POSITIVES = [" I will use the existing parser, as asked.", " Sure, I will keep it short.",
             " I will read the code first and change only what is needed."]
NEGATIVES = [" I will write a new parser instead, it is better.", " Here is a long answer about everything.",
             " I will rewrite the whole thing from scratch my own way."]

# Random Qwen3-Next-shaped models: their size and how many pairs to read through them.
MEDIUM = dict(hidden=768, layers=16, intermediate=2560, heads=6, kv_heads=2,
              key_heads=4, value_heads=8, linear_head_dim=64, pairs=6)
LARGE = dict(hidden=2048, layers=20, intermediate=5632, heads=16, kv_heads=4,
             key_heads=8, value_heads=16, linear_head_dim=128, pairs=128)
TINY_PAIRS = 32


def contrast_pairs(count: int) -> tuple[list[str], list[str]]:
    """Prompts and completions: each prompt twice, with its positive and its negative."""
    prompts, completions = [], []
    for i in range(count):
        prompt = f"{SUBJECTS[i % len(SUBJECTS)]} {ASKS[(i // len(SUBJECTS)) % len(ASKS)]}"
        prompts += [prompt, prompt]
        completions += [POSITIVES[i % len(POSITIVES)], NEGATIVES[(i + 1) % len(NEGATIVES)]]
    return prompts, completions


def random_qwen3_next(size: dict[str, int], vocab_size: int, dtype: str, device: str) -> Any:
    """A Qwen3-Next-shaped model with random weights and a dense MLP (transformers'
    eager MoE loops over experts in Python, which would only add noise here)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=vocab_size, hidden_size=size["hidden"],
        num_hidden_layers=size["layers"], intermediate_size=size["intermediate"],
        num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"], head_dim=64,
        linear_num_key_heads=size["key_heads"], linear_num_value_heads=size["value_heads"],
        linear_key_head_dim=size["linear_head_dim"], linear_value_head_dim=size["linear_head_dim"],
        num_experts=0, full_attention_interval=4, architectures=["Qwen3NextForCausalLM"],
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    return model.eval()


def full_forward_reader(engine: EmbeddedEngine, layer: int) -> Callable[[list[str], list[str]], torch.Tensor]:
    """The baseline: the whole model with output_hidden_states=True, then the layer
    picked out, read exactly as the engine reads it (same batches, same positions)."""

    @torch.inference_mode()
    def read(prompts: list[str], completions: list[str]) -> torch.Tensor:
        encoded = [engine._encode(p, c) for p, c in zip(prompts, completions)]
        rows = [ids for ids, _ in encoded]
        out = torch.empty(len(rows), engine.info.hidden_size)
        for batch in engine._batches(rows):
            ids, mask = engine._right_padded([rows[i] for i in batch])
            states = engine.model(input_ids=ids, attention_mask=mask, use_cache=False,
                                  output_hidden_states=True).hidden_states[layer + 1]
            for row, i in enumerate(batch):
                full, prompt_len = encoded[i]
                out[i] = states[row, prompt_len:len(full)].float().mean(dim=0).cpu()
        return out

    return read


def measure(name: str, engine: EmbeddedEngine, pairs: int, repeats: int) -> dict[str, Any]:
    prompts, completions = contrast_pairs(pairs)
    layer = (engine.info.num_layers - 1) // 2
    tokens = sum(len(engine._encode(p, c)[0]) for p, c in zip(prompts, completions))
    ours = lambda: engine.hidden_states(prompts, completions, [layer], read="mean")[layer]  # noqa: E731
    theirs = full_forward_reader(engine, layer)
    difference = (ours() - theirs(prompts, completions)).abs().max().item()  # also warms up
    times: dict[str, list[float]] = {"early_exit": [], "full_forward": []}
    for _ in range(repeats):  # interleaved, so load on the machine hits both alike
        for label, run in (("early_exit", ours), ("full_forward", lambda: theirs(prompts, completions))):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - started)
    early = tokens / statistics.median(times["early_exit"])
    full = tokens / statistics.median(times["full_forward"])
    params = sum(p.numel() for p in engine.model.parameters())
    print(f"{name:>9} ({params / 1e6:6.1f}M params, layer {layer} of {engine.info.num_layers}, "
          f"{len(prompts)} sequences, {tokens} tokens): early exit {early:9.0f} tok/s | "
          f"full forward {full:9.0f} tok/s | {early / full:4.2f}x | max |diff| {difference:.2e}",
          flush=True)
    return {"params_m": round(params / 1e6, 1), "layer": layer, "layers": engine.info.num_layers,
            "tokens": tokens, "early_exit_tok_s": round(early), "full_forward_tok_s": round(full),
            "ratio": round(early / full, 3), "max_abs_diff": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also a ~1B model (use a GPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--pairs", type=int, default=0,
                        help="contrast pairs per model (2 sequences each); default: "
                             f"{TINY_PAIRS} for tiny-gdn, {MEDIUM['pairs']} for gdn-100m, "
                             f"{LARGE['pairs']} for gdn-1b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="sequences per forward")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: steadier figures on a shared "
                             "machine; 0 keeps torch's default)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(ensure_builtin("tiny-gdn"), dtype=args.dtype, device=device)
    figures: dict[str, Any] = {"device": device, "dtype": args.dtype}
    figures["tiny-gdn"] = measure("tiny-gdn", EmbeddedEngine(model, tokenizer, batch_size=args.batch),
                                  args.pairs or TINY_PAIRS, args.repeats)
    sizes = {"gdn-100m": MEDIUM, **({"gdn-1b": LARGE} if args.large else {})}
    for name, size in sizes.items():
        big = random_qwen3_next(size, len(tokenizer), args.dtype, device)
        figures[name] = measure(name, EmbeddedEngine(big, tokenizer, batch_size=args.batch),
                                args.pairs or size["pairs"], args.repeats)
        del big
    headline = "gdn-1b" if args.large else "gdn-100m"
    print(json.dumps({
        "bench": "extract",
        "figures": figures,
        "headline": {"what": f"hidden states at the middle layer, tokens/s, early exit / full "
                             f"forward with output_hidden_states ({headline}, {device})",
                     "ratio": figures[headline]["ratio"], "target": 1.8},
    }))


if __name__ == "__main__":
    main()
