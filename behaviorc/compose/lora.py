"""A task vector (trained or composed) as a LoRA adapter: each changed linear weight's
delta, factored by a truncated SVD.

For a delta D = U S V^T the adapter keeps the r largest singular values: B = U_r S_r^1/2,
A = S_r^1/2 V_r^T (the square root on both sides keeps the factors' magnitudes alike,
which bfloat16 serving needs), so B @ A is the best rank-r approximation of D. The rank
is chosen per matrix: a fixed `rank` (capped by the matrix's own), or the fewest
singular values that keep `energy` of the matrix's squared Frobenius norm. Deltas LoRA
cannot carry (embeddings, the output head, norms, GDN gates and convolutions, MoE
experts) are left out and reported with their share of the whole delta's energy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from behaviorc.core.atomic import atomic_folder
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.formats.peft_lora import CONFIG_FILE, WEIGHTS_FILE, adapter_config, lora_key
from behaviorc.formats.safetensors_io import WeightFolder, content_sha256, to_float32
from behaviorc.compose.sources import check_finite, open_source

# PEFT's and vLLM's common default. On smollm2-135m the demo's trained behavior keeps
# 120% of its held-out margin gain at rank 16 (112% at 4, 107% at 64; README, "Trained
# behaviors per request").
DEFAULT_RANK = 16
# Groups whose parameters are not the weight of a linear layer vLLM can adapt.
_UNCARRIED_GROUPS = {"embed", "head", "norm", "attn.norm", "gdn.norm", "gdn.gates", "gdn.conv"}


@dataclass(frozen=True)
class RankChoice:
    """`rank` N: at most N per matrix; `energy` E (0 < E <= 1): the fewest singular values
    that keep a share E of each matrix's energy."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise BehaviorError("a LoRA export takes a rank or an energy share, not both")
        if self.rank is not None and self.rank < 1:
            raise BehaviorError(f"LoRA rank {self.rank} is not a positive integer")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise BehaviorError(f"LoRA energy {self.energy:g} is not a share in (0, 1]",
                                hint="write it as a percentage, e.g. 90%")

    def of(self, squared: np.ndarray, shape: tuple[int, ...]) -> int:
        """The rank kept of a matrix of `shape` with squared singular values `squared`
        (descending): never more than its numerical rank (numpy's `matrix_rank` cut in
        float32), since the rest is rounding noise of the subtraction."""
        cut = squared[0] * (max(shape) * np.finfo(np.float32).eps) ** 2
        nonzero = max(int(np.count_nonzero(squared > cut)), 1)
        if self.rank is not None:
            return min(self.rank, nonzero)
        cumulative = np.cumsum(squared, dtype=np.float64)
        return min(int(np.searchsorted(cumulative, self.energy * cumulative[-1] * (1 - 1e-9))) + 1,
                   nonzero)

    @classmethod
    def given(cls, rank: int | None, energy: float | None) -> "RankChoice":
        """The choice a user gave: an energy share, else a rank, else DEFAULT_RANK."""
        return (cls(energy=energy) if energy is not None
                else cls(rank=rank if rank is not None else DEFAULT_RANK))

    def describe(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"energy {self.energy:.0%}"


@dataclass
class LoraExport:
    """What an export kept. Energies are squared Frobenius norms of the delta."""

    path: Path
    choice: str
    ranks: dict[str, int]  # module -> rank kept
    energy_total: float = 0.0
    energy_kept: float = 0.0
    # parameter -> its share of the total energy, for deltas LoRA cannot carry
    uncarried: dict[str, float] = field(default_factory=dict)

    @property
    def energy_kept_share(self) -> float:
        return self.energy_kept / self.energy_total if self.energy_total else 1.0

    def summary(self) -> dict[str, Any]:
        return {"adapter": str(self.path), "choice": self.choice,
                "modules": len(self.ranks), "max_rank": max(self.ranks.values(), default=0),
                "mean_rank": (sum(self.ranks.values()) / len(self.ranks)) if self.ranks else 0.0,
                "energy_kept": self.energy_kept_share,
                "uncarried": {name: share for name, share in sorted(self.uncarried.items())},
                "uncarried_energy": sum(self.uncarried.values())}


def export_lora(delta: Path, base_dir: Path, out: Path, choice: RankChoice, *,
                overwrite: bool = False,
                progress: Callable[[int, int, str], None] | None = None) -> LoraExport:
    """Write the adapter folder `out` for a task-vector file or a fine-tuned (or composed)
    model folder `delta`, against the base folder `base_dir`."""
    import torch
    from behaviorc.model.adapter import group_of, layer_of

    source = open_source(delta)
    factors: dict[str, np.ndarray] = {}
    result = LoraExport(path=Path(out), choice=choice.describe(), ranks={})
    uncarried_energy: dict[str, float] = {}
    try:
        with WeightFolder(base_dir) as base:
            source.check_against(base)
            names = sorted(source.tensors)
            for done, name in enumerate(names):
                if progress:
                    progress(done, len(names), name)
                info = base.tensors[name]
                tau = source.delta(name, source.read(name), to_float32(base.read(name), info.dtype))
                check_finite(tau, name, source.path)
                energy = float(np.square(tau, dtype=np.float64).sum())
                if energy == 0.0:
                    continue
                result.energy_total += energy
                carried = (tau.ndim == 2 and name.endswith(".weight") and layer_of(name) is not None
                           and ".experts." not in name and group_of(name) not in _UNCARRIED_GROUPS)
                if not carried:
                    uncarried_energy[name] = energy
                    continue
                u, s, vh = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(tau)),
                                            full_matrices=False)
                rank = choice.of(np.square(s.double().numpy()), tau.shape)
                root = s[:rank].sqrt()
                module = name.removesuffix(".weight")
                factors[lora_key(module, "B")] = (u[:, :rank] * root).contiguous().numpy()
                factors[lora_key(module, "A")] = (root[:, None] * vh[:rank]).contiguous().numpy()
                result.ranks[module] = rank
                result.energy_kept += float(np.square(s[:rank].double().numpy()).sum())
    finally:
        source.close()
    result.uncarried = {name: energy / result.energy_total
                        for name, energy in uncarried_energy.items()}
    if not result.ranks:
        raise BehaviorError(f"{delta}: no linear weight differs from the base, so a LoRA "
                            f"adapter would carry nothing",
                            hint="LoRA carries the decoder layers' projection matrices only")
    _write(result, factors, Path(base_dir), overwrite)
    if progress:
        progress(len(names), len(names), f"{len(result.ranks)} modules")
    return result


