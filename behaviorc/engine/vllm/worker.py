"""behaviorc's extension of the vLLM worker: steering hooks and validated weight pushes.

vLLM mixes this class into its worker class when the server is started with
`--worker-extension-cls behaviorc.engine.vllm.worker.BehaviorWorker`, and
`POST /collective_rpc {"method": ..., "args": [...]}` calls its methods inside every
worker process. The HTTP route passes only strings, so every method takes JSON text and
answers with plain JSON-able values.

Steering. vLLM's decoder layers return `(hidden, residual)` and the next layer's fused
add-norm makes `hidden + residual` the residual stream. Adding `strength * vector` to the
returned `hidden` therefore adds it to the residual stream at the output of that layer,
which is what steering at layer L means in transformers too.

Weights. A push is staged, then committed. Staging reads every pushed tensor once,
checking names, shapes and dtypes against the served checkpoint and that every value is
finite, leaves out the decoder layers whose values did not change, and completes each
layer the push changes with the served values of its other tensors (vLLM rebuilds a
fused module, e.g. qkv or the MoE experts, from all of its parts). Committing feeds those checkpoint-format tensors to vLLM's own
`load_weights`, under vLLM's layerwise reload set up for only the modules they belong
to, so vLLM fuses and repacks them into its kernel layouts. The worker remembers where
each served value can be read again (the model folder, a pushed folder, or memory for a
pushed state dict), so a rollback loads the previous values of the same tensors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from behaviorc.engine.vllm.weights import ServedWeights, layer_group
from behaviorc.engine.vllm.live_steer import NamedSteering


def _layer_kinds(config: Any, count: int) -> list[str]:
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * count
    return ["gdn" if kind == "linear_attention" else "attention" for kind in kinds[:count]]


class BehaviorWorker(NamedSteering):
    """Methods vLLM adds to its worker; reached through `POST /collective_rpc`. The
    registry of named vectors steered per request comes from `NamedSteering`."""

    # --- state, created on first use (vLLM never calls an extension's __init__) ---

    def _behaviorc_served(self) -> ServedWeights:
        served = getattr(self, "_behaviorc_weights", None)
        if served is None:
            served = ServedWeights.of_folder(Path(self.model_runner.model_config.model))
            self._behaviorc_weights = served
        return served

    def _behaviorc_decoder_layers(self) -> list[Any]:
        model = self.model_runner.get_model()
        if hasattr(model, "get_language_model"):  # a vision-language model: its text model
            model = model.get_language_model()
        return list(model.model.layers)

    # --- model description ---

    def _behaviorc_text_config(self) -> Any:
        config = self.model_runner.model_config.hf_config
        return getattr(config, "text_config", config)

    def behaviorc_info(self) -> dict[str, Any]:
        config = self.model_runner.model_config.hf_config
        count = len(self._behaviorc_decoder_layers())
        return {
            "path": str(self.model_runner.model_config.model),
            "architecture": (getattr(config, "architectures", None) or ["?"])[0],
            "num_layers": count,
            "hidden_size": int(self._behaviorc_text_config().hidden_size),
            "layer_kinds": _layer_kinds(self._behaviorc_text_config(), count),
            "dtype": str(self.model_runner.model_config.dtype).removeprefix("torch."),
            "start_token_id": self._behaviorc_start_token_id(),
        }

    def _behaviorc_start_token_id(self) -> int | None:
        """The token an empty prompt starts from: BOS, else EOS (as the embedded engine)."""
        from transformers import AutoTokenizer

        model_config = self.model_runner.model_config
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer, trust_remote_code=model_config.trust_remote_code)
        start = tokenizer.bos_token_id
        return start if start is not None else tokenizer.eos_token_id

    # --- steering ---

    def behaviorc_set_steering(self, payload: str) -> dict[str, Any]:
        """payload: {"strength": float, "vectors": {"layer": [floats]}}; replaces all steering."""
        import torch

        request = json.loads(payload)
        strength = request.get("strength") if isinstance(request, dict) else None
        if type(strength) not in (int, float) or not math.isfinite(strength):
            raise ValueError(f"the steering strength must be a finite number, not {strength!r}")
        # Everything is checked before the steering in place is touched: a refused
        # request leaves it as it was.
        problems = self._behaviorc_vector_problems("steering", request.get("vectors"), strength)
        if problems:
            raise ValueError("; ".join(problems))
        layers = self._behaviorc_decoder_layers()
        additions = {int(key): values for key, values in request["vectors"].items()}
        self.behaviorc_clear_steering()
        handles = []
        for index, values in additions.items():
            layer = layers[index]
            reference = next(layer.parameters())
            delta = torch.tensor(values, dtype=torch.float32) * strength
            delta = delta.to(device=reference.device, dtype=reference.dtype)
            handles.append(layer.register_forward_hook(_steering_hook(delta)))
        self._behaviorc_hooks = handles
        return {"layers": sorted(additions), "strength": strength}

    def behaviorc_clear_steering(self) -> dict[str, Any]:
        handles = getattr(self, "_behaviorc_hooks", [])
        for handle in handles:
            handle.remove()
        self._behaviorc_hooks = []
        return {"removed": len(handles)}

    # --- weights ---

    def behaviorc_stage(self, payload: str) -> dict[str, Any]:
        """payload: {"token", "path": folder, "complete": bool, "transient": bool}. Checks
        the weights and reads them for `behaviorc_commit`; changes nothing served."""
        request = json.loads(payload)
        problems = self._behaviorc_served().stage(
            str(request["token"]), Path(request["path"]), bool(request["complete"]),
            bool(request["transient"]))
        return {"ok": not problems, "problems": problems}

    def behaviorc_commit(self, payload: str) -> dict[str, Any]:
        """payload: {"token"}. Load the staged weights. If vLLM fails part-way, the
        previous values of the same tensors are loaded back and the answer says what
        failed."""
        token = json.loads(payload)["token"]
        served = self._behaviorc_served()
        staged = served.staged
        if staged is None or staged.token != token:
            return {"ok": False, "problems": ["another push was staged since this one was "
                                              "checked; nothing changed"]}
        served.staged = None
        previous = {name: served.sources[name] for name in staged.tensors}
        started = time.perf_counter()
        try:
            self._behaviorc_load(staged.tensors)
        except Exception as err:  # vLLM's loader fails in many ways; all mean: roll back
            self._behaviorc_load(served.read(previous))
            return {"ok": False, "problems": [f"vLLM could not load the weights: {err!r}; "
                                              f"the previous weights are back"]}
        served.sources.update(staged.sources)
        served.previous, served.previous_token = previous, token
        return {"ok": True, "tensors": len(staged.tensors), "pushed": staged.pushed,
                "seconds": {"read": staged.read_seconds,
                            "load": time.perf_counter() - started}}

    def behaviorc_push(self, payload: str) -> dict[str, Any]:
        """Stage and commit in one call (a push to a single server)."""
        staged = self.behaviorc_stage(payload)
        return self.behaviorc_commit(payload) if staged["ok"] else staged

    def behaviorc_discard(self, payload: str) -> dict[str, Any]:
        """payload: {"token"}. Drop that staged push (another replica refused it)."""
        served = self._behaviorc_served()
        if served.staged is not None and served.staged.token == json.loads(payload)["token"]:
            served.staged = None
        return {"ok": True}

    def behaviorc_rollback(self, payload: str) -> dict[str, Any]:
        """payload: {"token"}. Undo that push, the last one committed (another replica
        refused it)."""
        served = self._behaviorc_served()
        if not served.previous or served.previous_token != json.loads(payload)["token"]:
            return {"ok": False, "problems": ["the push to undo is not the last one here"]}
        self._behaviorc_load(served.read(served.previous))
        served.sources.update(served.previous)
        served.previous, served.previous_token = {}, ""
        return {"ok": True}

    def _behaviorc_load(self, tensors: dict[str, Any]) -> None:
        """Load checkpoint-format tensors through vLLM's own `load_weights`.

        vLLM's layerwise reload puts each module back in checkpoint layout, lets the
        model's loader fuse the parts into it, and re-runs the module's post-load
        processing (CPU GEMM packing, for one) once all its parts arrived. Setting it up
        only for the modules these tensors belong to that vLLM transforms after loading,
        not for the whole model as vLLM's `reload_weights` does, keeps a push's cost
        proportional to its size.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload, initialize_layerwise_reload)

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config), _narrowing_unremarked():
            for module in _modules_to_reprocess(model, tensors):
                initialize_layerwise_reload(module)
            model.load_weights(iter(tensors.items()))
            finalize_layerwise_reload(model, self.model_runner.model_config)
        self._behaviorc_repack_cpu_experts(set(tensors))

    def _behaviorc_repack_cpu_experts(self, loaded: set[str]) -> None:
        """Work around vLLM 0.32 on CPU: a weight update skips the MoE experts' prepack
        into the CPU kernel's layout (`_setup_kernel` runs it on the first load only),
        so reloaded experts would be read in the wrong layout. Repack the experts of
        every MoE layer this reload wrote; the others still hold packed weights."""
        try:
            from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
                CPUUnquantizedExperts)
        except ImportError:  # a vLLM build without CPU kernels
            return
        for qualified, module in self.model_runner.get_model().named_modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if not isinstance(experts, CPUUnquantizedExperts):
                continue
            # routed experts `...mlp.experts.routed_experts` load `...mlp.experts.{i}.*`
            prefix = qualified.rpartition(".")[0] + "."
            if any(name.startswith(prefix) for name in loaded):
                experts.process_weights_after_loading(module)


