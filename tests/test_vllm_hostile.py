"""One client cannot break the live server for the others (issue 31, finding 4): every
steering input is checked before anything changes, worker calls are limited to
behaviorc's methods and sizes, and vLLM's other development routes are closed. Each
case runs against the session's real vLLM server, which must serve as before."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from behaviorc.engine.vllm.client import VLLMEngine
from behaviorc.engine.vllm.named_vectors import registered_vectors

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(vllm_server):
    with VLLMEngine(vllm_server.url) as engine:
        hidden, layers = engine.info.hidden_size, engine.info.num_layers
        engine.clear_steering()
        yield vllm_server, engine, hidden, layers
        engine.clear_steering()


def rpc(url: str, method: str, payload: str | None = None) -> httpx.Response:
    body = {"method": method, "args": [] if payload is None else [payload]}
    return httpx.post(f"{url}/collective_rpc", json=body, timeout=60)


def answer(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def still_serves(engine: VLLMEngine, expected: list[str]) -> None:
    assert engine.generate(["Hello"], max_new_tokens=4) == expected
    assert isinstance(registered_vectors(engine.client), dict)


def test_bad_steering_is_refused_whole_and_the_server_serves_on(server):
    live, engine, hidden, _ = server
    plain = engine.generate(["Hello"], max_new_tokens=4)
    assert plain != [""]
    good = {"0": [0.01] * hidden}
    assert answer(rpc(live.url, "behaviorc_set_steering",
                      json.dumps({"strength": 1.0, "vectors": good})))["layers"] == [0]
    cases = {
        "NaN strength": '{"strength": NaN, "vectors": {"0": [0.5]}}'.replace("[0.5]", json.dumps([0.5] * hidden)),
        "1e309 value": '{"strength": 1.0, "vectors": {"0": [1e309' + ", 0.0" * (hidden - 1) + "]}}",
        "overflow by the strength": json.dumps({"strength": 1e30, "vectors": {"0": [1e10] * hidden}}),
        "integer values": json.dumps({"strength": 1.0, "vectors": {"0": [1] * hidden}}),
        "a short vector": json.dumps({"strength": 1.0, "vectors": {"0": [0.5]}}),
    }
    for case, payload in cases.items():
        refused = rpc(live.url, "behaviorc_set_steering", payload)
        assert refused.status_code >= 400, case
    # the steering set before every refusal is the one still in place: one layer hooked
    assert answer(rpc(live.url, "behaviorc_clear_steering")) == {"removed": 1}
    still_serves(engine, plain)


def test_named_vectors_out_of_range_or_not_float_change_nothing(server):
    live, engine, hidden, _ = server
    plain = engine.generate(["Hello"], max_new_tokens=4)
    for values in ([1e39] * hidden, [1] * hidden, [True] * hidden):
        refused = answer(rpc(live.url, "behaviorc_steer_register",
                             json.dumps({"name": "bad", "vectors": {"0": values}})))
        assert refused["ok"] is False and "bad" not in registered_vectors(engine.client)
    # the largest float32 values are taken, and listing them stays valid JSON for everyone
    big = answer(rpc(live.url, "behaviorc_steer_register",
                     json.dumps({"name": "huge", "vectors": {"0": [3e38] * hidden}})))
    try:
        assert big["ok"], big
        listed = registered_vectors(engine.client)
        assert listed["huge"]["norms"]["0"] == pytest.approx(3e38 * hidden ** 0.5)
    finally:
        assert answer(rpc(live.url, "behaviorc_steer_unregister", json.dumps({"name": "huge"})))["ok"]
    still_serves(engine, plain)


def test_only_behaviorcs_worker_methods_and_routes_are_open(server, tmp_path):
    live, engine, _, _ = server
    plain = engine.generate(["Hello"], max_new_tokens=4)
    refused = rpc(live.url, "save_sharded_state", str(tmp_path / "stolen"))
    assert refused.status_code == 403 and "save_sharded_state" in refused.text
    assert not (tmp_path / "stolen").exists()
    assert rpc(live.url, "_behaviorc_install", "{}").status_code == 403
    for path in ("/sleep", "/pause", "/server_info", "/update_weights"):
        assert httpx.post(f"{live.url}{path}", timeout=30).status_code == 403, path
    assert httpx.post(f"{live.url}/collective_rpc", timeout=30,
                      json={"method": "behaviorc_info", "args": [1, 2]}).status_code == 400
    still_serves(engine, plain)


def test_an_oversized_worker_call_is_refused_before_its_body_is_read(server):
    live, engine, _, _ = server
    plain = engine.generate(["Hello"], max_new_tokens=4)
    parts = urlsplit(live.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as connection:
        connection.sendall(b"POST /collective_rpc HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
                           b'{"method": "behaviorc_steer_register", "args": ["')
        # 100 MB announced, 50 bytes sent: the answer comes without the rest
        status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large" or b" 413 " in status_line
    still_serves(engine, plain)


# ---- a fuzzer for the worker calls: whatever a client sends, the server answers it,
# changes nothing unless everything was right, and serves the others as before.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ODD_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**40, 10**40), st.booleans(),
    st.sampled_from([3.4e38, -3.4e38, 1e39, 1e-45, -0.0]), st.text(max_size=3), st.none())


@st.composite
def steering_payloads(draw, hidden: int, layers: int) -> tuple[str, dict]:
    """A registration or a server-wide steering, mostly well-formed, sometimes not."""
    keys = draw(st.lists(st.one_of(st.integers(-2, layers + 2).map(str), st.sampled_from(["x", "1.5", ""])),
                         min_size=0, max_size=3, unique=True))
    vectors = {}
    for key in keys:
        size = draw(st.sampled_from([hidden, hidden, hidden - 1, 0]))
        base = draw(st.floats(-1, 1))
        values = [base] * size
        for _ in range(draw(st.integers(0, 2)) if size else 0):
            values[draw(st.integers(0, size - 1))] = draw(ODD_NUMBERS)
        vectors[key] = values
    if draw(st.booleans()):
        name = draw(st.one_of(st.just("fuzzed"), st.text(max_size=5)))
        return "behaviorc_steer_register", {"name": name, "vectors": vectors}
    strength = draw(st.one_of(st.floats(-10, 10), ODD_NUMBERS))
    return "behaviorc_set_steering", {"strength": strength, "vectors": vectors}


def test_fuzzed_steering_calls_never_break_the_server(server):
    live, engine, hidden, layers = server
    plain = engine.generate(["Hello"], max_new_tokens=4)

    @settings(max_examples=15, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(steering_payloads(hidden, layers))
    def one_call(call):
        method, payload = call
        before = registered_vectors(engine.client)
        response = rpc(live.url, method, json.dumps(payload, allow_nan=True))
        assert response.status_code in (200, 400, 500), response.text
        ok = response.status_code == 200 and (response.json()["results"][0] or {}).get("ok", True)
        after = registered_vectors(engine.client)  # valid JSON for everyone, always
        if method == "behaviorc_steer_register":
            if ok:
                assert after[payload["name"]]["norms"]
                answer(rpc(live.url, "behaviorc_steer_unregister", json.dumps({"name": payload["name"]})))
            else:
                assert after == before
        else:
            removed = answer(rpc(live.url, "behaviorc_clear_steering"))["removed"]
            assert removed == (len(payload["vectors"]) if ok else 0)
        assert engine.generate(["Hello"], max_new_tokens=4) == plain

    one_call()