def _write(result: LoraExport, factors: dict[str, np.ndarray], base_dir: Path,
           overwrite: bool) -> None:
    import json
    from safetensors.numpy import save_file

    with atomic_folder(result.path, overwrite=overwrite) as staging:
        (staging / CONFIG_FILE).write_text(
            json.dumps(adapter_config(result.ranks, base_dir.resolve()), indent=2) + "\n")
        save_file(factors, str(staging / WEIGHTS_FILE),
                  metadata={"format": "pt", "base_sha256": content_sha256(base_dir),
                            "choice": result.choice,
                            "energy_kept": f"{result.energy_kept_share:.6f}"})


def compare_margins(base_dir: Path, delta: Path, adapter: Path, pairs: Sequence[Any],
                    dtype: str = "float32") -> dict[str, float]:
    """Held-out margins of the base, base + the full delta, and base + the adapter (PEFT
    loads and merges it), on one copy of the model; `margin_kept` is the adapter's share
    of the full delta's margin gain."""
    import torch
    from peft import PeftModel

    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.measure.margin import behavior_margin
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.loading import load_model

    model, tokenizer = load_model(base_dir, dtype=dtype)
    margins = {"margin_base": behavior_margin(EmbeddedEngine(model, tokenizer), pairs)}
    views = ArchitectureAdapter.for_model(model).checkpoint_tensors(model)
    source = open_source(delta)
    saved: dict[str, torch.Tensor] = {}
    try:
        with WeightFolder(base_dir) as base, torch.no_grad():
            source.check_against(base)
            for name in source.tensors:
                info = base.tensors[name]
                tau = source.delta(name, source.read(name), to_float32(base.read(name), info.dtype))
                saved[name] = views[name].clone()
                views[name].add_(torch.from_numpy(tau).to(views[name].dtype))
            margins["margin_full"] = behavior_margin(EmbeddedEngine(model, tokenizer), pairs)
            for name, original in saved.items():
                views[name].copy_(original)
    finally:
        source.close()
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    margins["margin_adapter"] = behavior_margin(EmbeddedEngine(merged, tokenizer), pairs)
    gain = margins["margin_full"] - margins["margin_base"]
    margins["margin_kept"] = ((margins["margin_adapter"] - margins["margin_base"]) / gain
                              if gain and math.isfinite(gain) else float("nan"))
    return margins
