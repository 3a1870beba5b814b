"""A composition as a mergekit configuration, for users who want to redo it there.

mergekit merges model folders, so each term names the fine-tuned folder its vector came
from (a term that is a task-vector file with no known folder gets a placeholder and a
note). Every method keeps its name in mergekit and is computed in float32 as behaviorc
does, with every setting written out (mergekit's defaults are behaviorc's, but a reader
should not need to know them). The methods that trim by magnitude reproduce behaviorc's
weights up to which entries tied at a trim threshold survive; the random drops (dare,
della) agree in distribution only. Parameter groups have no mergekit equivalent and are
noted, not translated. A term's own density, epsilon or gamma is its model's parameter.
slerp goes from mergekit's base_model to the other model: the base itself with one term,
the first term's folder with two; linear and karcher list only the terms' folders (they
mix the models listed, and a base model would be one of them).
"""

from __future__ import annotations

import json
from typing import Any

from behaviorc.core.merge_methods import (ALIASES, DEFAULT_EPS, DEFAULT_EPSILON, DEFAULT_GAMMA,
                                          DEFAULT_MAX_ITER, DEFAULT_TOL, METHODS, PER_TERM)

# behaviorc's shared settings by mergekit's names, per method family.
_SHARED = {"nuslerp": {"flatten": "nuslerp_flatten", "row_wise": "nuslerp_row_wise"},
           "multislerp": {"normalize": "normalize_weights", "eps": "eps"}}


def mergekit_yaml(record: dict[str, Any]) -> str:
    """The YAML text for a composed folder's provenance record (`behaviorc.json`)."""
    merge = record["merge"]
    method = ALIASES.get(merge["method"], merge["method"])
    traits = METHODS[method]
    settings = _settings(merge, method)
    lines = [f"# {record.get('name') or 'composition'} = {record.get('expression', '')}".rstrip(),
             "# Exported by behaviorc; run with: mergekit-yaml mergekit.yaml OUTPUT_DIR"]
    per_model = [name for name in PER_TERM if name in traits.settings]
    densities = [term.get("density", settings["density"]) for term in record["terms"]]
    if traits.sparsify in ("random", "della") and min(densities, default=1) < 1:
        lines.append("# behaviorc drops entries with its own seeded generator: the two "
                     "agree in distribution, not entry by entry")
    if traits.sparsify in ("magnitude", "outliers") and min(densities, default=1) < 1:
        lines.append("# of entries tied at a trim threshold behaviorc keeps the earliest, "
                     "mergekit an arbitrary few")
    if merge.get("groups"):
        lines.append(f"# behaviorc merged only the parameter groups {', '.join(merge['groups'])};"
                     " mergekit merges every parameter")
    folders = [_folder(term) for term in record["terms"]]
    base = _quote(record["base"]["path"])
    lines.append(f"merge_method: {method}")
    models = list(zip(record["terms"], folders))
    if traits.mix == "slerp" and len(folders) == 2:
        lines.append(f"base_model: {folders[0]}")  # from the first model to the second
    elif not traits.on_weights:  # linear and karcher mix only the models listed
        lines.append(f"base_model: {base}")
    lines.append("models:")
    if traits.mix == "slerp" and len(folders) == 1:
        lines.append(f"  - model: {base}")
    for term, folder in models:
        lines += _comments_of(term)
        lines.append(f"  - model: {folder}")
        if not traits.weighted:
            continue
        lines += ["    parameters:", f"      weight: {_number(term['weight'])}"]
        lines += [f"      {name}: {_number(term.get(name, settings[name]))}" for name in per_model]
    renamed = _SHARED.get(traits.mix, {})
    shared = [name for name in traits.settings
              if name in ("normalize", "rescale", "lambda", "t", "filter_wise", "max_iter",
                          "tol", *renamed)]
    if shared:
        lines.append("parameters:")
        lines += [f"  {renamed.get(name, name)}: {_value(settings[name])}" for name in shared]
    lines += ["dtype: float32", f"out_dtype: {record.get('dtype', 'float32')}"]
    return "\n".join(lines) + "\n"


def _folder(term: dict[str, Any]) -> str:
    """The quoted model folder of a term (a placeholder where only its vector is known)."""
    folder = term.get("model")
    return _quote(folder) if folder is not None else f'"<{term["behavior"]} model folder>"'


def _comments_of(term: dict[str, Any]) -> list[str]:
    if term.get("model") is not None:
        return []
    return [f"  # {term['behavior']}: a task-vector file ({term['path']}); apply it "
            "to the base to get a model folder for mergekit"]


def _settings(merge: dict[str, Any], method: str) -> dict[str, Any]:
    """The merge's settings, the method's defaults for those a record leaves out (records
    written before a setting existed)."""
    traits = METHODS[method]
    return {"density": 1.0, "lambda": 1.0, "normalize": traits.normalize,
            "rescale": traits.rescale, "epsilon": DEFAULT_EPSILON, "gamma": DEFAULT_GAMMA,
            "flatten": True, "row_wise": False, "filter_wise": False,
            "max_iter": DEFAULT_MAX_ITER, "tol": DEFAULT_TOL, "eps": DEFAULT_EPS, **merge}


def _quote(text: str) -> str:
    return json.dumps(str(text))  # a JSON string is a valid YAML scalar


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else _number(value)


def _number(value: float) -> str:
    return repr(float(value))
