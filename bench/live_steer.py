"""Steering chosen per request on a live vLLM server: what it costs in throughput.

One run, side by side on this machine, the same prompts throughout:
- plain     on one vLLM server with behaviorc's worker extension: every request
            unsteered, `--concurrency` clients, greedy, exactly `--tokens` new tokens each
            (`ignore_eos`);
- mixed     the same server and workload, half the requests steered per request
            (`vllm_xargs.steer`) by one of two registered vectors, half plain, so most
            forward passes hold steered and unsteered requests together;
- embedded  behaviorc's embedded engine (transformers, the server's dtype) generating the
            same prompts with one of the vectors attached, in batches of `--batch`.
Runs alternate (plain, mixed, plain, mixed, ...) so machine load hits both alike; the
best of `--repeat` counts. The vectors are random directions of norm about 1 on a
quarter to a half of the layers: what a vector says does not change what it costs.

Headline: mixed tokens/s / plain tokens/s on the same server (target >= 0.8).

    python bench/live_steer.py                         # tiny-gdn, about 3 minutes here
    python bench/live_steer.py --model smollm2-135m --prompts 32 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from behaviorc.engine.vllm.named_vectors import register_vectors
from behaviorc.engine.vllm.server import serve
from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.model.tiny import tokenizer_corpus

TARGET_RATIO = 0.8


def make_prompts(count: int) -> list[str]:
    sentences = tokenizer_corpus()
    return [" ".join(sentences[(i * 7 + k) % len(sentences)] for k in range(1 + i % 3))
            for i in range(count)]


def served_tokens_per_s(engine: VLLMEngine, prompts: list[str], steers: list[str | None],
                        tokens: int, concurrency: int) -> float:
    def one(job: tuple[str, str | None]) -> int:
        prompt, steer = job
        body = {"model": engine.served_model_name, "prompt": prompt, "max_tokens": tokens,
                "temperature": 0.0, "ignore_eos": True}
        if steer:
            body["vllm_xargs"] = {"steer": steer}
        answer = engine.client.request("POST", "/v1/completions", "generating", body)
        return int(answer["usage"]["completion_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        generated = sum(pool.map(one, zip(prompts, steers)))
    return generated / (time.perf_counter() - started)


def embedded_tokens_per_s(model_dir, dtype: str, vector: dict[int, torch.Tensor],
                          strength: float, prompts: list[str], tokens: int,
                          batch: int) -> float:
    from behaviorc.engine.embedded import EmbeddedEngine

    engine = EmbeddedEngine.load(model_dir, dtype=dtype)
    engine.batch_size = batch
    engine.set_steering(vector, strength)
    engine.generate(prompts[:2], max_new_tokens=2)  # warm
    started = time.perf_counter()
    texts = engine.generate(prompts, max_new_tokens=tokens)
    seconds = time.perf_counter() - started
    # New tokens as the tokenizer reads them back (an early EOS ends a row sooner).
    generated = sum(len(engine.tokenizer(text, add_special_tokens=False).input_ids)
                    for text in texts)
    return generated / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gdn", help="a built-in model or a folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once")
    parser.add_argument("--batch", type=int, default=16, help="embedded engine batch")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs; best counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = make_prompts(args.prompts)
    with serve(args.model) as server, VLLMEngine(server.url) as engine:
        info = engine.info
        generator = torch.Generator().manual_seed(0)
        layers = range(max(1, info.num_layers // 4), max(2, info.num_layers // 2 + 1))
        vectors = {name: {layer: torch.randn(info.hidden_size, generator=generator)
                          / info.hidden_size ** 0.5 for layer in layers}
                   for name in ("happy", "concise")}
        for name, vector in vectors.items():
            register_vectors(engine.client, name, vector)
        plain_steers: list[str | None] = [None] * len(prompts)
        mixed_steers = [None if i % 2 == 0 else
                        f"{'happy' if i % 4 == 1 else 'concise'}:{args.strength:g}"
                        for i in range(len(prompts))]
        served_tokens_per_s(engine, prompts[:4], mixed_steers[:4], 4, 4)  # warm
        plain = mixed = 0.0
        for _ in range(args.repeat):
            plain = max(plain, served_tokens_per_s(engine, prompts, plain_steers,
                                                   args.tokens, args.concurrency))
            mixed = max(mixed, served_tokens_per_s(engine, prompts, mixed_steers,
                                                   args.tokens, args.concurrency))
        stats = engine.client.rpc("behaviorc_steer_stats", doing="reading steering counts")
        dtype = engine._described["dtype"]
    embedded = embedded_tokens_per_s(server.model_dir, dtype, vectors["happy"], args.strength,
                                     prompts, args.tokens, args.batch)
    figures = {
        "model": str(args.model), "prompts": len(prompts), "tokens": args.tokens,
        "concurrency": args.concurrency, "steered_layers": list(layers),
        "plain_tok_s": round(plain, 1), "mixed_tok_s": round(mixed, 1),
        "embedded_steered_tok_s": round(embedded, 1),
        "mixed_over_plain": round(mixed / plain, 3),
        "mixed_over_embedded": round(mixed / embedded, 3),
        "forward_passes_steered": stats["steered_passes"],
        "forward_passes_mixed": stats["mixed_passes"],
    }
    print(f"{args.model}: {len(prompts)} prompts x {args.tokens} tokens, "
          f"{args.concurrency} clients")
    print(f"  vLLM plain                 {plain:9.1f} tok/s")
    print(f"  vLLM mixed (half steered)  {mixed:9.1f} tok/s   x{mixed / plain:.2f} of plain "
          f"({stats['mixed_passes']} of {stats['steered_passes']} steered passes mixed)")
    print(f"  embedded steered           {embedded:9.1f} tok/s   "
          f"(vLLM mixed is x{mixed / embedded:.2f} of it)")
    print(json.dumps({
        "bench": "live_steer",
        "figures": figures,
        "headline": {
            "what": f"generation tokens/s on one vLLM server ({args.model}), half the requests "
                    f"steered per request by one of two vectors / all unsteered",
            "ratio": figures["mixed_over_plain"],
            "target": TARGET_RATIO,
        },
    }))


if __name__ == "__main__":
    main()
