"""A stand-in transport for the staged loader (`library/wan/staged_load.py`) whose copies lag behind the casts,
as DMA does on a GPU: shared by the staged-load tests."""

from __future__ import annotations

import torch

from library.wan import staged_load
from library.wan.staged_load import HostTransport


class LaggingTransport(HostTransport):
    """Copies (and the finite sums queued behind them) happen only when an event recorded after them is waited
    for, or at `finish`, like DMA that trails the cast: a buffer written again too early gives wrong values."""

    def __init__(self):
        super().__init__()
        self.queue, self.done, self.waits, self.joins = [], 0, 0, 0

    def _run(self, upto: int) -> None:
        while self.done < upto:
            self.queue[self.done]()
            self.done += 1

    def copy(self, dst, src):
        self.copies += 1
        self.queue.append(lambda: dst.copy_(src))

    def finite(self, tensor):
        flag = torch.zeros((), dtype=torch.bool)
        self.queue.append(lambda: flag.copy_(torch.isfinite(staged_load._sum(tensor))))
        return flag

    def record(self):
        return len(self.queue)

    def wait(self, event):
        self.waits += 1
        self._run(event)

    def join(self):  # the compute stream waits for the copies: they have all landed before it reads them
        self.joins += 1
        self._run(len(self.queue))

    def finish(self):
        self._run(len(self.queue))
