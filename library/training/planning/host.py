"""Host RAM for the memory planner: what this process may hold in host memory for the GPU (offloaded
activations, swapped blocks, an inactive expert), from the kernel's MemAvailable shared among the node's
local processes (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate)."""

from __future__ import annotations

import os

GIB = 2**30
HOST_FRACTION = 0.9  # the share of a process's host RAM the planner lets the GPU's buffers take (the rest:
# data loading, cached latents and text, the Python heap)


def mem_available_gb(meminfo: str = "/proc/meminfo") -> float | None:
    """MemAvailable in GiB, or None where /proc/meminfo does not say (not Linux)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def local_processes() -> int:
    """The training processes on this node (`LOCAL_WORLD_SIZE`, 1 when unset or unreadable)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def detect_host_ram_gb(meminfo: str = "/proc/meminfo") -> float | None:
    """The host RAM this process may use in GiB: MemAvailable divided among the node's local processes; None
    when it cannot be read (the planner then does not check host RAM)."""
    available = mem_available_gb(meminfo)
    return None if available is None else available / local_processes()
