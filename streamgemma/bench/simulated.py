"""A simulated device for host-side serving benchmarks (`bench serve
--simulate-step-ms`): the question "does the host keep the GPU busy" asked
on any machine, without the GPU.

The engine runs as on CUDA (its host work on the event loop's thread, only
the wait for the sampled ids in a worker thread), over a small CPU model
whose `decode` is replaced: it advances the slots' positions, returns rows
of a fixed logits buffer at once, and books `step` seconds on a simulated
device. Sampling is the real code on those rows (a greedy argmax is cheap on
a CPU; a sampled row's noise is not) and books `sample` seconds; the ids
become readable when the device reaches that point. The device runs what
it was given in order, one thing at a time, as a CUDA stream does, so it
idles exactly when the host has not yet queued the next step.
"""

from __future__ import annotations

import time

import torch

import streamgemma as sg


class SimulatedDevice:
    """An in-order queue of work: `run(seconds)` books `seconds` after
    everything booked before (or from now, if it idles) and returns when
    that work ends (time.monotonic)."""

    def __init__(self):
        self.free_at = 0.0
        self.busy = 0.0  # seconds of work booked (monitoring)

    def run(self, seconds: float) -> float:
        self.free_at = max(time.monotonic(), self.free_at) + seconds
        self.busy += seconds
        return self.free_at


class SimulatedIds:
    """A sample's ids (`PendingIds`'s interface) that are readable once the
    simulated device has reached them: `wait` sleeps until then."""

    def __init__(self, pending, ready_at: float):
        self._pending, self._ready_at = pending, ready_at
        self.device_ids = pending.device_ids

    def wait(self) -> None:
        delay = self._ready_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def ids(self) -> list[int]:
        self.wait()
        return self._pending.ids()


class SimulatedDecode:
    """Stands in for `Model.decode`: advances positions, returns rows of a
    fixed logits buffer, books a step on the device."""

    def __init__(self, model: sg.Model, device: SimulatedDevice, step: float, max_batch: int):
        self.pool, self.device, self.step = model.pool, device, step
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(max_batch, model.config.vocab_size, generator=g) * 3.0

    def __call__(self, slots, tokens) -> torch.Tensor:
        for s in slots:
            self.pool.positions[s] += 1
        self.device.run(self.step)
        return self.logits[:len(slots)]


def simulated_model(vocab: int = 512) -> sg.Model:
    """A tiny CPU model (random weights): its prefill is real and cheap; its decode is replaced by `attach`."""
    torch.set_num_threads(1)
    config = sg.GriffinConfig.preset("tiny", vocab_size=vocab)
    return sg.Model.random(config, seed=0, device="cpu", dtype="float32")


def attach(engine, step: float, sample: float, max_batch: int) -> SimulatedDevice:
    """Route `engine`'s decode steps and samples through a new simulated
    device (the engine must do its host work in the loop: host_work="loop")."""
    device = SimulatedDevice()
    executor = engine.executor
    executor.model.decode = SimulatedDecode(executor.model, device, step, max_batch)
    real_sample = executor.sample

    def simulated_sample(generations):
        pending = real_sample(generations)
        return SimulatedIds(pending, device.run(sample))

    executor.sample = simulated_sample
    return device
