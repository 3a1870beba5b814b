"""Live weight pushes into a serving vLLM, against restarting it and reading from disk.

One run, side by side on this machine:
- a vLLM server of the model (a copy in a temporary folder) with a bounded request loop
  on loopback (`--threads` clients, at most `--limit` requests each);
- `--pushes` whole-model pushes while the loop runs, alternating the original weights
  and perturbed ones, timed end to end on the client (check, reload, prefix-cache reset);
- request latency during pushes against latency with no push in flight;
- the time to read the same safetensors file from disk into tensors;
- the server's restart time: stop, start, answer /health.

Headline: restart time / push p50 (target 100). Also: push p50 / disk read (target <= 2).

    python bench/live_push.py                  # tiny-gdn, 10 pushes
    python bench/live_push.py --model tiny-dense --pushes 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from behaviorc.engine.push import push_weights
from behaviorc.engine.server import resolve_model_dir, start_server, stop_server
from behaviorc.engine.traffic import Request, RequestLoop


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def perturbed_copy(folder: Path, into: Path) -> Path:
    shutil.copytree(folder, into)
    weights = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    save_file({name: tensor * (1.0 + 0.1 * torch.rand((), generator=generator))
               for name, tensor in weights.items()}, str(into / "model.safetensors"))
    return into


def disk_read_seconds(folder: Path, repeats: int) -> float:
    """Median time to read every tensor of the folder (page cache warm, as for a push)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for file in sorted(folder.glob("*.safetensors")):
            load_file(str(file))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def split_by_pushes(requests: list[Request], pushes: list[tuple[float, float]]) -> tuple[
        list[float], list[float]]:
    during, quiet = [], []
    for request in requests:
        end = request.started + request.seconds
        overlaps = any(request.started < p_end and end > p_start for p_start, p_end in pushes)
        (during if overlaps else quiet).append(request.seconds)
    return during, quiet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gdn")
    parser.add_argument("--pushes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=200, help="requests per client thread")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between pushes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="live-push-") as scratch:
        original = Path(scratch) / "original"
        shutil.copytree(resolve_model_dir(args.model), original)
        perturbed = perturbed_copy(original, Path(scratch) / "perturbed")

        started = time.perf_counter()
        server = start_server(original, log_path=Path(scratch) / "server.log")
        start_s = time.perf_counter() - started
        try:
            push_weights([server.url], perturbed)  # warm both paths once, untimed
            push_weights([server.url], original)
            push_times, reload_times, windows = [], [], []
            with RequestLoop([server.url], threads=args.threads, limit=args.limit) as load:
                time.sleep(1.0)  # some requests with no push in flight
                for index in range(args.pushes):
                    folder = perturbed if index % 2 == 0 else original
                    began = time.perf_counter()
                    report = push_weights([server.url], folder)
                    ended = time.perf_counter()
                    push_times.append(ended - began)
                    reload_times.append(report.reload_seconds[0])
                    windows.append((began, ended))
                    time.sleep(args.gap)
            push_weights([server.url], original)
            stop_started = time.perf_counter()
        finally:
            stop_server(server)
        # A restart is a stop and a start; the start was timed when the server came up.
        restart_s = (time.perf_counter() - stop_started) + start_s
        disk_s = disk_read_seconds(original, repeats=max(5, args.pushes))

    during, quiet = split_by_pushes(load.requests, windows)
    push_p50 = statistics.median(push_times)
    figures = {
        "model": args.model,
        "pushes": args.pushes,
        "requests_served": len(load.requests) - len(load.failed),
        "requests_failed": len(load.failed),
        "push_ms_p50": push_p50 * 1000,
        "push_ms_p95": percentile(push_times, 0.95) * 1000,
        "vllm_reload_ms_p50": statistics.median(reload_times) * 1000,
        "disk_read_ms": disk_s * 1000,
        "push_over_disk_read": push_p50 / disk_s,
        "push_over_disk_read_target_max": 2.0,
        "request_ms_p50_during_push": statistics.median(during) * 1000 if during else None,
        "requests_during_push": len(during),
        "request_ms_p50_no_push": statistics.median(quiet) * 1000 if quiet else None,
        "restart_s": restart_s,
        "start_s": start_s,
    }
    print(f"model {args.model}: {args.pushes} pushes under {args.threads} client threads")
    print(f"  requests served {figures['requests_served']}, failed {figures['requests_failed']}")
    print(f"  push (ours)        p50 {figures['push_ms_p50']:8.1f} ms   "
          f"p95 {figures['push_ms_p95']:8.1f} ms   (vLLM reload {figures['vllm_reload_ms_p50']:.1f} ms)")
    print(f"  restart (baseline)     {restart_s * 1000:8.1f} ms")
    print(f"  disk read (baseline)   {figures['disk_read_ms']:8.1f} ms")
    print(f"  request p50 during pushes {figures['request_ms_p50_during_push']} ms, "
          f"without {figures['request_ms_p50_no_push']} ms")
    print(json.dumps({"bench": "live_push", "figures": figures,
                      "headline": {"what": "server restart time / live push p50",
                                   "ratio": restart_s / push_p50, "target": 100}}))


if __name__ == "__main__":
    main()
