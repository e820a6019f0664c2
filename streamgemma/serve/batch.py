"""The model work of a tick: sample every generating row at once, run ONE
decode over them plus the riding input rows, keep its logits (each
session's logits are then a row of that one tensor), and accept the tokens.

Two strategies, picked by where the cost is:
- `ThreadedBatch` (CPU): the model's arithmetic is the cost, so all of it
  runs in a worker thread and the event loop stays free.
- `InLoopBatch` (CUDA): the host only launches work and keeps books; in a
  worker thread that Python would fight the event loop for the GIL. So it
  samples, launches the decode on the device's sampled ids and accepts in
  the loop, and only the wait for the ids (which releases the GIL) goes to
  a thread. The decode is queued right behind the sampling, so the device
  goes on to the step while the host waits for the ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch

from ..sampling.logprobs import ScoredRows, score_rows
from ..sampling.sampler import PendingIds, SampleRow, SamplingPlan
from ..session.generation import Generation
from ..session.host import HostState
from ..session.model import Model
from ..session.session import Session
from ..types import Token
from .record import EngineStats

Inputs = Sequence[tuple[Session, int]]  # (session, its next input token)


class BatchExecutor:
    def __init__(self, model: Model, stats: EngineStats):
        self.model = model
        self.stats = stats
        # The last tick's logits [B, V] (decode's result), and whose logits each row is.
        self.kept: torch.Tensor | None = None
        self._kept_states: list[HostState] = []
        self._scored: ScoredRows | None = None  # the last sample's logprobs
        # The sampling plan of the last batch, and its generations (in row order): kept while they stay.
        self._plan: SamplingPlan | None = None
        self._planned: list[Generation] = []

    async def run(self, generations: list[Generation], slots: list[int], inputs: Inputs) -> list[Token]:
        """Advance `generations` (in `slots`) by one sampled token each and
        consume one token for each of `inputs`; the generations' Tokens."""
        raise NotImplementedError

    def sample(self, generations: list[Generation]) -> PendingIds:
        logits = self._batch_logits(generations)
        vocab = generations[0].vocab
        rows = logits if vocab == logits.shape[1] else logits[:, :vocab]
        plan = self._plan_for(generations, rows)
        rngs = [generations[i].take_rng() for i in plan.sampled_rows]
        recents = [generations[i].recent_ids() for i in plan.penalized_rows]
        pending = PendingIds.of(plan.launch(rows, rngs, recents, graphs=self.model.sampling_graphs))
        # Queued before the decode, so reading them never waits for it (None: nobody asked).
        self._scored = None if not plan.logprobs else score_rows(
            rows, pending.device_ids, [SampleRow(g.params, None, g.recent_ids()) for g in generations])
        return pending

    def _plan_for(self, generations: list[Generation], rows: torch.Tensor) -> SamplingPlan:
        """The last tick's plan while the batch is the same generations in the
        same order (a new generation is a new object, so new params are a new
        plan); else a new one."""
        planned = self._planned
        if (self._plan is None or len(planned) != len(generations)
                or any(a is not b for a, b in zip(planned, generations))):
            self._plan = SamplingPlan([g.params for g in generations], rows.shape[1], rows.device)
            self._planned = list(generations)
            self.stats.sampling_plans += 1
        return self._plan

    def launch_decode(self, generations: list[Generation], slots: list[int], inputs: Inputs,
                      tokens: list[int] | torch.Tensor) -> None:
        """One decode call for the generations' rows (`tokens`: their ids, host
        ints or an int64 device tensor) plus a row per input, and one copy of
        the logits. Caller holds the model's lock; nothing here waits for the device."""
        riders = [t for _, t in inputs]
        if isinstance(tokens, torch.Tensor):
            if riders:
                extra = torch.tensor(riders, dtype=torch.int64)
                if tokens.device.type == "cuda":
                    extra = extra.pin_memory()
                tokens = torch.cat([tokens, extra.to(tokens.device, non_blocking=True)])
        else:
            tokens = list(tokens) + riders
        # decode's result is a new tensor: each session keeps its row of it, no copy.
        self.kept = self.model.decode(slots + [s.slot for s, _ in inputs], tokens)
        self._kept_states = [g.state for g in generations] + [s.state for s, _ in inputs]
        self.stats.decode_calls += 1
        self.stats.decoded_tokens += len(generations)
        self.stats.decoded_input_tokens += len(inputs)

    def accept(self, generations: list[Generation], inputs: Inputs, picked: list[int]) -> list[Token]:
        """Record the tokens the last `launch_decode` consumed in their sessions."""
        kept = self.kept  # each session's logits: its row, (kept, i), a view only when asked for
        for i, (session, token) in enumerate(inputs, len(generations)):
            session.state.consume_one(token, (kept, i))
        scored = self._scored
        if scored is None:
            return [g.accept(t, (kept, i)) for i, (g, t) in enumerate(zip(generations, picked))]
        return [g.accept(t, (kept, i), scored.get(i)) for i, (g, t) in enumerate(zip(generations, picked))]

    def _batch_logits(self, generations: list[Generation]) -> torch.Tensor:
        """The sessions' logits as one float32 [B, V] tensor: the last tick's
        copy when the batch is the same sessions in the same order (the steady
        state), else a stack of their rows."""
        states = [g.state for g in generations]
        kept = self.kept
        if (kept is not None and len(kept) == len(states)
                and all(s.holds_row(kept, i) for i, s in enumerate(states))):
            return kept
        # A session that left the batch copies its row out, so the old buffer is freed.
        staying = set(map(id, states))
        for i, s in enumerate(self._kept_states):
            if s.holds_row(kept, i) and id(s) not in staying:
                s.logits = kept[i].clone()
        return torch.stack([s.logits for s in states])


