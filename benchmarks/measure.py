"""Measuring helpers for `benchmarks.run`: best-of timing, the peak memory of a block and
the machine a run was measured on (so no figure travels without it).

Peak memory on CPU is the kernel's high-water mark of this process's resident set
(`VmHWM` in /proc/self/status), reset at the start of a block by writing 5 to
/proc/self/clear_refs (Linux >= 4.0). Unlike `ru_maxrss` it starts afresh in a new process
image (`ru_maxrss` of a child carries its parent's peak across fork + exec) and it sees
every allocator (numpy, Arrow, torch), not only Python's. Where that file is not writable,
the resident set is sampled on a thread instead. On CUDA: `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

MB = 1024 * 1024


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(fastest wall seconds of `repeat` calls, the last result). The fastest run is the one
    least disturbed by other work on a shared machine."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process image's peak resident set (VmHWM), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current resident set; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: `base_bytes` at entry, `peak_bytes` during it, `peak_mb` the
    difference in MiB (see the module docstring for how each device measures it)."""

    def __init__(self, device: torch.device | None = None, interval: float = 0.002):
        self.cuda = device is not None and device.type == "cuda"
        self.interval = interval
        self.base_bytes = self.peak_bytes = 0
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_bytes = torch.cuda.memory_allocated()
            return self
        self.base_bytes = self.peak_bytes = rss_bytes()
        self._thread = None
        if not reset_peak_rss():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._thread is None:
            self.peak_bytes = peak_rss_bytes()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
        self.peak_mb = (self.peak_bytes - self.base_bytes) / MB


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on, and how busy the machine was at the start."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device.type if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "python": platform.python_version(),
        "load_average_1m_at_start": round(load[0], 2),
    }
