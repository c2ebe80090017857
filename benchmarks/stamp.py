"""What a benchmark's numbers were measured on and under: the package's environment stamp
(``clarify_lit.environment.environment_stamp``: commit, library versions, CPU model and its bf16/AMX flags, torch
threads) and the load average of the machine (``/proc/loadavg``) — on a shared machine the load says how far the
wall-clock figures can be trusted (issue 28.5)."""

from __future__ import annotations

import os


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages (``/proc/loadavg``; ``os.getloadavg`` where it does not exist)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return [round(x, 2) for x in os.getloadavg()]


def machine_stamp(dtype: str | None = None) -> dict:
    """``environment_stamp`` on the CPU with ``dtype`` (the run's), plus the load average now."""
    from clarify_lit.environment import environment_stamp

    return {**environment_stamp("cpu", dtype), "loadavg": loadavg()}
