"""Everything behaviorc reads or calls of a vLLM worker's internals (vLLM 0.32): the
model runner, its model and config, the persistent batch, the layerwise weight reload,
and the model loader that hooks the steering tables on before vLLM compiles the model.
A vLLM upgrade that moves any of these changes this module only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from behaviorc.engine.vllm.inside import LOAD_FORMAT
from behaviorc.engine.vllm.inside.steering import ScheduledRequest, SteeringSlots
from behaviorc.engine.vllm.inside.weights import layer_group

SLOTS_ATTRIBUTE = "behaviorc_steering"  # where the loaded model keeps its SteeringSlots


def text_decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "get_language_model"):  # a vision-language model: its text model
        model = model.get_language_model()
    return list(model.model.layers)


def register_steerable_loader() -> None:
    """Make `--load-format behaviorc` vLLM's default loader followed by
    `hook_steering_slots`. A loader is the one place vLLM lets a plugin act on the model
    after its weights are in and before its first forward pass, which is when
    torch.compile traces it."""
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    @register_model_loader(LOAD_FORMAT)
    class SteerableModelLoader(DefaultModelLoader):
        def __init__(self, load_config: Any):
            load_config.load_format = "auto"  # which files to read: the default's choice
            super().__init__(load_config)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            model = super().load_model(vllm_config, model_config, prefix)
            hook_steering_slots(model, int(model_config.hf_text_config.hidden_size),
                                vllm_config.scheduler_config.max_num_batched_tokens)
            return model


def hook_steering_slots(model: torch.nn.Module, hidden: int, max_tokens: int) -> SteeringSlots:
    layers = text_decoder_layers(model)
    slots = SteeringSlots(len(layers), hidden, max_tokens, next(model.parameters()).device)
    for index, layer in enumerate(layers):
        layer.register_forward_hook(slots.hook(index))
    setattr(model, SLOTS_ATTRIBUTE, slots)
    return slots


class VllmWorker:
    """behaviorc's view of the vLLM worker it extends."""

    def __init__(self, worker: Any):
        self._worker = worker

    @property
    def _runner(self) -> Any:
        return self._worker.model_runner

    # --- the served model ---

    def model(self) -> torch.nn.Module:
        return self._runner.get_model()

    def decoder_layers(self) -> list[torch.nn.Module]:
        return text_decoder_layers(self.model())

    def steering_slots(self) -> SteeringSlots:
        """The steering tables the loader hooked on (`register_steerable_loader`); hooked
        on now when the server was started with another loader, which only an eager
        server can take: a compiled graph never calls a hook added after it was traced."""
        slots = getattr(self.model(), SLOTS_ATTRIBUTE, None)
        if slots is not None:
            return slots
        if self.compiled():
            raise RuntimeError(
                f"this server was started without `--load-format {LOAD_FORMAT}`, so its "
                f"compiled model has no steering hooks; start it with `behaviorc serve`, or "
                f"add `--load-format {LOAD_FORMAT}` (or `--enforce-eager`) to vLLM's command")
        return hook_steering_slots(
            self.model(), int(self.text_config().hidden_size),
            self._worker.vllm_config.scheduler_config.max_num_batched_tokens)

    def config(self) -> Any:
        """The Hugging Face config of the served model."""
        return self._runner.model_config.hf_config

    def text_config(self) -> Any:
        config = self.config()
        return getattr(config, "text_config", config)

    def folder(self) -> Path:
        return Path(self._runner.model_config.model)

    def dtype(self) -> torch.dtype:
        return self._runner.model_config.dtype

    def compiled(self) -> bool:
        """Whether vLLM compiled the model (torch.compile, and CUDA graphs on a GPU)."""
        return not self._runner.model_config.enforce_eager

    def device(self) -> torch.device:
        return next(self.model().parameters()).device

    def start_token_id(self) -> int | None:
        """The token an empty prompt starts from: BOS, else EOS (as the embedded engine)."""
        from transformers import AutoTokenizer

        model_config = self._runner.model_config
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer, trust_remote_code=model_config.trust_remote_code)
        start = tokenizer.bos_token_id
        return start if start is not None else tokenizer.eos_token_id

    # --- the batch of a forward pass ---

    def before_each_forward(self, plan: Callable[[int], None]) -> Any:
        """Call `plan(tokens)` before every forward pass of the model, with the number of
        tokens the pass runs; the hook's handle."""

        def pre_hook(module: Any, args: Any, kwargs: Any) -> None:
            plan(_token_count(args, kwargs))

        return self.model().register_forward_pre_hook(pre_hook, with_kwargs=True)

    def scheduled_requests(self, tokens: int) -> list[ScheduledRequest]:
        """The requests of the pass about to run over `tokens` tokens, in batch order
        (vLLM's persistent batch: `input_batch.req_ids` in the order of
        `query_start_loc`); none when the pass is not one of scheduled requests (a
        warm-up run)."""
        runner = self._runner
        batch = runner.input_batch
        count = batch.num_reqs
        if not count or tokens <= 0:
            return []
        starts = runner.query_start_loc.np[:count + 1]
        if int(starts[-1]) > tokens:
            return []
        requests = []
        # a request's scheduled tokens run from position `num_computed_tokens` on (what the
        # runner's own positions are made from)
        computed, prompts = batch.num_computed_tokens_cpu, batch.num_prompt_tokens
        for position, req_id in enumerate(batch.req_ids[:count]):
            params = getattr(runner.requests.get(req_id), "sampling_params", None)
            requests.append(ScheduledRequest(int(starts[position]), int(starts[position + 1]),
                                             getattr(params, "extra_args", None) or {},
                                             int(computed[position]), int(prompts[position])))
        return requests

    # --- loading weights ---

    def load_weights(self, tensors: dict[str, Any]) -> None:
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

        model = self.model()
        with set_current_vllm_config(self._worker.vllm_config), _narrowing_unremarked():
            for module in _modules_to_reprocess(model, tensors):
                initialize_layerwise_reload(module)
            model.load_weights(iter(tensors.items()))
            finalize_layerwise_reload(model, self._runner.model_config)
        self._repack_cpu_experts(set(tensors))

    def _repack_cpu_experts(self, loaded: set[str]) -> None:
        """Work around vLLM 0.32 on CPU: a weight update skips the MoE experts' prepack
        into the CPU kernel's layout (`_setup_kernel` runs it on the first load only),
        so reloaded experts would be read in the wrong layout. Repack the experts of
        every MoE layer this reload wrote; the others still hold packed weights."""
        try:
            from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
                CPUUnquantizedExperts)
        except ImportError:  # a vLLM build without CPU kernels
            return
        for qualified, module in self.model().named_modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if not isinstance(experts, CPUUnquantizedExperts):
                continue
            # routed experts `...mlp.experts.routed_experts` load `...mlp.experts.{i}.*`
            prefix = qualified.rpartition(".")[0] + "."
            if any(name.startswith(prefix) for name in loaded):
                experts.process_weights_after_loading(module)


def _token_count(args: Any, kwargs: Any) -> int:
    """The tokens of a forward pass, from the model's `forward(input_ids, positions,
    intermediate_tensors, inputs_embeds)` arguments."""
    for key, position in (("input_ids", 0), ("inputs_embeds", 3)):
        value = kwargs.get(key, args[position] if len(args) > position else None)
        if value is not None:
            return int(value.shape[0])
    return 0


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
