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


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by the cgroup quota (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), None when unlimited or unreadable."""
    for quota_file, period_file in ((root / "cpu.max", None), (root / "cpu/cpu.cfs_quota_us", root / "cpu/cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            if period_file:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], float(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return float(quota) / period
    return None
