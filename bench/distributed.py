"""Training on 1 and 2 processes (FSDP2, gloo, CPU): tokens/s and memory per process.

    python bench/distributed.py                      ~100M Qwen3, APOLLO rank 128
    python bench/distributed.py --optimizer adamw --steps 4

A randomly initialised Qwen3 of about 100M parameters (hidden 768, 12 layers, ffn 2048,
vocab 8192) trains every matrix and norm with behaviorc's loop under
torch.distributed.run at N = 1 (the baseline: one process holds everything) and N = 2
(each decoder layer and the model `fully_shard`ed), same global batch, one thread per
process. The model is written to a folder once; each process reads only its rows of it
(`load_sharded`). Each process reports, after its first step, the bytes of its parameters
and optimizer state as it holds them (its shards; APOLLO's replicated r x n moments of
wide matrices count whole on each), its peak resident memory once the model is loaded,
and at the end its peak resident memory (which also holds activations, gathered layers,
the whole trained targets gathered at the end, and torch itself).

Target (issue 19): parameters plus optimizer state per process at N = 2 <= 0.6x N = 1.
The headline ratio is N=1's bytes / N=2's; its target 1 / 0.6. Tokens/s are the global
batch's tokens over the median step time (the first step, which allocates, excluded).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
              tie_word_embeddings=False, rms_norm_eps=1e-6)


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from behaviorc.core import ir
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.train.data import BatchSchedule, TrainSequence
    from behaviorc.train.distributed import device_mesh, load_sharded
    from behaviorc.train.ranks import train_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = load_sharded(Path(args.model), "float32", "cpu", device_mesh())
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    generator = torch.Generator().manual_seed(1)
    sequences = [TrainSequence(tuple(torch.randint(1, CONFIG["vocab_size"], (args.context,), generator=generator).tolist()),
                               tuple(torch.randint(1, CONFIG["vocab_size"], (args.tokens - args.context,),
                                                   generator=generator).tolist())) for _ in range(16)]
    schedule = BatchSchedule(sequences, [], args.batch, 0.0, 0)
    spec = ir.Train(lr=1e-4, steps=args.steps, batch=args.batch, context="full",
                    targets=("embed", "attn.q", "attn.kv", "attn.o", "attn.norm", "mlp", "norm", "head"),
                    optimizer=ir.Optimizer(name=args.optimizer, rank=args.rank))
    moments: list[float] = []
    held: dict[str, int] = {}

    def on_step(event) -> None:
        moments.append(time.perf_counter())
        if event.step == 1:  # the state exists once a step ran: measure it as held
            with warnings.catch_warnings():  # the scan touches torch's deprecated aliases
                warnings.simplefilter("ignore")
                optimizer = next(o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer))
            held["parameters"] = sum(local_bytes(p) for p in model.parameters())
            held["optimizer_state"] = sum(local_bytes(v) for s in optimizer.state.values()
                                          for v in s.values() if isinstance(v, torch.Tensor))

    started = time.perf_counter()
    train_sharded(model, ArchitectureAdapter.for_model(model), schedule, spec, pad_id=0, start_token=0,
                  on_step=on_step)
    steps = [b - a for a, b in zip([started] + moments, moments)][1:]
    report = {"rank": dist.get_rank(), **held, "step_s": statistics.median(steps),
              "loaded_rss_bytes": loaded_rss,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.out).with_suffix(f".{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def write_model(folder: Path) -> None:
    """The random model as a folder; a model folder has a tokenizer, and any will do for
    random token ids (tiny-dense's)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from behaviorc.model.builtin import ensure_builtin

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**CONFIG)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_builtin("tiny-dense")).save_pretrained(folder)


def measure(nproc: int, model: Path, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "figures"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   __file__, "--worker", "--model", str(model), "--out", str(out), "--steps", str(args.steps),
                   "--batch", str(args.batch),
                   "--tokens", str(args.tokens), "--context", str(args.context), "--optimizer", args.optimizer,
                   "--rank", str(args.rank)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        return [json.loads(out.with_suffix(f".{rank}.json").read_text()) for rank in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="apollo", choices=["apollo", "apollo_mini", "adamw"])
    parser.add_argument("--rank", type=int, default=128, help="APOLLO's rank")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    parser.add_argument("--batch", type=int, default=4, help="global batch, sequences")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--context", type=int, default=32, help="of which context (no loss)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from behaviorc.train.ranks import exit_now

        worker(args)
        exit_now(0)  # not through the interpreter's teardown: see behaviorc.train.ranks.release

    figures: dict[str, float] = {"optimizer": args.optimizer, "rank": args.rank, "batch": args.batch,
                                 "tokens_per_sequence": args.tokens, "threads_per_process": 1,
                                 "load_average": os.getloadavg()[0]}
    model = Path(tempfile.mkdtemp(prefix="behaviorc-bench-"))
    try:
        write_model(model)
        runs = {nproc: measure(nproc, model, args) for nproc in (1, 2)}
    finally:
        shutil.rmtree(model, ignore_errors=True)
    for nproc, ranks in runs.items():
        held = max(r["parameters"] + r["optimizer_state"] for r in ranks)
        figures[f"n{nproc}_parameters_mb"] = max(r["parameters"] for r in ranks) / 1e6
        figures[f"n{nproc}_optimizer_state_mb"] = max(r["optimizer_state"] for r in ranks) / 1e6
        figures[f"n{nproc}_held_mb"] = held / 1e6
        figures[f"n{nproc}_loaded_rss_mb"] = max(r["loaded_rss_bytes"] for r in ranks) / 1e6
        figures[f"n{nproc}_peak_rss_mb"] = max(r["peak_rss_bytes"] for r in ranks) / 1e6
        figures[f"n{nproc}_tokens_per_s"] = args.batch * args.tokens / max(r["step_s"] for r in ranks)
        print(f"N={nproc}: parameters + optimizer state per process {held / 1e6:8.1f} MB "
              f"(parameters {figures[f'n{nproc}_parameters_mb']:.1f}, state "
              f"{figures[f'n{nproc}_optimizer_state_mb']:.1f}); RSS loaded "
              f"{figures[f'n{nproc}_loaded_rss_mb']:.0f} MB, peak "
              f"{figures[f'n{nproc}_peak_rss_mb']:.0f} MB; {figures[f'n{nproc}_tokens_per_s']:.0f} tokens/s")
    ratio = figures["n1_held_mb"] / figures["n2_held_mb"]
    figures["n2_over_n1_held"] = 1 / ratio
    figures["speedup_tokens_per_s"] = figures["n2_tokens_per_s"] / figures["n1_tokens_per_s"]
    print(f"N=2 holds {1 / ratio:.2f}x of N=1 per process (target <= 0.6x); "
          f"tokens/s {figures['speedup_tokens_per_s']:.2f}x; load average {figures['load_average']:.1f}")
    print(json.dumps({"bench": "distributed", "figures": figures, "headline": {
        "what": "parameters + optimizer state per process, N=1 / N=2 (FSDP2, ~100M Qwen3)",
        "ratio": ratio, "target": 1 / 0.6}}))


if __name__ == "__main__":
    main()
