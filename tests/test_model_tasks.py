"""The ResolveModel plan task, run by the real executor."""

import shutil

from behaviorc.core.diagnostics import Location
from behaviorc.core.ir import ModelDecl
from behaviorc.pipeline.kinds import ResolveModel
from behaviorc.pipeline.executor import Executor

SPEC_LOC = Location(file="specs/x.behavior", line=1, column=14, end_line=1, end_column=24)


def _resolve(out, source, kind):
    task = ResolveModel(name="base", decl=ModelDecl(name="base", source=source, kind=kind, loc=SPEC_LOC))
    return Executor(out).run([task]).record(task.id)


def test_builtin_resolves(tmp_path, tiny_gdn):
    record = _resolve(tmp_path / "out", "tiny-gdn", "builtin")
    assert record.status == "done"
    data = record.result.data
    assert data["path"] == str(tiny_gdn)
    assert (data["architecture"], data["num_layers"]) == ("Qwen3NextForCausalLM", 4)
    assert data["layer_kinds"] == ["gdn", "gdn", "gdn", "attention"]


def test_broken_folder_fails_with_the_spec_location(tmp_path, tiny_dense):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dense, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    record = _resolve(tmp_path / "out", str(folder), "folder")
    assert record.status == "failed" and not record.internal
    assert "truncated" in record.error
    assert record.loc == SPEC_LOC
