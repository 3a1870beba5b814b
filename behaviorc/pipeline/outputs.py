"""What a build wrote into its `--out` folder, so `clean` removes only that.

`<out>/.store/outputs.json` lists the paths (relative to the folder, outside the store)
that builds into the folder own: the report, the events, the cancel request, each
failed task's log, an experiment's results. A name is recorded before the file is
written, so a kill in between leaves at most a name without its file. A folder holding
anything else was not made by behaviorc, or had things added since: a build refuses it
unless told (`--force-out`), and `clean` leaves those things where they are.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from behaviorc.pipeline.report import REPORT_FILE
from behaviorc.core.atomic import write_json_atomic
from behaviorc.core.diagnostics import BehaviorError

STORE_DIR = ".store"
OUTPUTS_FILE = "outputs.json"
_SHOWN = 5  # foreign entries named in a refusal


def manifest_path(out: Path) -> Path:
    return Path(out) / STORE_DIR / OUTPUTS_FILE


def owned(out: Path) -> set[str] | None:
    """The paths builds recorded in `out`; None when no build recorded any (no manifest)."""
    try:
        names = json.loads(manifest_path(out).read_text(encoding="utf-8"))["outputs"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BehaviorError(f"{manifest_path(out)} cannot be read ({err})",
                            hint="the folder's record of what builds wrote is damaged: "
                                 "remove the folder by hand") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BehaviorError(f"{manifest_path(out)} is not a list of paths",
                            hint="remove the folder by hand")
    return set(names)


def record(out: Path, names: Iterable[str]) -> None:
    """Add paths (relative to `out`) to what builds own there, before writing them.
    The caller holds the store's lock."""
    names = set(names)
    known = owned(out) or set()
    if names <= known:
        return
    write_json_atomic(manifest_path(out), {"outputs": sorted(known | names)})


def foreign(out: Path) -> list[str]:
    """Up to a few entries of `out` that no build recorded writing. A folder is walked
    only where recorded paths lie below it, so a large foreign tree costs one look."""
    out = Path(out)
    if not out.is_dir():
        return []
    mine = owned(out)
    if mine is None:
        mine = set()
        if (out / STORE_DIR).exists():
            return [STORE_DIR]  # a store no build recorded: not ours to write into
    folders = {str(Path(*Path(name).parts[:i])) for name in mine
               for i in range(1, len(Path(name).parts))}
    found: list[str] = []
    pending = [""]
    while pending and len(found) < _SHOWN:
        relative = pending.pop()
        with os.scandir(out / relative) as entries:
            for entry in entries:
                name = f"{relative}/{entry.name}" if relative else entry.name
                if name == STORE_DIR or name in mine:
                    continue
                if entry.is_dir(follow_symlinks=False) and name in folders:
                    pending.append(name)
                elif not cut_short(entry.name):
                    found.append(name)
    return sorted(found)[:_SHOWN]


def claim(out: Path, force: bool) -> None:
    """Refuse a folder holding files no build wrote (they would be overwritten, or mixed
    with a build's own), unless `force`."""
    strangers = foreign(out)
    if strangers and not force:
        raise BehaviorError(
            f"{out} holds files behaviorc did not write: {', '.join(strangers)}",
            hint="build into a new or empty folder (--out), or pass --force-out to write "
                 "there anyway (a file with a build's name, like report.json, is replaced)")


def remove(out: Path) -> list[str]:
    """Remove what builds recorded writing in `out` and the store; keep everything else.
    Returns what was kept. The caller holds the store's lock."""
    out = Path(out)
    mine = owned(out)
    if mine is None:
        raise BehaviorError(f"{out} has no record of what a build wrote ({manifest_path(out)})",
                            hint="pass the --out folder of a build; remove other folders by hand")
    for name in sorted(mine, key=lambda n: -len(Path(n).parts)):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for name in sorted({str(Path(n).parent) for n in mine if len(Path(n).parts) > 1},
                       key=lambda n: -len(Path(n).parts)):
        try:
            (out / name).rmdir()  # only when the build's files were all it held
        except OSError:
            pass
    return sorted(entry.name for entry in out.iterdir() if entry.name != STORE_DIR)


def cut_short(name: str) -> bool:
    """A report write a kill cut short (`core.atomic`'s `.report.json.XXXX.tmp`)."""
    return name.startswith(f".{REPORT_FILE}.") and name.endswith(".tmp")
