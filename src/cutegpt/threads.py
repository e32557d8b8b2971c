"""How many CPU threads a command uses (`--threads`, 0 = auto).

On a machine whose cores are already busy, torch's and llama.cpp's worker
threads spin on oversubscribed cores: measured on a loaded 2-core machine, chat
with 2 threads was 3-7x slower than with 1 and five-shot evaluation 2.2x slower,
while on an idle machine 2 threads decode ~1.9x faster. Auto therefore takes the
cores that other processes leave free (their CPU use over 0.2 s), at least one.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(window: float = 0.2) -> float | None:
    """How many cores other processes keep busy right now (CPU time over `window` seconds while we sleep).

    The 1-minute load average lags by a minute: right after another job ends it still says "busy" and
    auto would pick one thread on an idle machine (measured: half the speed), so it is only the fallback.
    """
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = sample()
    if first is None:
        return None
    time.sleep(window)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    busy_share = 1.0 - (second[1] - first[1]) / (second[0] - first[0])
    return busy_share * (os.cpu_count() or 1)


def resolve_threads(requested: int) -> int:
    """`requested` when > 0, else the cores other processes leave free (at least one)."""
    if requested > 0:
        return requested
    cores = available_cores()
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def apply_threads(requested: int) -> int:
    """Set torch's thread count from `--threads` (after resolving auto) and return it."""
    n = resolve_threads(requested)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def tokenizer_threads(requested: int) -> Iterator[int]:
    """Size the tokenizers library's thread pool (rayon) from `--threads` for one command; yields the count.

    rayon reads these variables once, when the pool first starts (in this process or a worker process), so they
    are set for the command only and restored afterwards; a variable the user set is left as it is.
    """
    n = resolve_threads(requested)
    added = [v for v in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS") if v not in os.environ]
    os.environ.update({v: str(n) for v in added})
    try:
        yield n
    finally:
        for v in added:
            os.environ.pop(v, None)


THREADS_HELP = ("CPU threads; 0 = auto: the cores other processes leave free (1 on a busy machine, "
                "where extra threads spin and run several times slower)")
