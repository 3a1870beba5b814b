"""Does the dashboard keep up with a fast build? Events are appended to events.jsonl at
a fixed rate while the app follows the file headless (App.run_test, 80x24).

    python bench/dashboard.py [--rate 1000] [--seconds 10]

Two runs. Steady: events offered at `--rate` for `--seconds`; the lag behind the writer
is sampled every 0.1 s. Burst: the same number of events appended at once; the rate at
which the app folds and draws them is its capacity. Beside them, the bare state fold
(no tailing, no drawing), which bounds any front end on this state. Headline: the app's
capacity / 1000 events per second (>= 1: it keeps up with the issue's 1,000/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

from behaviorc.tui.state import BuildState
from behaviorc.tui.app import Dashboard

TASKS = ["model:base", "steer.extract:listen", "steer.verify:listen", "train:listen", "deploy:persona"]


def synthetic_events(count: int) -> list[dict]:
    """A build's shape: a plan, then mostly training steps with sweeps, pushes, progress."""
    events = [{"type": "build_start", "task": None, "spec": "bench.behavior", "out": "out/bench",
               "tasks": [{"id": t, "kind": t.split(":")[0], "key": str(i), "deps": []} for i, t in enumerate(TASKS)]},
              {"type": "task_start", "task": "train:listen", "kind": "train"}]
    step = 0
    while len(events) < count:
        step += 1
        events.append({"type": "train.step", "task": "train:listen", "step": step, "steps": 10**6,
                       "loss": 2.0 / (1 + step / 500), "lr": 3e-5})
        if step % 10 == 0:
            events.append({"type": "progress", "task": "train:listen", "done": step, "total": 10**6, "what": "steps"})
        if step % 50 == 0:
            events.append({"type": "train.eval", "task": "train:listen", "step": step, "margin": step / 1e4})
        if step % 100 == 0:
            events.append({"type": "push", "task": "deploy:persona", "url": "http://127.0.0.1:8000",
                           "ok": True, "ms": 33.0, "step": step})
            events.append({"type": "steer_sweep", "task": "steer.verify:listen", "strength": step % 8,
                           "margin": 0.1})
    return events[:count]


def write_at_rate(path: Path, events: list[dict], rate: float, written: list[int]) -> None:
    """Append events on schedule, in 10 ms slices, flushing each slice."""
    started = time.perf_counter()
    with open(path, "a", encoding="utf-8") as handle:
        done = 0
        while done < len(events):
            due = min(len(events), int((time.perf_counter() - started) * rate) + 1)
            if due > done:
                handle.write("".join(json.dumps({"t": time.time(), **e}) + "\n" for e in events[done:due]))
                handle.flush()
                done = due
                written[0] = done
            time.sleep(0.01)


async def run_burst(folder: Path, events: list[dict]) -> float:
    """Events per second the app processes when everything is already there."""
    app = Dashboard(folder)
    async with app.run_test(size=(80, 24)) as pilot:
        (folder / "events.jsonl").write_text("".join(json.dumps({"t": time.time(), **e}) + "\n" for e in events))
        started = time.perf_counter()
        while app.state.events_seen < len(events):
            await pilot.pause(0.01)
        seconds = time.perf_counter() - started
        await pilot.pause(0.2)
    return len(events) / seconds


def timed_redraws(app: Dashboard) -> list[float]:
    """Wrap the app's redraw to record how long each one takes."""
    seconds: list[float] = []
    redraw = app.redraw

    def timed() -> None:
        started = time.perf_counter()
        redraw()
        seconds.append(time.perf_counter() - started)

    app.redraw = timed
    return seconds


async def run_app(folder: Path, events: list[dict], rate: float) -> dict:
    app = Dashboard(folder)
    redraws = timed_redraws(app)
    written = [0]
    lags: list[float] = []
    async with app.run_test(size=(80, 24)) as pilot:
        writer = threading.Thread(target=write_at_rate, args=(folder / "events.jsonl", events, rate, written))
        started = time.perf_counter()
        writer.start()
        while app.state.events_seen < len(events):
            await pilot.pause(0.1)
            lags.append(max(written[0] - app.state.events_seen, 0) / rate)
            if time.perf_counter() - started > len(events) / rate * 10 + 30:
                break  # hopelessly behind: report what it did
        processed_s = time.perf_counter() - started
        writer.join()
        seen = app.state.events_seen
        await pilot.pause(0.2)  # let the last redraw happen with the app still running
    return {"seen": seen, "seconds": processed_s, "lags": lags, "redraws": sorted(redraws)}


def fold_rate(events: list[dict]) -> float:
    lines = [json.dumps({"t": 0.0, **e}) for e in events]
    started = time.perf_counter()
    state = BuildState()
    for line in lines:
        state.apply(json.loads(line))
    return len(lines) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second offered")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    events = synthetic_events(int(args.rate * args.seconds))

    with tempfile.TemporaryDirectory() as tmp:
        steady, burst = Path(tmp) / "steady", Path(tmp) / "burst"
        steady.mkdir(), burst.mkdir()
        (steady / "events.jsonl").write_text("")
        result = asyncio.run(run_app(steady, events, args.rate))
        capacity = asyncio.run(run_burst(burst, events))

    processed_rate = result["seen"] / result["seconds"]
    lags = sorted(result["lags"]) or [0.0]
    p95 = lags[int(0.95 * (len(lags) - 1))]
    bare = fold_rate(events)
    redraws = result["redraws"] or [0.0]
    redraw_p95 = redraws[int(0.95 * (len(redraws) - 1))]
    print(f"{len(events)} events offered at {args.rate:.0f}/s over {args.seconds:.0f} s")
    print(f"  steady: processed     {processed_rate:10.0f} events/s  ({result['seen']}/{len(events)}), "
          f"lag p95 {p95 * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms")
    print(f"  redraw (10 per second) p95 {redraw_p95 * 1000:.1f} ms, max {redraws[-1] * 1000:.1f} ms")
    print(f"  burst: app capacity   {capacity:10.0f} events/s")
    print(f"  bare state fold       {bare:10.0f} events/s  (no tailing, no drawing)")
    print(json.dumps({
        "bench": "dashboard",
        "figures": {"offered_per_s": args.rate, "steady_processed_per_s": round(processed_rate, 1),
                    "events": len(events), "events_seen": result["seen"],
                    "lag_p95_ms": round(p95 * 1000, 1), "lag_max_ms": round(lags[-1] * 1000, 1),
                    "redraw_p95_ms": round(redraw_p95 * 1000, 2), "redraw_max_ms": round(redraws[-1] * 1000, 2),
                    "burst_capacity_per_s": round(capacity, 1), "bare_fold_per_s": round(bare, 1)},
        "headline": {"what": "events/s the dashboard can process (burst) / 1000 per second",
                     "ratio": round(capacity / 1000.0, 2), "target": 1.0},
    }))


if __name__ == "__main__":
    main()
