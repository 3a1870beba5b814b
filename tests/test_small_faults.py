"""The smaller faults of issue 31 (finding 8), one test each: what a person reads when
the disk is full, a symlinked spec formatted, artifacts other users read, keys that
cannot be sent, and steering files that are not what they seem."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file

from behaviorc.pipeline.executor import Executor
from behaviorc.cli import main
from behaviorc.core.atomic import atomic_folder, write_text_atomic
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.task import Task, TaskContext, TaskResult


class FillsTheDisk(Task):
    kind: ClassVar[str] = "test.fills_the_disk"

    def execute(self, ctx: TaskContext) -> TaskResult:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ctx.out / "model.safetensors"))


def test_a_full_disk_is_named_not_called_a_bug(tmp_path):
    outcome = Executor(tmp_path / "out").run([FillsTheDisk(name="t")])
    [record] = outcome.failed
    assert "No space left on device" in record.error and "model.safetensors" in record.error
    assert "free some space" in record.error
    assert not record.internal and record.log is None  # no traceback to look up


def test_fmt_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "specs" / "real.behavior"
    real.parent.mkdir()
    real.write_text('model base="tiny-gdn"\n')
    link = tmp_path / "link.behavior"
    link.symlink_to(real)
    assert main(["fmt", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == real
    assert real.read_text() == 'model base = "tiny-gdn"\n'


def test_artifacts_get_the_modes_of_ordinary_files(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.json", "{}")
        with atomic_folder(tmp_path / "model") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


@pytest.mark.parametrize("key", ["clé", "two words", "tab\there"])
def test_a_key_that_cannot_be_sent_is_a_clear_error(key, monkeypatch):
    from behaviorc.engine.vllm.http import ServerClient
    from behaviorc.engine.vllm.server import start_server

    with pytest.raises(BehaviorError, match="not one word of printable ASCII"):
        ServerClient("http://127.0.0.1:9", api_key=key)
    monkeypatch.setenv("BEHAVIORC_API_KEY", key)
    with pytest.raises(BehaviorError, match="not one word of printable ASCII"):
        ServerClient("http://127.0.0.1:9")
    with pytest.raises(BehaviorError, match="not one word of printable ASCII"):
        start_server("tiny-gdn", api_key=key)  # before any server starts


def test_steering_files_that_are_not_regular_or_not_float(tmp_path):
    from behaviorc.formats.steering import load_steering

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(BehaviorError, match="is not a regular file"):
        load_steering(fifo)
    with pytest.raises(BehaviorError, match="does not exist"):
        load_steering(tmp_path / "missing.safetensors")
    save_file({"layer.1": torch.arange(8)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(BehaviorError, match="tensor `layer.1` has dtype int64; steering vectors are floating"):
        load_steering(tmp_path / "ints.safetensors")


def test_a_megabyte_text_is_refused_from_its_length_before_tokenizing(tiny_gdn):
    """Issue 31 finding 7: a 1 MiB line cost ~300 MB and seconds of tokenizing only to be
    refused as too long; its length alone shows it cannot fit."""
    from behaviorc.engine.embedded import EmbeddedEngine

    engine = EmbeddedEngine.load(tiny_gdn, device="cpu")
    huge = "word " * 210_000
    with pytest.raises(BehaviorError, match=r"is at least \d+ tokens long \(1050004 characters\), "
                                            r"more than the model's context of 2048 positions"):
        engine.completion_logprobs([huge], [" yes"])
    with pytest.raises(BehaviorError, match="is at least"):
        engine.generate([huge], max_new_tokens=1)
