"""Server lifecycle and failure paths of the vLLM client.

A server killed in the middle of a push is a real process that dies with SIGKILL when
the push request reaches it (tests/stand_in_server.py): starting a second vLLM (about a
minute here) only to kill it would test the same socket behaviour.
"""

from __future__ import annotations

import pytest

from stand_in_server import stand_in_server

from behaviorc.cli import main
from behaviorc.core.catalog import BUILTIN_MODELS
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.vllm.push import push_weights
from behaviorc.engine.vllm.server import server_command, start_server


def test_server_killed_mid_push_gives_a_clear_error(tiny_dense):
    with stand_in_server("die") as (url, process):
        with pytest.raises(BehaviorError, match=f"lost the vLLM server at {url} while pushing"):
            push_weights([url], tiny_dense)
        assert process.wait(timeout=10) == -9  # it really was killed during the push


def test_server_that_stops_answering_times_out(tiny_dense):
    with stand_in_server("hang") as (url, _):
        with pytest.raises(BehaviorError, match="did not answer in time while pushing"):
            push_weights([url], tiny_dense, timeout=2.0)


def test_public_host_needs_an_api_key():
    with pytest.raises(BehaviorError, match="refusing to serve on `0.0.0.0` without an API key"):
        start_server("tiny-gdn", host="0.0.0.0")


def test_unknown_model_is_named_with_a_hint(tmp_path):
    with pytest.raises(BehaviorError) as caught:
        start_server("tiny-gnd")
    assert "no model folder `tiny-gnd`" in caught.value.render()
    assert "did you mean `tiny-gdn`?" in caught.value.render()


def test_api_key_guards_every_route_but_health(monkeypatch, tiny_gdn):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from behaviorc.engine.vllm.inside.middleware import API_KEY_ENV, guard_all_routes

    command = server_command(tiny_gdn, "0.0.0.0", 8000, api_key="secret")
    middlewares = [command[i + 1] for i, arg in enumerate(command) if arg == "--middleware"]
    # Added last, so Starlette runs it first: nothing else sees an unauthorized request.
    assert middlewares[-1] == "behaviorc.engine.vllm.inside.middleware.guard_all_routes"
    monkeypatch.setenv(API_KEY_ENV, "secret")
    app = FastAPI()
    app.middleware("http")(guard_all_routes)
    app.get("/health")(lambda: {})
    app.post("/collective_rpc")(lambda: {"results": []})
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert client.post("/collective_rpc").status_code == 401
    assert client.post("/collective_rpc",
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/collective_rpc",
                       headers={"Authorization": "Bearer secret"}).status_code == 200


def test_serve_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "behaviorc serve smollm2-135m" in text
    assert "--api-key" in text and "--eager" in text
    assert all(name in text for name in BUILTIN_MODELS)


def test_servers_compile_unless_asked_to_run_eager(tiny_gdn):
    """Compiled by default, with behaviorc's loader (the steering tables must be hooked
    on before vLLM traces the model) and a compile-cache key of its own."""
    compiled = server_command(tiny_gdn, "127.0.0.1", 8000, None)
    assert "--enforce-eager" not in compiled
    assert compiled[compiled.index("--load-format") + 1] == "behaviorc"
    assert "behaviorc" in compiled[compiled.index("--additional-config") + 1]
    eager = server_command(tiny_gdn, "127.0.0.1", 8000, None, eager=True)
    assert "--enforce-eager" in eager and "--load-format" in eager
    assert "--additional-config" not in eager


def test_tensor_parallel_size_passes_through_to_vllm(tiny_gdn):
    assert "--tensor-parallel-size" not in server_command(tiny_gdn, "127.0.0.1", 8000, None)
    command = server_command(tiny_gdn, "127.0.0.1", 8000, None, tensor_parallel_size=2)
    assert command[command.index("--tensor-parallel-size") + 1] == "2"


def test_serve_refuses_more_shards_than_devices(capsys):
    import os

    too_many = len(os.sched_getaffinity(0)) + 1
    assert main(["serve", "tiny-gdn", "--tensor-parallel-size", str(too_many)]) == 1
    error = capsys.readouterr().err
    assert f"--tensor-parallel-size {too_many}: this machine has" in error and "starting vLLM" not in error
