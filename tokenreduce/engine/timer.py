"""Wall-clock of the reduction's own work, without host-device syncs on the hot path."""

from __future__ import annotations

import time

import torch


class Timer:
    """Sums the time spent inside ``with timer:`` blocks. On CUDA it records events and reads them
    only when :meth:`total_ms` is asked for; on CPU it uses ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cpu_ms = 0.0

    def __enter__(self) -> Timer:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.cpu_ms += (time.perf_counter() - self._t0) * 1e3

    def total_ms(self) -> float:
        if self.cuda and self.events:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events)
        return self.cpu_ms
