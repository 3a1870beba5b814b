"""What a machine has for parallel work: GPUs, else usable CPU cores."""

from __future__ import annotations

import os

from behaviorc.core.diagnostics import BehaviorError


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def check_process_count(count: int, option: str) -> None:
    """One process per GPU, or per usable CPU core without one."""
    import torch

    if count < 1:
        raise BehaviorError(f"{option} {count}: at least one process is needed")
    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPU"
    else:
        have, what = usable_cores(), "usable CPU core"
    if count > have:
        raise BehaviorError(f"{option} {count}: this machine has {have} {what}{'s' if have != 1 else ''}, "
                            f"and each process needs its own", hint=f"use {option} {have} or fewer; "
                            "several machines are started with torchrun (see the README)")
