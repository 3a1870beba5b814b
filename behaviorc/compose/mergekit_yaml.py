"""A composition as a mergekit configuration, for users who want to redo it there.

mergekit merges model folders, so each term names the fine-tuned folder its vector came
from (a term that is a task-vector file with no known folder gets a placeholder and a
note). `ties` and `task_arithmetic` map one to one, computed in float32 as behaviorc
does; `dare` becomes `dare_linear`, whose random drop (and norm-matching rescale)
differs from behaviorc's, so only its expectation agrees. Parameter groups have no
mergekit equivalent and are noted, not translated.
"""

from __future__ import annotations

import json
from typing import Any

_METHODS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear"}


def mergekit_yaml(record: dict[str, Any]) -> str:
    """The YAML text for a composed folder's provenance record (`behaviorc.json`)."""
    merge = record["merge"]
    method = merge["method"]
    lines = [f"# {record.get('name') or 'composition'} = {record.get('expression', '')}".rstrip(),
             "# Exported by behaviorc; run with: mergekit-yaml mergekit.yaml OUTPUT_DIR"]
    if method == "dare":
        lines.append("# behaviorc's dare drops with its own seeded generator and rescales by "
                     "1/density: equal in expectation only")
    if merge.get("groups"):
        lines.append(f"# behaviorc merged only the parameter groups {', '.join(merge['groups'])};"
                     " mergekit merges every parameter")
    lines += [f"merge_method: {_METHODS[method]}",
              f"base_model: {_quote(record['base']['path'])}",
              "models:"]
    for term in record["terms"]:
        folder = term.get("model")
        if folder is None:
            lines.append(f"  # {term['behavior']}: a task-vector file ({term['path']}); apply it "
                         "to the base to get a model folder for mergekit")
            folder = f"<{term['behavior']} model folder>"
        lines += [f"  - model: {_quote(folder)}",
                  "    parameters:",
                  f"      weight: {_number(term['weight'])}"]
        if method in ("ties", "dare"):
            lines.append(f"      density: {_number(merge['density'])}")
    lines.append("parameters:")
    # behaviorc normalizes only ties; say so explicitly, mergekit's defaults differ by method.
    lines.append(f"  normalize: {'true' if method == 'ties' and merge['normalize'] else 'false'}")
    if method == "dare":
        lines.append("  rescale: true")
    lines += [f"  lambda: {_number(merge['lambda'])}",
              "dtype: float32",
              f"out_dtype: {record.get('dtype', 'float32')}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return json.dumps(str(text))  # a JSON string is a valid YAML scalar


def _number(value: float) -> str:
    return repr(float(value))
