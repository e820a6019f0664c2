"""The state pool: every session's recurrent state, preallocated per layer and
indexed by slot, so many sessions can share one batched step.

Per slot and layer:
- recurrent layer: conv buffer [conv_width - 1, lru_width] (model dtype) and
  RG-LRU state h [lru_width] (float32);
- attention layer: key and value rings [window, head_dim] (model dtype), the
  key of absolute position q at index q % window.
Per slot: the position (tokens consumed so far), kept on the host: every path
needs it to build position tensors and it never depends on device results.

A slot's memory is fixed at allocation: it does not grow with the number of
tokens a session consumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ATTENTION, GriffinConfig
from ..errors import CapacityError
from .griffin import LayerState


class StatePool:
    """Preallocated per-layer state tensors for `capacity` slots.

    The pool grows (doubling) when a slot is requested and none is free, up to
    `max_capacity` slots and `max_bytes` of state (None: no bound); past them
    `allocate` raises CapacityError. Growing reallocates the tensors, so code
    that captures tensor addresses (CUDA graphs) must size the pool up front.
    """

    def __init__(self, config: GriffinConfig, dtype: torch.dtype, device: torch.device | str,
                 capacity: int = 1, max_capacity: int | None = None, max_bytes: int | None = None):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_capacity = max_capacity
        self.max_bytes = max_bytes
        self.layers: list[LayerState] = [self._alloc_layer(kind, capacity) for kind in config.block_types]
        self.positions: list[int] = [0] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self.generation = 0  # bumped when the tensors are reallocated (captured graphs go stale)

    @property
    def capacity(self) -> int:
        return len(self.positions)

    def _alloc_layer(self, kind: str, n: int) -> LayerState:
        cfg = self.config
        if kind == ATTENTION:
            shape = (n, cfg.attention_window, cfg.head_dim)
            return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device))
        return (torch.zeros(n, cfg.conv_width - 1, cfg.lru_width, dtype=self.dtype, device=self.device),
                torch.zeros(n, cfg.lru_width, dtype=torch.float32, device=self.device))

    def slot_bytes(self) -> int:
        """Bytes of device memory one slot's state occupies."""
        return sum(t[0].numel() * t.element_size() for layer in self.layers for t in layer)

    # -- slots ------------------------------------------------------------------
    def allocate(self) -> int:
        """A free slot, reset to position 0."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.reset(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Zero a slot's state and set its position to 0."""
        for layer in self.layers:
            for t in layer:
                t[slot].zero_()
        self.positions[slot] = 0

    def copy_slot(self, src: int, dst: int) -> None:
        """Make slot `dst` an exact copy of slot `src`."""
        for layer in self.layers:
            for t in layer:
                t[dst].copy_(t[src])
        self.positions[dst] = self.positions[src]

    def max_slots(self) -> int | None:
        """The most slots the pool may hold: the tighter of `max_capacity` and
        `max_bytes` (None: unbounded)."""
        bounds = [b for b in (self.max_capacity, None if self.max_bytes is None else
                              self.max_bytes // self.slot_bytes()) if b is not None]
        return min(bounds) if bounds else None

    def _grow(self) -> None:
        old = self.capacity
        new = max(1, 2 * old)
        limit = self.max_slots()
        if limit is not None:
            new = min(new, limit)
        if new <= old:
            raise CapacityError(self._full_message())
        # Layer by layer, so the old tensors of one layer at most live beside the new ones.
        for i, kind in enumerate(self.config.block_types):
            try:
                fresh = self._alloc_layer(kind, new)
            except BaseException:  # roll back: every layer keeps `old` slots (views of the grown ones)
                for j in range(i):
                    self.layers[j] = tuple(t[:old] for t in self.layers[j])
                raise
            for dst, src in zip(fresh, self.layers[i]):
                dst[:old].copy_(src)
            self.layers[i] = fresh
        self.generation += 1
        self.positions += [0] * (new - old)
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    # -- batched access -----------------------------------------------------------
    def gather(self, slots: torch.Tensor) -> list[LayerState]:
        """Copies of the state of `slots` ([B] int64 on the pool's device)."""
        return [tuple(t.index_select(0, slots) for t in layer) for layer in self.layers]

    def scatter(self, slots: torch.Tensor, states: list[LayerState]) -> None:
        """Write states (as returned by the model) back into `slots`."""
        for layer, state in zip(self.layers, states):
            for dst, src in zip(layer, state):
                dst.index_copy_(0, slots, src.to(dst.dtype))

    def _full_message(self) -> str:
        if self.max_capacity is not None and self.capacity >= self.max_capacity:
            why = f"max_sessions={self.max_capacity:,} allows no more"
        else:
            why = (f"they fill the state budget of {self.max_bytes / 2**20:,.0f} MiB at "
                   f"{self.slot_bytes() / 2**20:.2f} MiB each (max_state_bytes)")
        return (f"no room for another session: {self.capacity:,} sessions are open and {why}; close sessions "
                f"you no longer need, or load the model with a larger max_state_bytes= or max_sessions=")


def available_memory(device: torch.device) -> int | None:
    """Bytes that new allocations on `device` may take now: free device memory
    on CUDA; on the host, the kernel's MemAvailable, bounded by the cgroup's
    limit (a container's OOM killer counts that, not the machine). None where
    it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        host = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    headroom = _cgroup_headroom()
    return host if headroom is None else min(host, headroom)


def _cgroup_headroom() -> int | None:
    """The memory this process's cgroup may still take (limit - usage), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)  # hierarchy id : controllers : path
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        if controllers == "":  # cgroup v2
            names, base = ("memory.max", "memory.current"), Path("/sys/fs/cgroup")
        elif "memory" in controllers.split(","):  # cgroup v1
            names, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), Path("/sys/fs/cgroup/memory")
        else:
            continue
        # Inside a container the group's path may be its mount's root.
        for root in (base / group.lstrip("/"), base):
            try:
                limit, usage = ((root / name).read_text().strip() for name in names)
                if limit != "max" and int(limit) < 2**60:  # v1 says "no limit" with a huge number
                    return max(0, int(limit) - int(usage))
                break
            except (OSError, ValueError):
                continue
    return None
