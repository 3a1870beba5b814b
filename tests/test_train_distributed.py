"""Training under torch.distributed (FSDP2 on gloo, two processes on this CPU) against
one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from behaviorc.model.adapter import ArchitectureAdapter
from behaviorc.model.loading import load_model
from behaviorc.train.data import BatchSchedule, encode_examples
from behaviorc.train.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import spec  # noqa: E402

pytestmark = pytest.mark.processes

WORKER = Path(__file__).parent / "distributed_worker.py"


def launch(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def train_one_process(model_path: Path, optimizer: str, checkpoint: Path | None = None,
                      stop_at: int | None = None) -> dict[str, torch.Tensor] | None:
    """The worker's training in this process; None when stopped after step `stop_at`."""
    from distributed_worker import CHECKPOINT_EVERY

    model, tokenizer = load_model(model_path, "float32", "cpu")
    train_spec = spec(optimizer)
    targets = ArchitectureAdapter.for_model(model).parameters(model, train_spec.targets)
    before = {name: param.detach().clone() for name, param in targets.items()}
    schedule = BatchSchedule(encode_examples(tokenizer, train_spec.examples), [], train_spec.batch, 0.0, 0)

    def on_step(event):
        if event.step == stop_at:
            raise KeyboardInterrupt  # killed mid-training
    try:
        train(model, targets, schedule, train_spec, pad_id=tokenizer.pad_token_id, on_step=on_step,
              checkpoint_dir=checkpoint, checkpoint_every=CHECKPOINT_EVERY)
    except KeyboardInterrupt:
        return None
    for name, param in targets.items():
        assert not torch.equal(param, before[name]), name  # trained, not merely both untouched
    return {name: param.detach().clone() for name, param in targets.items()}


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        # atol: Adam's first steps divide by |g|, so an element whose gradient is near
        # zero moves by up to lr on a rounding difference of the reduction order
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=atol,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


