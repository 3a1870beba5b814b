"""What a build made, findable by name and telling where it came from.

Results live in the content-addressed store (`DIR/.store/<key>/`); after each build,
`DIR/<name>/` holds a link for every artifact of the finished tasks of behavior or
composition `name` (`model`, `vectors.safetensors`, `control_vector.gguf`,
`task_vector.safetensors`, `steering.safetensors`, ...), each replaced in one rename
so a reader never meets a missing or half-made link. The links are relative, so the
build folder can be moved.

Every model folder a task makes carries `behaviorc.json` (its provenance): the task,
the spec, the upstream results it was made from and its metrics. A composition writes
its own richer record, which is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from behaviorc.pipeline import outputs
from behaviorc.core.files import BUILT_PROVENANCE, PROVENANCE_FILE
from behaviorc.core.task import Task, TaskResult


def stamp_provenance(task: Task, staging: Path, result: TaskResult, upstream: dict[str, TaskResult],
                     spec_path: str, spec_sha256: str) -> None:
    """Write the provenance of each model folder the task made (before the store hashes
    it) unless the task wrote its own."""
    for name, value in result.artifacts.items():
        folder = staging / value
        if Path(value).is_absolute() or not (folder / "config.json").is_file():
            continue  # an imported model, or not a model folder
        if (folder / PROVENANCE_FILE).exists():
            continue
        inputs = []
        for argument, source in task.arguments().items():
            made = upstream.get(source.key)
            entry: dict[str, Any] = {"as": argument, "task": source.id, "key": source.key}
            if made is not None:
                entry["artifacts"] = dict(made.artifacts)
                if "path" in made.data:  # a model task: the folder it resolved
                    entry["path"] = made.data["path"]
            inputs.append(entry)
        record = {"kind": BUILT_PROVENANCE, "artifact": name, "task": task.id, "task_kind": task.kind,
                  "key": task.key, "spec": {"path": spec_path, "sha256": spec_sha256},
                  "inputs": inputs, "metrics": dict(result.metrics)}
        (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def link_results(out: Path, finished: Iterable[tuple[Task, TaskResult]]) -> list[Path]:
    """Point `out/<task name>/<artifact file name>` at each stored artifact of the
    finished tasks; drop links whose stored result is gone. Returns the links made."""
    out = Path(out).resolve()
    made = []
    for task, result in finished:
        for value in result.artifacts.values():
            target = Path(value)
            if not target.is_absolute() or out not in target.parents:
                continue  # an imported model or file: not the build's own result
            folder = out / task.name
            # recorded first: clean removes it, and the next build does not take it for a stranger's
            outputs.record(out, [f"{task.name}/{target.name}"])
            folder.mkdir(exist_ok=True)
            made.append(_replace_link(folder / target.name, target))
    for folder in {link.parent for link in made}:
        for link in folder.iterdir():
            if link.is_symlink() and not link.exists():
                link.unlink()
    return made


def _replace_link(link: Path, target: Path) -> Path:
    staging = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(os.path.relpath(target, link.parent))
    os.replace(staging, link)  # one rename: the old link or the new, never neither
    return link
