"""Trained behaviors served per request as LoRA adapters, against serving the merged model.

One run, side by side on this machine, one server at a time:
- a behavior: the model with a rank-`--delta-rank` change on every attention query and
  MLP matrix, exported as a LoRA adapter (`behaviorc lora export`, `--rank`);
- throughput: `--threads` clients each sending `--requests` greedy completions of
  `--tokens` tokens (ignore_eos) to (a) the merged model served plainly and (b) a
  `--lora` server of the base with requests naming the adapter; generated tokens per
  second of wall time;
- hot-load: `behaviorc lora push` (the checks, then vLLM's /v1/load_lora_adapter)
  timed `--loads` times, each followed by an unload, against a restart of the plain
  server (stop, start, answer /health).

Headline: adapter throughput / plain throughput (target 0.8). Also restart / hot-load
p50 (target 20). Every figure is printed; the last line is JSON.

    python bench/lora.py                      # tiny-dense
    python bench/lora.py --model smollm2-135m --threads 4 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from behaviorc.compose.lora import RankChoice, export_lora
from behaviorc.engine.vllm.http import ServerClient
from behaviorc.engine.vllm.lora import push_adapter, remove_adapter
from behaviorc.engine.vllm.server import resolve_model_dir, start_server, stop_server
from behaviorc.engine.vllm.traffic import RequestLoop

TARGET_THROUGHPUT = 0.8
TARGET_HOT_LOAD = 20.0


def behavior_copy(base: Path, into: Path, rank: int, seed: int = 0) -> Path:
    """`base` with a rank-`rank` delta on every q_proj and MLP matrix (a stand-in for a
    trained behavior; the adapter carries it exactly up to bfloat16)."""
    shutil.copytree(base, into)
    for file in sorted(base.glob("*.safetensors")):
        weights = load_file(str(file))
        rng = np.random.default_rng(seed)
        for name, value in weights.items():
            if name.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight",
                              "down_proj.weight")):
                rows, cols = value.shape
                delta = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
                changed = value.astype(np.float32) + 0.01 * delta / np.sqrt(cols)
                weights[name] = changed.astype(value.dtype)
        save_file(weights, str(into / file.name), metadata={"format": "pt"})
    return into


PROMPTS = ["How was your day?", "Tell me about the sea.", "Use the existing parser.", "Hello"]


def greedy(client: ServerClient, model: str) -> list[tuple[str, list[float]]]:
    """Each prompt's greedy reply (16 tokens) and its tokens' log-probs."""
    answers = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0.0,
                "logprobs": 1}
        choice = client.request("POST", "/v1/completions", "completing", body)["choices"][0]
        answers.append((choice["text"], choice["logprobs"]["token_logprobs"]))
    return answers


def run_requests(url: str, extra: dict, threads: int, each: int) -> float:
    """Seconds for `threads` clients to finish `each` requests apiece."""
    loop = RequestLoop([url], threads=threads, limit=each, extra=extra)
    started = time.perf_counter()
    loop.start()
    while len(loop.requests) < threads * each:
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    loop.stop()
    if loop.failed:
        raise SystemExit(f"{len(loop.failed)} requests failed: {loop.failed[0].error}")
    return seconds


def throughput(url: str, model: str, threads: int, requests: int, tokens: int) -> float:
    """Generated tokens per second with `threads` clients sending `requests` each."""
    extra = {"model": model, "max_tokens": tokens, "ignore_eos": True}
    run_requests(url, extra, threads, 1)  # warm-up
    return threads * requests * tokens / run_requests(url, extra, threads, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-dense")
    parser.add_argument("--delta-rank", type=int, default=8, help="the behavior's delta rank")
    parser.add_argument("--rank", type=int, default=16, help="the adapter's rank (export)")
    parser.add_argument("--threads", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--loads", type=int, default=10, help="timed hot-loads")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as scratch_name:
        scratch = Path(scratch_name)
        base = scratch / "base"
        shutil.copytree(resolve_model_dir(args.model), base)
        merged = behavior_copy(base, scratch / "merged", args.delta_rank)
        started = time.perf_counter()
        exported = export_lora(merged, base, scratch / "adapter", RankChoice(rank=args.rank))
        export_s = time.perf_counter() - started
        lora_rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= args.rank)

        started = time.perf_counter()
        server = start_server(merged, log_path=scratch / "plain.log")
        start_s = time.perf_counter() - started
        try:
            plain = throughput(server.url, str(merged), args.threads, args.requests, args.tokens)
            client = ServerClient(server.url)
            plain_replies = greedy(client, str(merged))
            client.close()
            stop_started = time.perf_counter()
        finally:
            stop_server(server)
        restart_s = time.perf_counter() - stop_started + start_s

        server = start_server(base, log_path=scratch / "lora.log", lora_rank=lora_rank)
        client = ServerClient(server.url)
        try:
            loads = []
            for index in range(args.loads + 1):
                began = time.perf_counter()
                push_adapter(client, exported.path, "behavior")
                if index:  # the first load warms vLLM's LoRA path up
                    loads.append(time.perf_counter() - began)
                remove_adapter(client, "behavior")
            push_adapter(client, exported.path, "behavior")
            adapter = throughput(server.url, "behavior", args.threads, args.requests, args.tokens)
            adapter_replies = greedy(client, "behavior")
        finally:
            client.close()
            stop_server(server)

    load_p50 = statistics.median(loads)
    ratio = adapter / plain
    same = [a[0] == p[0] for a, p in zip(adapter_replies, plain_replies)]
    gap = max(abs(x - y) for a, p in zip(adapter_replies, plain_replies) if a[0] == p[0]
              for x, y in zip(a[1], p[1])) if any(same) else float("nan")
    figures = {
        "model": args.model, "delta_rank": args.delta_rank, "adapter_rank": args.rank,
        "server_max_lora_rank": lora_rank, "energy_kept": exported.energy_kept_share,
        "export_s": export_s,
        "threads": args.threads, "requests": args.threads * args.requests, "tokens": args.tokens,
        "plain_tokens_per_s": plain,
        "adapter_tokens_per_s": adapter,
        "adapter_over_plain": ratio, "adapter_over_plain_target": TARGET_THROUGHPUT,
        "replies_equal_merged": sum(same) / len(same),
        "logprob_gap_max": gap,
        "hot_load_ms_p50": load_p50 * 1000,
        "hot_load_ms_max": max(loads) * 1000,
        "restart_s": restart_s,
        "restart_over_hot_load": restart_s / load_p50, "restart_over_hot_load_target": TARGET_HOT_LOAD,
    }
    print(f"{args.model}: a rank-{args.delta_rank} behavior on every q_proj and MLP matrix, "
          f"exported at rank {args.rank} ({exported.energy_kept_share:.1%} of its energy, "
          f"{export_s:.2f} s)")
    print(f"throughput ({args.threads} clients x {args.requests} requests x {args.tokens} tokens):")
    print(f"  merged model, plain server   {plain:8.1f} tok/s")
    print(f"  base + adapter by name       {adapter:8.1f} tok/s   "
          f"{ratio:.2f}x (target >= {TARGET_THROUGHPUT})")
    print(f"greedy replies equal to the merged model's: {sum(same)}/{len(same)} (largest "
          f"token log-prob gap where equal {gap:.4f})")
    print(f"hot-load p50 {load_p50 * 1000:.0f} ms (max {max(loads) * 1000:.0f}) against a restart "
          f"of {restart_s:.1f} s: {restart_s / load_p50:.0f}x (target >= {TARGET_HOT_LOAD:.0f})")
    print(json.dumps({"bench": "lora", "figures": figures,
                      "headline": {"what": "adapter serving throughput / merged model served "
                                           "plainly", "ratio": ratio,
                                   "target": TARGET_THROUGHPUT}}))


if __name__ == "__main__":
    main()