@pytest.mark.parametrize("optimizer", ["apollo", "adamw"])
def test_two_processes_train_the_weights_of_one(tiny_dense, tmp_path, optimizer):
    from safetensors.torch import load_file

    out = tmp_path / "two.safetensors"
    run = launch(2, str(WORKER), str(tiny_dense), optimizer, str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_weights(load_file(out), train_one_process(tiny_dense, optimizer))


@pytest.mark.parametrize("model", [pytest.param("smollm2", marks=pytest.mark.real_model), "tiny_gdn"])
def test_each_process_reads_the_shards_of_the_model_loaded_whole(model, request):
    """smollm2-135m ties its head to its embeddings; tiny-gdn's files hold its experts
    one by one where the model fuses them, so it is loaded whole, then sharded (a plain
    dense model is both's simpler case)."""
    run = launch(2, str(WORKER), str(request.getfixturevalue(model)), "load")
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_one_process_checkpoint_resumes_on_two(tiny_dense, tmp_path):
    from safetensors.torch import load_file

    checkpoint, out = tmp_path / "checkpoint", tmp_path / "two.safetensors"
    assert train_one_process(tiny_dense, "apollo", checkpoint, stop_at=3) is None  # step 2's left behind
    run = launch(2, str(WORKER), str(tiny_dense), "apollo", str(out), str(checkpoint))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_weights(load_file(out), train_one_process(tiny_dense, "apollo"))


# --- builds -------------------------------------------------------------------------------

SPEC = """model base = "tiny-dense"

behavior listen {{
  train {{
    examples "listen.jsonl"
    lr 1e-3
    steps {steps}
    batch 4
    targets attn.q, attn.o, mlp
    optimizer apollo {{ rank 16  refresh 20 }}
  }}
}}
"""


DISTILL_SPEC = """model base = "tiny-dense"

behavior listen {
  steer {
    layers 1
    strength 4.0
    pairs "listen_pairs.jsonl"
  }
  train {
    distill steering { prompts "distill_prompts.jsonl"  samples 2  max_tokens 8 }
    lr 1e-3
    steps 6
    batch 4
    targets attn.q, mlp
    optimizer apollo { rank 16 }
  }
  eval { pairs "listen_eval.jsonl" }
}
"""


def write_spec(folder: Path, steps: int, text: str = SPEC) -> Path:
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for data in ("listen.jsonl", "listen_pairs.jsonl", "listen_eval.jsonl", "distill_prompts.jsonl"):
        shutil.copy(Path(__file__).parents[1] / "specs" / "data" / data, folder)
    spec = folder / "train.behavior"
    spec.write_text(text.format(steps=steps) if text is SPEC else text)
    return spec


def build(spec: Path, out: Path, *options: str, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "behaviorc.cli", "build", str(spec), "--out", str(out), *options]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def train_task(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    return next(t for t in report["tasks"] if t["id"] == "train:listen")


def trained_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / ".store" / train_task(out)["key"] / "model" / "model.safetensors")


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_builds(tmp_path_factory, tiny_dense):
    """The reference: the test specs built the usual way, in one process."""
    root = tmp_path_factory.mktemp("reference")
    outs = {}
    for steps in (6, 54):
        out = root / f"out{steps}"
        run = build(write_spec(root / f"spec{steps}", steps), out)
        assert run.returncode == 0, run.stderr[-3000:]
        outs[steps] = out
    return outs


def test_a_build_on_two_processes_stores_the_model_of_one(tmp_path, one_process_builds):
    out = tmp_path / "out"
    run = build(write_spec(tmp_path, 6), out, "--nproc", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "built: 3 done" in run.stdout
    steps = [e["step"] for e in events(out) if e["type"] == "train.step"]
    assert steps == [1, 2, 3, 4, 5, 6]  # reported once, by rank 0
    assert_same_weights(trained_weights(out), trained_weights(one_process_builds[6]))


def test_a_distilled_behavior_trains_on_two_processes_to_the_weights_of_one(tmp_path):
    """Rank 0 samples the steered model; the samples travel to the other rank as token
    ids, and the steered teacher's distributions over them (`objective kl`, the default)
    as rank 0 read them, so both train on the batches one process would. With activation
    matching (on here: its loss adds a term to the KL) each rank computes the steered
    targets with its sharded model, and the term is normalised over the whole batch, as
    in one process."""
    reference, out = tmp_path / "reference", tmp_path / "out"
    text = DISTILL_SPEC.replace("max_tokens 8", "max_tokens 8  match_activations 1.0")
    spec = write_spec(tmp_path / "spec", 6, text)
    alone = build(spec, reference)
    assert alone.returncode == 0, alone.stderr[-3000:]
    run = build(spec, out, "--nproc", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not [e for e in events(out) if e["type"] == "train.note"]
    steps = [e for e in events(out) if e["type"] == "train.step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    # the reported loss is the whole batch's, the matching term included
    expected = [e["loss"] for e in events(reference) if e["type"] == "train.step"]
    assert [e["loss"] for e in steps] == pytest.approx(expected, rel=1e-5)
    # Here the matching term's targets are read by each rank's sharded model, so rounding
    # enters the gradients and not only their reduction order: on an AMD EPYC one element
    # in 16,384 ended 1.08e-5 from one process's (lr 1e-3). A lost or doubled shard of the
    # batch would move most elements by a sizeable part of lr.
    assert_same_weights(trained_weights(out), trained_weights(reference), atol=1e-4)
    assert "seconds_targets" in train_task(reference)["metrics"]  # the matching ran


def _rank_pid(parent: int, rank: int) -> int | None:
    """The launched process of `rank` under `parent` (the build's launcher), which
    starts them in rank order as multiprocessing spawns."""
    ranks = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == parent and b"spawn_main" in command:
            ranks.append((int(stat[19]), int(entry.name)))  # by start time
    ranks.sort()
    return ranks[rank][1] if len(ranks) > rank else None


def test_a_killed_distributed_build_resumes_on_one_process_to_the_same_weights(tmp_path, one_process_builds):
    import signal
    import time

    spec, out = write_spec(tmp_path, 54), tmp_path / "out"
    process = build(spec, out, "--nproc", "2", wait=False)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None:
        done = [e["step"] for e in events(out) if e["type"] == "train.step"] if (out / "events.jsonl").exists() else []
        if done and done[-1] >= 51:  # past the checkpoint of step 50
            break
        time.sleep(0.2)
    victim = _rank_pid(process.pid, 1)
    assert victim is not None, process.communicate()[1][-3000:]
    os.kill(victim, signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "process 1 of 2 was killed by SIGKILL; the launcher stopped the others" in stderr
    assert not list((out / ".store").glob("*/model"))  # nothing of the training was stored

    resumed = build(spec, out, "--nproc", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = next(e for e in events(out) if e["type"] == "task_end" and e["task"] == "train:listen"
                  and e["status"] == "done")
    assert record["data"]["resumed_from"] == 50
    assert_same_weights(trained_weights(out), trained_weights(one_process_builds[54]))


def test_more_processes_than_cores_is_refused(tmp_path):
    run = build(write_spec(tmp_path, 6), tmp_path / "out", "--nproc", str(len(os.sched_getaffinity(0)) + 1))
    assert run.returncode == 1 and "usable CPU core" in run.stderr and "each process needs its own" in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_distributed_build_stopped_from_the_dashboard_stops_every_process(tmp_path):
    """The dashboard's stop (a cancel file) reaches rank 0, which stops every rank at the
    same step: the build ends cancelled (130) with nothing left running."""
    import time

    out = tmp_path / "out"
    process = build(write_spec(tmp_path, 54), out, "--nproc", "2", wait=False)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "events.jsonl").exists() and any(e["type"] == "train.step" for e in events(out)):
            break
        time.sleep(0.2)
    (out / "cancel").write_text("requested by the test\n")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "stopped" in stderr and "Traceback" not in stderr
    end = next(e for e in events(out) if e["type"] == "task_end" and e["task"] == "train:listen")
    assert end["status"] == "cancelled"
    assert events(out)[-1]["type"] == "build_end"