class ThreadedBatch(BatchExecutor):
    async def run(self, generations: list[Generation], slots: list[int], inputs: Inputs) -> list[Token]:
        t0 = time.perf_counter()
        tokens = await anyio.to_thread.run_sync(self._run_sync, generations, slots, inputs)
        self.stats.phase_seconds["decode"] += time.perf_counter() - t0
        return tokens

    def _run_sync(self, generations: list[Generation], slots: list[int], inputs: Inputs) -> list[Token]:
        with self.model.lock:
            picked = self.sample(generations).ids() if generations else []
            self.launch_decode(generations, slots, inputs, picked)
        return self.accept(generations, inputs, picked)


class InLoopBatch(BatchExecutor):
    async def run(self, generations: list[Generation], slots: list[int], inputs: Inputs) -> list[Token]:
        lock = self.model.lock  # an RLock: taken and released by this thread
        while not lock.acquire(blocking=False):  # a Session outside the engine is using the model
            await anyio.sleep(0.001)
        phases = self.stats.phase_seconds
        try:
            # A cancellation requested earlier ends the tick here, before any session is touched...
            await anyio.lowlevel.checkpoint_if_cancelled()
            t0 = time.perf_counter()
            pending = self.sample(generations) if generations else None
            t1 = time.perf_counter()
            self.launch_decode(generations, slots, inputs, pending.device_ids if pending is not None else [])
            t2 = time.perf_counter()
            if pending is not None:
                # ... and none arrives between launching the step and recording its
                # tokens: the sessions' books must match what the device consumed.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(pending.wait)
            t3 = time.perf_counter()
            tokens = self.accept(generations, inputs, pending.ids() if pending is not None else [])
            phases["sample"] += t1 - t0
            phases["wait"] += t3 - t2
            phases["decode"] += (t2 - t1) + (time.perf_counter() - t3)
            return tokens
        finally:
            lock.release()


STRATEGIES = {"thread": ThreadedBatch, "loop": InLoopBatch}


def batch_executor(model: Model, stats: EngineStats, host_work: str | None = None) -> BatchExecutor:
    """host_work: "loop" (InLoopBatch) or "thread" (ThreadedBatch); default
    "loop" on CUDA, "thread" elsewhere."""
    if host_work is None:
        host_work = "loop" if model.device.type == "cuda" else "thread"
    if host_work not in STRATEGIES:
        raise ValueError(f"host_work must be one of {sorted(STRATEGIES)}, got {host_work!r}")
    return STRATEGIES[host_work](model, stats)
