"""How many CPU threads a process may use for decoding: its share of the cores it may run on.

On a 192-core node with 8 training processes, one pipeline per process sized by
`os.cpu_count()` would start 192 threads each (1,536 in all) and DALI preallocates pinned
host memory per thread: tens of GB for nothing. Each process follows its own affinity mask
(what Slurm, taskset or `accelerate launch --enable_cpu_affinity` granted it): a mask that
spans the whole machine is shared by the processes on this node, a narrower one (the process
was bound to its own cores) is this process's alone. Capped: beyond about a dozen threads a
decoder feeding one GPU gains nothing.
"""

from __future__ import annotations

import os

MAX_DECODE_THREADS = 12


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes of this run on this node (set by torchrun / accelerate launch; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def machine_cores() -> int:
    return os.cpu_count() or 1


def decode_threads(requested: int = 0) -> int:
    """`requested` when given (> 0); else this process's share of the usable cores, capped."""
    if requested > 0:
        return requested
    cores = usable_cores()
    bound = cores < machine_cores()  # bound per process: these cores are already its share
    return max(1, min(MAX_DECODE_THREADS, cores if bound else cores // local_world_size()))
