"""`behaviorc build --nproc N`: the build on N processes, started by torch's elastic launcher.

The launcher (torch.distributed.elastic, what torchrun runs) starts N processes on this
machine, each running the same build command, joined into one torch.distributed world
(gloo on a CPU, NCCL beside gloo on GPUs); behaviorc.train.ranks says what each does. A
build started by torchrun itself (several nodes) skips this module and does the same.

This process waits for them. A process that dies (killed, out of memory, a crash) makes
the launcher stop the others; what was finished is stored and training checkpoints are
whole, so the next build resumes. Ctrl-C is left to rank 0, which stops the build at the
next step as one process would (this process and the other ranks ignore it).
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from typing import TYPE_CHECKING

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.devices import usable_cores

if TYPE_CHECKING:
    from behaviorc.train.distributed import World


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_world() -> "World | None":
    if not launched():
        return None
    from behaviorc.train.distributed import World
    return World.join()


def launch(argv: list[str], count: int) -> int:
    """Run `behaviorc ARGV` on `count` processes; rank 0's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // count)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")
    for talker in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(talker).setLevel(logging.CRITICAL)  # the failure is said below, once
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks inherit it; rank 0 takes Ctrl-C back
    try:
        results = elastic_launch(config, rank_main)(argv)
    except ChildFailedError as err:
        # A process killed by a signal is the cause; the others exit with an error when
        # they find it gone (rank 0 waits first, so that the launcher sees the cause).
        rank, failure = min(err.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp))
        raise BehaviorError(
            f"process {rank} of {count} {_ending(int(rank), failure.exitcode)}; the launcher stopped the others",
            hint="finished tasks and the last training checkpoint are kept: build again to resume, "
                 "with any --nproc") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    return int(results[0])


def rank_main(argv: list[str]) -> int:
    """One launched process. A rank above 0 that fails exits with its code, which the
    launcher takes as the signal to stop the others."""
    import sys

    from behaviorc.cli import main

    code = main(argv)
    if code != 0 and os.environ.get("RANK") != "0":
        sys.exit(code)
    return code


def _ending(rank: int, exitcode: int) -> str:
    from behaviorc.train.ranks import LOST_PEER_EXIT

    if rank == 0 and exitcode == LOST_PEER_EXIT:
        return "lost another process, which ended before the launcher saw it (killed or crashed)"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