@contextmanager
def _narrowing_unremarked() -> Iterator[None]:
    """vLLM warns for every checkpoint tensor stored wider than the served dtype (a
    float32 checkpoint served in bfloat16), as on every push of such a model; the
    narrowing is the one it did at start-up, and the lines cost more than the copies."""
    loader_log = logging.getLogger("vllm.model_executor.models.utils")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        loader_log.setLevel(level)


def _modules_to_reprocess(model: Any, names: Any) -> list[Any]:
    """The modules vLLM must rebuild to take checkpoint tensors `names`.

    vLLM's post-load pass transforms only modules with a quantization method (CPU GEMM
    packing, fused MoE layouts, ...) and attention layers; every other module serves its
    parameters exactly as its weight loader wrote them, so `load_weights` may write
    those in place. Of the modules the names load into (their decoder layers, or the
    module of a tensor outside the layers), these are the ones to rebuild, with any
    such module sharing a parameter with them (tied embeddings); the whole model when a
    name does not match vLLM's module tree.
    """
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    def transformed(module: Any) -> bool:
        return isinstance(getattr(module, "quant_method", None), QuantizeMethodBase) \
            or is_deferred_attention_layer(module)

    paths = set()
    for name in names:
        group = layer_group(name)
        paths.add(group if group != name else name.rpartition(".")[0])
    try:
        tops = [model.get_submodule(path) for path in sorted(paths)]
    except AttributeError:
        return [model]
    chosen = [module for top in tops for module in top.modules() if transformed(module)]
    ids = {id(module) for module in chosen}
    held = {id(p) for module in chosen for p in module.parameters()}
    tied = [module for module in model.modules() if id(module) not in ids
            and transformed(module)
            and any(id(p) in held for p in module.parameters(recurse=False))]
    return chosen + tied


def _steering_hook(delta: Any) -> Any:
    def add_to_residual(module: Any, inputs: Any, output: Any) -> Any:
        # (hidden, residual): the stream is their sum. A lone tensor is the stream itself.
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    return add_to_residual
