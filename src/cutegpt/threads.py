"""How many CPU threads a command uses (`--threads`, 0 = auto).

On a machine whose cores are already busy, torch's and llama.cpp's worker
threads spin on oversubscribed cores: measured on a loaded 2-core machine, chat
with 2 threads was 3-7x slower than with 1 and five-shot evaluation 2.2x slower,
while on an idle machine 2 threads gain ~1.3x. Auto therefore takes the cores
that other processes leave free (1-minute load average), at least one.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(requested: int) -> int:
    """`requested` when > 0, else the cores other processes leave free (at least one)."""
    if requested > 0:
        return requested
    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def apply_threads(requested: int) -> int:
    """Set torch's thread count from `--threads` (after resolving auto) and return it."""
    n = resolve_threads(requested)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)
    return n


THREADS_HELP = ("CPU threads; 0 = auto: the cores other processes leave free (1 on a busy machine, "
                "where extra threads spin and run several times slower)")
