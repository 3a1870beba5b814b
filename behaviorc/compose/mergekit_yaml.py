"""A composition as a mergekit configuration, for users who want to redo it there.

mergekit merges model folders, so each term names the fine-tuned folder its vector came
from (a term that is a task-vector file with no known folder gets a placeholder and a
note). Every method keeps its name in mergekit and is computed in float32 as behaviorc
does, with every setting written out (mergekit's defaults are behaviorc's, but a reader
should not need to know them). The methods that trim by magnitude reproduce behaviorc's
weights up to which entries tied at a trim threshold survive; the random drops (dare,
della) agree in distribution only. Parameter groups have no mergekit equivalent and are
noted, not translated.
"""

from __future__ import annotations

import json
from typing import Any

from behaviorc.compose.merge import ALIASES, DEFAULT_EPSILON, DEFAULT_GAMMA, METHODS

# Settings given per model in mergekit (the others are shared by the whole merge).
_PER_MODEL = ("density", "epsilon", "gamma")


def mergekit_yaml(record: dict[str, Any]) -> str:
    """The YAML text for a composed folder's provenance record (`behaviorc.json`)."""
    merge = record["merge"]
    method = ALIASES.get(merge["method"], merge["method"])
    traits = METHODS[method]
    settings = _settings(merge, method)
    lines = [f"# {record.get('name') or 'composition'} = {record.get('expression', '')}".rstrip(),
             "# Exported by behaviorc; run with: mergekit-yaml mergekit.yaml OUTPUT_DIR"]
    if traits.sparsify in ("random", "della") and settings["density"] < 1:
        lines.append("# behaviorc drops entries with its own seeded generator: the two "
                     "agree in distribution, not entry by entry")
    if traits.sparsify in ("magnitude", "outliers") and settings["density"] < 1:
        lines.append("# of entries tied at a trim threshold behaviorc keeps the earliest, "
                     "mergekit an arbitrary few")
    if merge.get("groups"):
        lines.append(f"# behaviorc merged only the parameter groups {', '.join(merge['groups'])};"
                     " mergekit merges every parameter")
    lines += [f"merge_method: {method}",
              f"base_model: {_quote(record['base']['path'])}",
              "models:"]
    per_model = [name for name in _PER_MODEL if name in traits.settings]
    for term in record["terms"]:
        folder = term.get("model")
        if folder is None:
            lines.append(f"  # {term['behavior']}: a task-vector file ({term['path']}); apply it "
                         "to the base to get a model folder for mergekit")
            folder = f"<{term['behavior']} model folder>"
        lines.append(f"  - model: {_quote(folder)}")
        if traits.stock:
            continue
        lines += ["    parameters:", f"      weight: {_number(term['weight'])}"]
        lines += [f"      {name}: {_number(settings[name])}" for name in per_model]
    shared = [name for name in ("normalize", "rescale", "lambda") if name in traits.settings]
    if shared:
        lines.append("parameters:")
        lines += [f"  {name}: {_value(settings[name])}" for name in shared]
    lines += ["dtype: float32", f"out_dtype: {record.get('dtype', 'float32')}"]
    return "\n".join(lines) + "\n"


def _settings(merge: dict[str, Any], method: str) -> dict[str, Any]:
    """The merge's settings, the method's defaults for those a record leaves out (records
    written before a setting existed)."""
    traits = METHODS[method]
    return {"density": 1.0, "lambda": 1.0, "normalize": traits.normalize,
            "rescale": traits.rescale, "epsilon": DEFAULT_EPSILON, "gamma": DEFAULT_GAMMA,
            **merge}


def _quote(text: str) -> str:
    return json.dumps(str(text))  # a JSON string is a valid YAML scalar


def _value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else _number(value)


def _number(value: float) -> str:
    return repr(float(value))
