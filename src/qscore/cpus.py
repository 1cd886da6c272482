"""How many CPU cores this process may really use.

``os.cpu_count()`` counts the host's cores; a container or a cron job pinned to a few of them
(cpuset, ``taskset``) or given a CPU quota (``docker --cpus 2``) gets far fewer, and sizing worker
pools and threads by the host oversubscribes it: every thread then waits on the others.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus() -> int:
    """Cores in this process's affinity mask, capped by a cgroup CPU quota (v2 or v1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup quota (``cpu.max`` or ``cpu.cfs_quota_us / cpu.cfs_period_us``),
    None when unlimited or unreadable."""
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file:
                fields.append(Path(period_file).read_text().strip())
            quota, period = fields[0], float(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return float(quota) / period
    return None
