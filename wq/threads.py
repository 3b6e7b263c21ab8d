"""CPU threads on a shared machine: OpenMP threads that sleep while they wait, and a report of the load.

torch's CPU ops run in OpenMP parallel regions. GNU OpenMP's default lets a thread that reaches the end of
a region spin for a while before sleeping; when another process holds a core, the thread we wait for is
not running, and the spinning one burns the time it would need. Measured on the 2-core build machine
under a load average of 5.5 (other processes), RTN-quantizing the bundled model took 48 s with the
default policy, 80 s with OMP_WAIT_POLICY=ACTIVE, 5.2 s with PASSIVE (threads sleep at once) and 5.9 s on
one thread (docs/cpu.md, "Threads on a busy machine").

`configure_openmp()` makes PASSIVE the default. OpenMP reads it once, when torch's runtime loads, so it
must run before `import torch`: wq's and eval's package __init__ call it first thing; a user's explicit
OMP_WAIT_POLICY (or GOMP_SPINCOUNT) wins. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys


def configure_openmp(env: dict | None = None) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy. Returns whether it takes effect (False when
    torch was imported first: its OpenMP runtime has already read the environment)."""
    env = os.environ if env is None else env
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return "torch" not in sys.modules


def hint_if_too_late(log) -> None:
    """torch was imported before wq, without a wait policy, on a machine busier than its CPUs: say what to set (once;
    OpenMP cannot change its policy after it started)."""
    load = load_average()
    if ("torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
            and load is not None and load > cpu_count()):
        log.warning("load average %.1f on %d CPUs and torch was imported before wq: set OMP_WAIT_POLICY=PASSIVE before "
                    "starting Python (on a busy machine OpenMP's spinning default made CPU work up to 10x slower "
                    "here; see wq/threads.py)", load, cpu_count())


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, all users), or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_threads(cpus: int, load: float | None, own: float = 0.0) -> int:
    """Threads for torch: the CPUs that other processes leave idle (at least one). `own`: how much of the load
    average is this process itself (e.g. 1 while it is already computing)."""
    if load is None:
        return cpus
    idle = cpus - max(0.0, load - own)
    return max(1, min(cpus, int(idle + 0.5)))


def describe() -> str:
    """One line for reports: threads, CPUs, load average and wait policy."""
    import torch

    load = load_average()
    return (f"{torch.get_num_threads()} threads on {cpu_count()} CPUs, load average "
            f"{'n/a' if load is None else f'{load:.2f}'}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
