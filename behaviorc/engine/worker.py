"""behaviorc's extension of the vLLM worker: steering hooks and validated weight pushes.

vLLM mixes this class into its worker class when the server is started with
`--worker-extension-cls behaviorc.engine.worker.BehaviorWorker`, and
`POST /collective_rpc {"method": ..., "args": [...]}` calls its methods inside every
worker process. The HTTP route passes only strings, so every method takes JSON text and
answers with plain JSON-able values.

Steering. vLLM's decoder layers return `(hidden, residual)` and the next layer's fused
add-norm makes `hidden + residual` the residual stream. Adding `strength * vector` to the
returned `hidden` therefore adds it to the residual stream at the output of that layer,
which is what steering at layer L means in transformers too.

Weights. The served weights are described by a list of checkpoint-format folders, the
first complete (the model as served or last pushed whole) and each later one overriding
some tensors. A push validates a folder against the served checkpoint names, shapes and
dtypes and checks every value is finite before vLLM's `reload_weights` reads it; a failed
reload replays the folders that were served before, so the old weights come back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TensorEntry:
    shape: list[int]
    dtype: str
    file: str  # the safetensors file that holds the served value


@dataclass
class ServedWeights:
    """Which folders, replayed in order, give the weights being served."""

    folders: list[str]
    previous: list[str] = field(default_factory=list)  # before the last push, for rollback

    def manifest(self) -> dict[str, TensorEntry]:
        entries: dict[str, TensorEntry] = {}
        for folder in self.folders:
            entries.update(read_headers(Path(folder)))
        return entries


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, as vLLM's loader would read them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def read_headers(folder: Path) -> dict[str, TensorEntry]:
    """Name -> shape, dtype and file for every tensor of a checkpoint folder (no data read)."""
    from safetensors import safe_open

    entries: dict[str, TensorEntry] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                entries[name] = TensorEntry(list(part.get_shape()), part.get_dtype(), str(file))
    return entries


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_folder(folder: Path, served: dict[str, TensorEntry], complete: bool) -> list[str]:
    """Every reason the folder cannot replace the served weights; empty when it can.

    `complete` asks for every served tensor (a whole-model push); otherwise the folder may
    hold any subset. Values are read to check that they are finite.
    """
    import torch
    from safetensors import safe_open

    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    files = safetensors_files(folder)
    if not files:
        return [f"{folder} holds no .safetensors file"]
    problems: list[str] = []
    try:
        incoming = read_headers(folder)
    except Exception as err:  # a truncated or foreign file: safetensors says why
        return [f"cannot read the weights in {folder}: {err}"]
    for name, entry in incoming.items():
        want = served.get(name)
        if want is None:
            problems.append(f"tensor `{name}` is not a weight of the served model")
        elif entry.shape != want.shape:
            problems.append(f"tensor `{name}` has shape {entry.shape}, the served model "
                            f"has {want.shape}")
        elif entry.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor `{name}` has dtype {entry.dtype}, weights must be "
                            f"floating point (served: {want.dtype})")
    if complete:
        missing = sorted(set(served) - set(incoming))
        if missing:
            shown = ", ".join(f"`{n}`" for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(f"{len(missing)} served tensor(s) missing: {shown}{more}")
    if problems:
        return problems
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if not bool(torch.isfinite(handle.get_tensor(name)).all()):
                        problems.append(f"tensor `{name}` holds NaN or infinite values")
        except Exception as err:
            problems.append(f"cannot read {file}: {err}")
    return problems


def _layer_kinds(config: Any, count: int) -> list[str]:
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * count
    return ["gdn" if kind == "linear_attention" else "attention" for kind in kinds[:count]]


class BehaviorWorker:
    """Methods vLLM adds to its worker; reached through `POST /collective_rpc`."""

    # --- state, created on first use (vLLM never calls an extension's __init__) ---

    def _behaviorc_served(self) -> ServedWeights:
        served = getattr(self, "_behaviorc_weights", None)
        if served is None:
            served = ServedWeights(folders=[str(self.model_runner.model_config.model)])
            self._behaviorc_weights = served
        return served

    def _behaviorc_decoder_layers(self) -> list[Any]:
        model = self.model_runner.get_model()
        return list(model.model.layers)

    # --- model description ---

    def _behaviorc_text_config(self) -> Any:
        config = self.model_runner.model_config.hf_config
        return getattr(config, "text_config", config)

    def behaviorc_info(self) -> dict[str, Any]:
        config = self.model_runner.model_config.hf_config
        count = len(self._behaviorc_decoder_layers())
        return {
            "path": self._behaviorc_served().folders[0],
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

    def behaviorc_manifest(self) -> dict[str, Any]:
        served = self._behaviorc_served()
        return {
            "folders": served.folders,
            "previous": served.previous,
            "tensors": {name: vars(entry) for name, entry in served.manifest().items()},
        }

    # --- steering ---

    def behaviorc_set_steering(self, payload: str) -> dict[str, Any]:
        """payload: {"strength": float, "vectors": {"layer": [floats]}}; replaces all steering."""
        import torch

        request = json.loads(payload)
        strength = float(request["strength"])
        layers = self._behaviorc_decoder_layers()
        hidden = int(self._behaviorc_text_config().hidden_size)
        additions: dict[int, list[float]] = {}
        for key, values in request["vectors"].items():
            index = int(key)
            if not 0 <= index < len(layers):
                raise ValueError(f"layer {index} out of range: the model has {len(layers)} "
                                 f"decoder layers (0..{len(layers) - 1})")
            if len(values) != hidden:
                raise ValueError(f"vector for layer {index} has {len(values)} values, "
                                 f"hidden size is {hidden}")
            additions[index] = values
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

    def behaviorc_check(self, payload: str) -> dict[str, Any]:
        """payload: {"folder": str, "complete": bool}. Problems, without loading anything."""
        request = json.loads(payload)
        served = self._behaviorc_served().manifest()
        return {"problems": check_folder(Path(request["folder"]), served, request["complete"])}

    def behaviorc_push(self, payload: str) -> dict[str, Any]:
        """payload: {"folder": str, "complete": bool}. Validates, then reloads in place.

        On a failed reload the folders served before are replayed and the answer says
        what failed; the weights are then the old ones.
        """
        import time

        request = json.loads(payload)
        folder, complete = str(request["folder"]), bool(request["complete"])
        served = self._behaviorc_served()
        problems = check_folder(Path(folder), served.manifest(), complete)
        if problems:
            return {"ok": False, "problems": problems}
        started = time.perf_counter()
        try:
            self._behaviorc_reload(folder, base=folder if complete else served.folders[0])
        except Exception as err:  # vLLM's loader fails in many ways; all mean: roll back
            self._behaviorc_replay(served.folders)
            return {"ok": False, "problems": [f"vLLM could not load the weights: {err!r}; "
                                              f"the previous weights are back"]}
        seconds = time.perf_counter() - started
        new_folders = [folder] if complete else _still_needed(served.folders + [folder])
        served.previous, served.folders = served.folders, new_folders
        return {"ok": True, "seconds": seconds, "folders": served.folders,
                "previous": served.previous, "tensors": len(read_headers(Path(folder)))}

    def behaviorc_rollback(self) -> dict[str, Any]:
        """Undo the last successful push (used when another replica refused it)."""
        served = self._behaviorc_served()
        if not served.previous:
            return {"ok": False, "problems": ["no earlier weights to go back to"]}
        self._behaviorc_replay(served.previous)
        served.folders, served.previous = served.previous, []
        return {"ok": True, "folders": served.folders}

    def _behaviorc_replay(self, folders: list[str]) -> None:
        for folder in folders:
            self._behaviorc_reload(folder, base=folders[0])

    def _behaviorc_reload(self, folder: str, base: str) -> None:
        model_config = self.model_runner.model_config
        try:
            self.reload_weights(weights_path=folder, is_checkpoint_format=True)
            self._behaviorc_repack_cpu_experts(set(read_headers(Path(folder))))
        finally:
            # reload_weights points the config at the folder it read; keep it on the
            # complete checkpoint so a plain reload never reads a partial overlay.
            model_config.model = base

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


def _still_needed(folders: list[str]) -> list[str]:
    """Drop overlay folders whose every tensor a later folder overrides."""
    kept: list[str] = []
    covered: set[str] = set()
    for index in range(len(folders) - 1, -1, -1):
        names = set(read_headers(Path(folders[index])))
        if index == 0 or not names <= covered:
            kept.append(folders[index])
        covered |= names
    return kept[::-1]


def _steering_hook(delta: Any) -> Any:
    def add_to_residual(module: Any, inputs: Any, output: Any) -> Any:
        # (hidden, residual): the stream is their sum. A lone tensor is the stream itself.
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    return add_to_residual
