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

import torch

from ..config import ATTENTION, GriffinConfig
from .griffin import LayerState


class PoolFullError(RuntimeError):
    """No free slot is left and the pool may not grow."""


class StatePool:
    """Preallocated per-layer state tensors for `capacity` slots.

    The pool grows (doubling) when a slot is requested and none is free, unless
    `max_capacity` is reached. Growing reallocates the tensors, so code that
    captures tensor addresses (CUDA graphs) must size the pool up front.
    """

    def __init__(self, config: GriffinConfig, dtype: torch.dtype, device: torch.device | str,
                 capacity: int = 1, max_capacity: int | None = None):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_capacity = max_capacity
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

    def _grow(self) -> None:
        old = self.capacity
        new = max(1, 2 * old)
        if self.max_capacity is not None:
            new = min(new, self.max_capacity)
        if new <= old:
            raise PoolFullError(f"all {old} state slots are in use (max_capacity={self.max_capacity})")
        grown = []
        for kind, layer in zip(self.config.block_types, self.layers):
            fresh = self._alloc_layer(kind, new)
            for dst, src in zip(fresh, layer):
                dst[:old].copy_(src)
            grown.append(fresh)
        self.layers = grown
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
