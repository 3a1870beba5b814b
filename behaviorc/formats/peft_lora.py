"""LoRA adapter folders in PEFT's own format, and the checks a folder passes before any
server loads it.

A folder holds `adapter_config.json` (PEFT's LoraConfig fields) and
`adapter_model.safetensors` with `base_model.model.{module}.lora_A.weight` [r, in] and
`lora_B.weight` [out, r] per adapted linear module; the module's weight moves by
B @ A * alpha / r. behaviorc writes alpha = r for every module (`alpha_pattern` beside
`rank_pattern`), so the product B @ A is the delta itself. The safetensors header also
says which base the adapter belongs to (`base_sha256`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.formats.safetensors_io import SafetensorsFile, WeightFolder, content_sha256

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# Files PEFT, vLLM or torch would unpickle if they found them; an adapter holding one is
# refused outright, whatever else it holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KEY = re.compile(re.escape(KEY_PREFIX) + r"(.+)\.lora_([AB])\.weight$")


def lora_key(module: str, side: str) -> str:
    """The adapter tensor name of `module`'s A or B factor."""
    return f"{KEY_PREFIX}{module}.lora_{side}.weight"


def adapter_config(ranks: dict[str, int], base: Path) -> dict:
    """PEFT's adapter_config.json for modules of the given ranks, scaling 1 everywhere."""
    top = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": top,
        "lora_alpha": top,
        "target_modules": sorted(ranks),
        "rank_pattern": {module: rank for module, rank in sorted(ranks.items())},
        "alpha_pattern": {module: rank for module, rank in sorted(ranks.items())},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


@dataclass(frozen=True)
class CheckedAdapter:
    path: Path
    ranks: dict[str, int]  # module -> rank
    base_sha256: str  # "" when the adapter does not say

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


def check_adapter(path: Path, base_dir: Path | None = None) -> CheckedAdapter:
    """A LoRA adapter folder, checked: safetensors only, a PEFT LoRA config vLLM serves,
    factor pairs of matching rank, and (with `base_dir`) every module a linear weight of
    that base with the factors' shapes, and the base the adapter names."""
    path = Path(path)
    if not path.is_dir():
        raise BehaviorError(f"no such adapter folder: {path}",
                            hint="`behaviorc lora export` writes one")
    pickled = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise BehaviorError(f"{path}: `{pickled[0]}` is a pickle file; adapters are "
                            f"loaded from safetensors only",
                            hint=f"keep only {CONFIG_FILE} and {WEIGHTS_FILE} in the folder")
    config = _read_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise BehaviorError(f"{path}: no {WEIGHTS_FILE}")
    with SafetensorsFile(path / WEIGHTS_FILE) as weights:
        factors: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, info in weights.tensors.items():
            match = _KEY.match(name)
            if not match:
                raise BehaviorError(f"{path / WEIGHTS_FILE}: tensor `{name}` is not a LoRA "
                                    f"factor (`{KEY_PREFIX}MODULE.lora_A.weight` or `lora_B`)")
            if not info.is_float:
                raise BehaviorError(f"{path / WEIGHTS_FILE}: tensor `{name}` has dtype "
                                    f"{info.dtype}; LoRA factors are floating-point")
            factors.setdefault(match.group(1), {})[match.group(2)] = info.shape
        base_sha256 = weights.metadata.get("base_sha256", "")
    if not factors:
        raise BehaviorError(f"{path / WEIGHTS_FILE}: holds no LoRA factors")
    ranks = {module: _rank(path, module, pair, config) for module, pair in factors.items()}
    if base_dir is not None:
        _check_against_base(path, factors, Path(base_dir), base_sha256)
    return CheckedAdapter(path, ranks, base_sha256)


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise BehaviorError(f"{path}: no {CONFIG_FILE}") from None
    except (OSError, ValueError) as err:
        raise BehaviorError(f"{path / CONFIG_FILE}: not JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise BehaviorError(f"{path / CONFIG_FILE}: not a PEFT LoRA config "
                            f"(`peft_type` must be \"LORA\")")
    for field in ("use_dora", "lora_bias", "modules_to_save", "layer_replication"):
        if config.get(field):
            raise BehaviorError(f"{path / CONFIG_FILE}: `{field}` is set; vLLM serves plain "
                                f"LoRA only")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise BehaviorError(f"{path / CONFIG_FILE}: `r` must be a positive integer")
    return config


def _rank(path: Path, module: str, pair: dict[str, tuple[int, ...]], config: dict) -> int:
    if set(pair) != {"A", "B"}:
        missing = ({"A", "B"} - set(pair)).pop()
        raise BehaviorError(f"{path / WEIGHTS_FILE}: module `{module}` has no lora_{missing}")
    a, b = pair["A"], pair["B"]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise BehaviorError(f"{path / WEIGHTS_FILE}: module `{module}` has lora_A {list(a)} "
                            f"and lora_B {list(b)}; they need shapes [r, in] and [out, r]")
    expected = (config.get("rank_pattern") or {}).get(module, config["r"])
    if a[0] != expected:
        raise BehaviorError(f"{path / WEIGHTS_FILE}: module `{module}` has rank {a[0]}, its "
                            f"config says {expected}")
    return a[0]


def _check_against_base(path: Path, factors: dict[str, dict[str, tuple[int, ...]]],
                        base_dir: Path, base_sha256: str) -> None:
    with WeightFolder(base_dir) as base:
        for module, pair in factors.items():
            info = base.tensors.get(f"{module}.weight")
            if info is None or len(info.shape) != 2:
                raise BehaviorError(f"{path}: module `{module}` is not a linear layer of the "
                                    f"base model {base_dir}",
                                    hint="was the adapter made for another model?")
            out_features, in_features = info.shape
            if pair["A"][1] != in_features or pair["B"][0] != out_features:
                raise BehaviorError(
                    f"{path}: module `{module}` maps {pair['A'][1]} -> {pair['B'][0]} "
                    f"features, the base's weight {in_features} -> {out_features}",
                    hint="was the adapter made for another model?")
    if base_sha256 and base_sha256 != content_sha256(base_dir):
        raise BehaviorError(f"{path}: made for another base (sha256 {base_sha256[:12]}...), "
                            f"not {base_dir}",
                            hint="export the adapter against the model the server serves")
