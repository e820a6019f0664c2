"""CUDA graphs of the filtered draw: the sort-free top-k/top-p pipeline is
about 17 Triton launches, and at ~35 us of host time each its launch cost,
not its GPU time, is what a serving tick paid for filters (bench/NOTES.md,
"Sampling filters"). A replayed graph issues them in one call.

A graph reads the logits at the address they had when it was captured, so
graphs are keyed by the logits' address, shape and strides (a decode step's
logits live in the step's static buffer, and the caching allocator hands a
recurring temporary the same block, so keys recur tick after tick); the
per-row values go through small static buffers. A key is captured the
second time it is seen, so a one-off address costs one eager call, not a
capture. The tokens are those of the eager pipeline, bit for bit (the same
kernels on the same inputs).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

Key = tuple


class _Graph:
    """One captured pipeline and its static inputs and output. staged: the
    graph reads its own copy of the logits (`x`), filled on every replay."""

    def __init__(self, kernel: Callable, x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None,
                 filters: tuple[torch.Tensor, torch.Tensor, torch.Tensor], flags: dict, staged: bool):
        self.x = x.clone() if staged else None
        self.words = words.clone()
        self.temps = None if temps is None else temps.clone()
        self.filters = tuple(t.clone() for t in filters)
        self.graph = torch.cuda.CUDAGraph()
        # Not torch.cuda.graph(): it empties the device and pinned-host caches, which would cost every later
        # upload a fresh pinned allocation. A side stream that follows the current one, as PyTorch requires;
        # thread_local: the engine's other threads may launch work meanwhile.
        current = torch.cuda.current_stream(x.device)
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = kernel(self.x if staged else x, self.words, self.temps, *self.filters, **flags)
            finally:
                self.graph.capture_end()
        current.wait_stream(stream)

    def replay(self, x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None,
               filters: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.x is not None:
            self.x.copy_(x)
        self.words.copy_(words, non_blocking=True)
        if temps is not None:
            self.temps.copy_(temps, non_blocking=True)
        for static, value in zip(self.filters, filters):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`; the caller may still read this


class FilterGraphs:
    """Runs `kernel` (`kernels.filter_smallk.filtered_draw`) from
    CUDA graphs, at most `max_graphs` of them (least recently used out).
    One per model: its graphs belong to the model's device.

    Logits the caller keeps (a decode step's output) are read in place, by
    address; `staged=True` says x is a temporary (penalized or selected rows,
    a new tensor per call), which is copied into a graph's own buffer: keyed
    by shape, not by an address that may never recur."""

    def __init__(self, kernel: Callable, max_graphs: int = 16, remembered: int = 64):
        self.kernel = kernel
        self.max_graphs = max_graphs
        self.remembered = remembered
        self._graphs: collections.OrderedDict[Key, _Graph] = collections.OrderedDict()
        self._seen: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None, top_k: torch.Tensor,
                 top_p: torch.Tensor, log_min_p: torch.Tensor, *, has_top_k: bool, has_top_p: bool,
                 staged: bool = False, small_k: int = 0) -> torch.Tensor:
        filters = (top_k, top_p, log_min_p)
        flags = {"has_top_k": has_top_k, "has_top_p": has_top_p, "small_k": small_k}
        where = ("staged",) if staged else (x.data_ptr(), x.stride())
        key = (x.device, *where, tuple(x.shape), temps is None, has_top_k, has_top_p, small_k)
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._seen:  # seen once: eager (which also compiles the kernels)
                self._remember(key)
                return self.kernel(x, words, temps, *filters, **flags)
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            graph = self._graphs[key] = _Graph(self.kernel, x, words, temps, filters, flags, staged)
            self.captures += 1
        self._graphs.move_to_end(key)
        return graph.replay(x, words, temps, filters)

    def _remember(self, key: Key) -> None:
        self._seen[key] = None
        while len(self._seen) > self.remembered:
            self._seen.popitem(last=False)
