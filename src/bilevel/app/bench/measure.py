"""Time and peak memory of one process's runs: CPU (peak RSS) or CUDA (allocator peak).

On Linux the kernel's peak RSS (VmHWM) is reset after the baseline by writing 5 to
/proc/self/clear_refs, so the peak is the runs' own; where that is not allowed a thread samples
the RSS every millisecond instead. On a GPU the peak is torch.cuda.max_memory_allocated above the
memory allocated at the baseline, and every time is taken after torch.cuda.synchronize().
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class _RssSampler(threading.Thread):
    """Fallback: the highest RSS seen by sampling every `interval` seconds."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(), interval
        self.peak, self.running = self.process.memory_info().rss, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, self.process.memory_info().rss)


class Meter:
    """`start()` at the baseline (after imports and data); `peak_bytes()` after the runs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "cuda.max_memory_allocated" if self.cuda else ""
        self.baseline = 0
        self.sampler: _RssSampler | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.baseline = psutil.Process().memory_info().rss
        if _reset_peak_rss():
            self.method = "VmHWM (reset after baseline)"
        else:
            self.method = "RSS sampled every 1 ms"
            self.sampler = _RssSampler()
            self.sampler.start()

    def peak_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.baseline
        if self.sampler is not None:
            return self.sampler.stop() - self.baseline
        return _status_kb("VmHWM") * 1024 - self.baseline

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, function):
        """(seconds, result) of one call, synchronised on a GPU."""
        self.sync()
        began = time.perf_counter()
        result = function()
        self.sync()
        return time.perf_counter() - began, result
