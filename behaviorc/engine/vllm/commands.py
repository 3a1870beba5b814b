"""`behaviorc serve`: a vLLM server for a model, with behaviorc's worker extension."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

from behaviorc.core.catalog import BUILTIN_MODELS
from behaviorc.engine.vllm import chat

DESCRIPTION = """\
Serve a built-in model or a local Hugging Face folder with vLLM's OpenAI-compatible
server, with behaviorc's worker extension loaded so builds can steer it and push
weights into it while it serves. Binds to 127.0.0.1; another host needs an API key,
given in the environment variable BEHAVIORC_API_KEY (every route but /health then requires it, the
weight-push routes included; a key on a command line is readable by every local user,
so there is no --api-key). Ctrl-C stops it.

Requests can be steered one by one: register vectors with `behaviorc steer push URL FILE
--name happy`, then send `"vllm_xargs": {"steer": "happy:2"}` with a completion or chat
request (or talk to it with `behaviorc chat URL --steer happy:2`).
"""

EPILOG = """\
examples:
  behaviorc serve smollm2-135m --port 8000
  behaviorc serve out/persona/persona/model    a build's result (requests name it `persona`)
  BEHAVIORC_API_KEY="$(openssl rand -hex 16)" behaviorc serve tiny-dense --host 0.0.0.0
  behaviorc serve ./big-model --tensor-parallel-size 4    one model over 4 GPUs
  behaviorc serve smollm2-135m --lora       adapters per request (`behaviorc lora push`)
  behaviorc serve tiny-qwen3.5 --max-model-len 1024       a shorter context than the model's
  behaviorc serve smollm2-135m --eager      start faster: no torch.compile, no CUDA graphs

It prints the URL and the model id requests name (a built-in's name, else the folder's),
and while vLLM starts (a minute or more on a CPU), what it is doing every 10 s.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model with vLLM for live steering and weight pushes",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"a built-in model ({', '.join(BUILTIN_MODELS)}) or a model folder")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; others need an API key "
                             "in BEHAVIORC_API_KEY)")
    parser.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="K",
                        help="split each layer over K GPUs (vLLM's tensor parallelism; on a "
                             "CPU, K processes) for a model too large for one (default 1)")
    parser.add_argument("--lora", nargs="?", type=int, const=64, default=0, metavar="RANK",
                        help="serve LoRA adapters chosen per request, loaded at run time with "
                             "`behaviorc lora push` (up to rank RANK, default 64; vLLM takes "
                             "1, 8, 16, 32, 64, 128, 256, 320 or 512)")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                        help="the longest prompt plus reply served (default: the model's "
                             "own context, lowered to what the KV-cache memory holds)")
    parser.add_argument("--eager", action="store_true",
                        help="run vLLM eagerly (`--enforce-eager`): no torch.compile and no "
                             "CUDA graphs. It starts in about half the time and serves slower "
                             "where compiling pays (python bench/serve.py measures both). "
                             "Steering per request and weight pushes work either way: the "
                             "steering tables are in the compiled graph. On a GPU behaviorc uses "
                             "piecewise CUDA graphs, not full ones, because each pass's steering "
                             "is written before it runs")
    parser.set_defaults(run=run_serve)
    chat.register(subparsers)


def run_serve(args: argparse.Namespace) -> int:
    from behaviorc.core.diagnostics import BehaviorError
    from behaviorc.engine.vllm.http import API_KEY_ENV
    from behaviorc.engine.devices import check_process_count
    from behaviorc.engine.vllm.server import serve

    if args.api_key is not None:
        raise BehaviorError("an API key on the command line is readable by every local "
                            "user (`ps`), so `--api-key` is not taken",
                            hint=f"set it in the environment: {API_KEY_ENV}=KEY behaviorc serve ...")
    api_key = os.environ.get(API_KEY_ENV) or None
    check_process_count(args.tensor_parallel_size, "--tensor-parallel-size")

    # The server runs in its own process group, out of reach of the terminal's Ctrl-C,
    # of its hang-up when it closes and of a SIGTERM sent to us: each must end here, so
    # the server is stopped too. (Were this process killed outright, the server's
    # parent-death signal stops it, or, while it still starts, behaviorc's plugin in it:
    # see engine/vllm/server.py and inside/plugin.py.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    print(f"starting vLLM for {args.model} (a minute or more on a CPU) ...", flush=True)
    interrupted = False
    with serve(args.model, port=args.port, host=args.host, api_key=api_key,
               tensor_parallel_size=args.tensor_parallel_size, waiting=_starting,
               lora_rank=args.lora, max_model_len=args.max_model_len, eager=args.eager) as server:
        print(f"serving {server.model_dir}", flush=True)
        print(f"url: {server.url}", flush=True)
        print(f"model: {server.model_name}", flush=True)
        print(f"log: {server.log_path}", flush=True)
        body = json.dumps({"model": server.model_name, "max_tokens": 32,
                           "messages": [{"role": "user", "content": "Hello"}]})
        key = ' -H "Authorization: Bearer $BEHAVIORC_API_KEY"' if api_key else ""
        print(f"try: curl {server.url}/v1/chat/completions -H 'Content-Type: application/json'{key} "
              f"-d '{body}'", flush=True)
        print("press Ctrl-C to stop", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            interrupted = True
            print("stopping the server ...", flush=True)
    if interrupted:
        print(f"stopped; {server.url} is free", flush=True)
        return 0
    print(f"the server exited with code {server.process.returncode}; see {server.log_path}")
    return 1


def _starting(seconds: float, phase: str) -> None:
    print(f"  {seconds:4.0f} s  {phase}", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
