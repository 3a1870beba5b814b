"""Live weight pushes into a serving vLLM, against restarting it and reading from disk.

One run, side by side on this machine:
- a vLLM server of the model (a copy in a temporary folder);
- `--pushes` whole-model pushes with no other request, then as many while a bounded
  request loop runs on loopback (`--threads` clients, at most `--limit` requests each),
  alternating the original weights and perturbed ones, timed end to end on the client
  (check and read on the server, vLLM's load, prefix-cache reset);
- right after each push, the time to read the same safetensors file from disk into
  tensors (every byte, see `disk_read_seconds`), so both are measured under the same
  conditions (idle, or under the loop);
- partial pushes (one decoder layer's tensors, as a state dict), idle and under load;
- request latency during pushes against latency with no push in flight;
- the server's restart time: stop, start, answer /health.

Headline: restart time / push p50 under load (target 100). Also: push p50 / disk read,
idle and under load (target <= 2), and where a push's time goes.

    python bench/live_push.py                  # tiny-gdn, 10 pushes idle + 10 under load
    python bench/live_push.py --model tiny-dense --pushes 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from behaviorc.engine.vllm.push import push_weights
from behaviorc.engine.vllm.server import resolve_model_dir, start_server, stop_server
from behaviorc.engine.vllm.traffic import Request, RequestLoop


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def widened_copy(folder: Path, width: int, into: Path) -> Path:
    """The model's architecture with hidden size and MLP widths `width`, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(folder, into)
    fields = json.loads((folder / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size",
                "shared_expert_intermediate_size"):
        if key in fields:
            fields[key] = width
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for file in into.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(into, safe_serialization=True)
    return into


def perturbed_copy(folder: Path, into: Path) -> Path:
    shutil.copytree(folder, into)
    weights = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    save_file({name: tensor * (1.0 + 0.1 * torch.rand((), generator=generator))
               for name, tensor in weights.items()}, str(into / "model.safetensors"))
    return into


def disk_read_seconds(folder: Path) -> float:
    """Time to read every tensor of the folder (page cache warm, as for a push).

    safetensors maps a file and reads a tensor's bytes only when they are used, so a
    bare `load_file` reads nothing; one pass over every value (its sum) makes it read.
    A push reads the same bytes the same way, with its finiteness check as the pass."""
    started = time.perf_counter()
    for file in sorted(folder.glob("*.safetensors")):
        for tensor in load_file(str(file)).values():
            tensor.sum()
    return time.perf_counter() - started


def one_layer(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    """A decoder layer's tensors, slightly changed: a partial push."""
    weights = load_file(str(folder / "model.safetensors"))
    prefix = f"model.layers.{layer}."
    return {name: tensor * 1.01 for name, tensor in weights.items() if name.startswith(prefix)}


@dataclass
class Pushes:
    """Whole-model pushes, each followed by a disk read of the same folder."""

    seconds: list[float] = field(default_factory=list)
    disk_seconds: list[float] = field(default_factory=list)
    partial_seconds: list[float] = field(default_factory=list)
    breakdowns: list[dict[str, float]] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)

    def run(self, url: str, folders: tuple[Path, Path], partial: dict[str, torch.Tensor],
            count: int, gap: float) -> None:
        for index in range(count):
            folder = folders[index % 2]
            began = time.perf_counter()
            report = push_weights([url], folder)
            ended = time.perf_counter()
            self.seconds.append(ended - began)
            self.breakdowns.append(report.breakdown)
            self.windows.append((began, ended))
            self.disk_seconds.append(disk_read_seconds(folder))
            began = time.perf_counter()
            push_weights([url], partial)
            self.partial_seconds.append(time.perf_counter() - began)
            self.windows.append((began, time.perf_counter()))
            time.sleep(gap)

    def figures(self, label: str) -> dict[str, float]:
        push, disk = statistics.median(self.seconds), statistics.median(self.disk_seconds)
        figures = {
            f"push_ms_p50_{label}": push * 1000,
            f"push_ms_p95_{label}": percentile(self.seconds, 0.95) * 1000,
            f"disk_read_ms_{label}": disk * 1000,
            f"push_over_disk_read_{label}": push / disk,
            f"partial_push_ms_p50_{label}": statistics.median(self.partial_seconds) * 1000,
        }
        for part in self.breakdowns[0]:
            figures[f"push_{part}_ms_p50_{label}"] = statistics.median(
                b[part] for b in self.breakdowns) * 1000
        return figures


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
    parser.add_argument("--pushes", type=int, default=10, help="pushes idle, and under load")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=200, help="requests per client thread")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between pushes")
    parser.add_argument("--width", type=int, default=None,
                        help="serve the model's architecture at this hidden size and MLP "
                             "width (random weights), to see how a push scales with size")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as vLLM's CPU worker reads; two threads on two busy cores thrash

    with tempfile.TemporaryDirectory(prefix="live-push-") as scratch:
        original = Path(scratch) / "original"
        if args.width:
            widened_copy(resolve_model_dir(args.model), args.width, original)
        else:
            shutil.copytree(resolve_model_dir(args.model), original)
        model_mb = sum(f.stat().st_size for f in original.glob("*.safetensors")) / 1e6
        perturbed = perturbed_copy(original, Path(scratch) / "perturbed")
        folders = (perturbed, original)
        partial = one_layer(original, layer=1)

        started = time.perf_counter()
        server = start_server(original, log_path=Path(scratch) / "server.log")
        start_s = time.perf_counter() - started
        try:
            Pushes().run(server.url, folders, partial, count=2, gap=0)  # warm up, untimed
            idle, loaded = Pushes(), Pushes()
            idle.run(server.url, folders, partial, args.pushes, args.gap)
            with RequestLoop([server.url], threads=args.threads, limit=args.limit) as load:
                time.sleep(1.0)  # some requests with no push in flight
                loaded.run(server.url, folders, partial, args.pushes, args.gap)
            push_weights([server.url], original)
            stop_started = time.perf_counter()
        finally:
            stop_server(server)
        # A restart is a stop and a start; the start was timed when the server came up.
        restart_s = (time.perf_counter() - stop_started) + start_s

    during, quiet = split_by_pushes(load.requests, loaded.windows)
    push_p50 = statistics.median(loaded.seconds)
    figures = {
        "model": args.model,
        "width": args.width,
        "model_mb": model_mb,
        "pushes": args.pushes,
        "requests_served": len(load.requests) - len(load.failed),
        "requests_failed": len(load.failed),
        **idle.figures("idle"),
        **loaded.figures("load"),
        "push_over_disk_read_target_max": 2.0,
        "request_ms_p50_during_push": statistics.median(during) * 1000 if during else None,
        "requests_during_push": len(during),
        "request_ms_p50_no_push": statistics.median(quiet) * 1000 if quiet else None,
        "restart_s": restart_s,
        "start_s": start_s,
    }
    print(f"model {args.model}: {args.pushes} pushes idle, {args.pushes} under "
          f"{args.threads} client threads")
    print(f"  requests served {figures['requests_served']}, failed {figures['requests_failed']}")
    for label in ("idle", "load"):
        print(f"  {label}: push (ours) p50 {figures[f'push_ms_p50_{label}']:7.1f} ms  "
              f"p95 {figures[f'push_ms_p95_{label}']:7.1f} ms   disk read (baseline) "
              f"{figures[f'disk_read_ms_{label}']:6.1f} ms   ratio "
              f"{figures[f'push_over_disk_read_{label}']:.1f} (target <= 2)")
        parts = ", ".join(f"{part} {figures[f'push_{part}_ms_p50_{label}']:.1f}"
                          for part in idle.breakdowns[0])
        print(f"        where it goes (ms): {parts};  one-layer push p50 "
              f"{figures[f'partial_push_ms_p50_{label}']:.1f} ms")
    print(f"  restart (baseline)     {restart_s * 1000:8.1f} ms")
    print(f"  request p50 during pushes {figures['request_ms_p50_during_push']} ms, "
          f"without {figures['request_ms_p50_no_push']} ms")
    print(json.dumps({"bench": "live_push", "figures": figures,
                      "headline": {"what": "server restart time / live push p50 under load",
                                   "ratio": restart_s / push_p50, "target": 100}}))


if __name__ == "__main__":
    main()
