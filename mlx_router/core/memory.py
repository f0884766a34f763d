"""System memory readings, behind a probe the manager takes as a parameter (tests pass fakes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    total_bytes: int
    available_bytes: int


MemoryProbe = Callable[[], MemorySnapshot]


def system_memory() -> MemorySnapshot:
    """Physical memory of this machine (unified memory on Apple silicon)."""
    vm = psutil.virtual_memory()
    return MemorySnapshot(total_bytes=int(vm.total), available_bytes=int(vm.available))
