"""`sample_rows` picks the next token of many rows of float32 logits on
the model's device at once, each row with its own settings and random stream
(a counter-based Philox stream, `philox.RandomStream`: the noise of every
row comes from one kernel launch on CUDA). `Session.generate` (one row) and
the engine (a batch) both sample through it, so a session gets the same
tokens either way."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .filters import sample_filtered, small_k_slots
from .params import SamplingParams
from .philox import RandomStream, gumbel_argmax_reference, stream_words

_U64 = 2 ** 64


class SampleRow(NamedTuple):
    """What sampling needs of one row besides its logits.

    params: the generation's settings. rng: the row's (seed, counter) in its
    random stream, ints in [0, 2**64) (`RandomStream.take()`); required on a
    sampled row (temperature > 0), unused (may be None) on a greedy one.
    recent: the ids the penalties see, an int64 CPU tensor [N] (order and
    repeats do not matter; ids outside the sampled vocabulary are ignored),
    or None when the row has no penalty.
    """

    params: SamplingParams
    rng: tuple[int, int] | None = None
    recent: torch.Tensor | None = None


def sample_rows(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    """The next token id of every row, with ONE device-to-host transfer.

    logits: float32 [B, V] on the model's device (a strided view is fine,
    e.g. columns sliced to the tokenizer's vocabulary); row i is sampled with
    rows[i]. Row i's token depends only on logits[i] and rows[i] (not on the
    other rows), so a session gets the same token alone (`Session.generate`,
    B = 1) as in any batch of the engine.

    How a row is sampled, in this order: penalties on the recent ids
    (positive logits divided by repetition_penalty, negative multiplied;
    presence_penalty subtracted); greedy rows take the argmax. Sampled rows:
    logits / temperature; top_k keeps logits >= the k-th largest; top_p keeps
    the tokens in order of logit (ties by id) while the probability mass
    before each is < top_p; min_p keeps logits >= max + log(min_p)
    (probability >= min_p x the top one's); `filters` defines the kept set
    exactly (masses in integer arithmetic). The token is the smallest index v
    maximising x[v] - log(-log(u[v])) (float32), x the scaled, filtered
    logits, u[v] in (0, 1) from Philox4x32-10 at the row's (seed, counter)
    (the Gumbel-max trick: a draw from softmax(x), with no normalisation;
    `streamgemma.sampling.philox` defines u exactly). x / T is one correctly
    rounded float32 division wherever it is computed.

    The random stream: a sampled row uses its rows[i].rng = (seed, counter)
    and nothing else (the caller then advances its counter by 1:
    `RandomStream.take()`); greedy rows use none. The noise is a function of
    (seed, counter, v) alone, so a restored stream continues exactly, alone
    or batched, and on CPU and CUDA alike up to the rounding of the logits
    and of the log.

    Cost: the greedy rows share one argmax; penalties are one copy of the
    penalized rows plus a gather and a scatter of their recent ids. Without
    filters, the noise, x / T and the argmax of all sampled rows are one
    Triton kernel on CUDA (two launches); with filters, the sort-free kernels
    of `filters` (a radix search per filter, then the noise and argmax over
    the kept tokens, reading about k tiles per row under top_k). The PyTorch
    forms run on the CPU. Per row the host only packs a few numbers: the
    rows' settings in one upload per `SamplingPlan` (the engine keeps one
    while its batch is unchanged), their streams and recent ids in one
    upload per call. The host never waits for the device except for the
    final read of the B ids.
    """
    return PendingIds(logits, rows).ids()


class PendingIds:
    """`sample_rows` in two halves: constructing it launches the device work
    and the copy of the ids to the host; `wait()` blocks until they are there
    (on CUDA it waits on an event, which releases the GIL, so a caller can
    wait in a worker thread while its own thread keeps launching and
    bookkeeping); `ids()` returns them (waiting if needed). `device_ids`
    holds them on the device (int64 [B], row order) as soon as the work is
    launched: a decode step can take them from there before the host has
    them. graphs: the model's `sampling_graphs` (CUDA graphs of the filters)
    or None."""

    def __init__(self, logits: torch.Tensor, rows: Sequence[SampleRow], graphs: Callable | None = None,
                 launched: torch.Tensor | None = None):
        values = launched  # (`of`: launched already)
        if values is None and not rows:
            values = torch.empty(0, dtype=torch.int64, device=logits.device)
        elif values is None:
            plan = SamplingPlan([r.params for r in rows], logits.shape[1], logits.device)
            values = plan.launch(logits, [rows[i].rng for i in plan.sampled_rows],
                                 [rows[i].recent for i in plan.penalized_rows], graphs)
        self.device_ids = values
        self._event = None
        self._host = values
        if values.device.type == "cuda" and values.numel():
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    @classmethod
    def of(cls, device_ids: torch.Tensor) -> PendingIds:
        """Ids already launched on the device (`SamplingPlan.launch`): their copy to the host starts now."""
        return cls(device_ids, (), launched=device_ids)

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def ids(self) -> list[int]:
        self.wait()
        return self._host.tolist()


def sample(logits: torch.Tensor, params: SamplingParams, rng: RandomStream | None) -> torch.Tensor:
    """The next token id, a 0-dim int64 tensor on the logits' device: one row
    of `sample_rows` (same noise, same token), without reading it back.

    logits: float32 [V] (penalties are applied by `sample_rows` from the row's
    recent ids; here there are none). `rng` is only used, and then advanced
    by one, when sampling (temperature > 0); it may be None for greedy params.
    """
    plan = SamplingPlan([params], logits.shape[0], logits.device)
    rngs = [rng.take() if rng is not None else None] if plan.sampled_rows else []
    return plan.launch(logits[None], rngs, [None] * len(plan.penalized_rows))[0]


def apply_penalties(logits: torch.Tensor, recent: torch.Tensor, repetition: float, presence: float) -> torch.Tensor:
    """Penalize tokens in `recent` ([N] int64 ids, on any device; repeats
    count once, ids >= V are ignored). logits: float32 [V]. Returns a new [V]
    tensor, the values `sample_rows` samples from."""
    ids = _penalty_ids([recent.cpu()], logits.shape[0]).to(logits.device)
    factors = torch.tensor([[float(repetition), float(presence)]], dtype=torch.float32, device=logits.device)
    return _penalize(logits[None], ids, factors[:, 0:1], factors[:, 1:2])[0]


# -- implementation --------------------------------------------------------------------
def _penalty_ids(recents: Sequence[torch.Tensor | None], vocab: int) -> torch.Tensor:
    """int64 [P, W] rows of ids < vocab to penalize, padded with a repeat of the
    row's first such id (a repeat is penalized once, so no two writes of a
    scatter differ); a row with none is all `vocab` (nothing is written)."""
    sizes = [0 if r is None else r.numel() for r in recents]
    ids = np.full((len(recents), max(1, max(sizes))), vocab, dtype=np.int64)
    for k, (r, n) in enumerate(zip(recents, sizes)):
        if n:
            ids[k, :n] = r.numpy()
    usable = ids < vocab
    first = ids[np.arange(len(ids)), usable.argmax(axis=1)]
    fill = np.where(usable.any(axis=1), first, vocab)
    return torch.from_numpy(np.where(usable, ids, fill[:, None]))


def _penalize(x: torch.Tensor, ids: torch.Tensor, repetition: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """x: float32 [P, V]; ids: int64 [P, W] from `_penalty_ids`; repetition,
    presence: float32 [P, 1]. A new [P, V] tensor (one copy of x); only the
    ids' entries change, each once (what the gather reads is the original)."""
    present = ids < x.shape[1]
    at = torch.where(present, ids, 0)
    before = x.gather(1, at)
    after = torch.where(before > 0, before / repetition, before * repetition) - presence
    return x.clone().scatter_(1, at, torch.where(present, after, before))


def _upload(parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """`parts` joined into one tensor of `dtype` on `device`, in one copy (a
    pinned, non-blocking copy on CUDA: the host does not wait); None if none."""
    if not parts:
        return None
    host = torch.cat(parts) if len(parts) > 1 else parts[0]
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


class _Layout:
    """Named slices of values sent together (`_upload`)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.parts: list[torch.Tensor] = []
        self.slices: dict[str, tuple[int, int]] = {}
        self._size = 0

    def add(self, name: str, values) -> None:
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=self.dtype)
        t = t.reshape(-1).to(self.dtype)
        self.slices[name] = (self._size, t.numel())
        self.parts.append(t)
        self._size += t.numel()

    def views(self, uploaded: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each name's slice of `uploaded` (`_upload` of `parts`)."""
        return {name: uploaded[start:start + n] for name, (start, n) in self.slices.items()}


class SamplingPlan:
    """What sampling needs of a batch that stays while the batch does: the
    rows' grouping (greedy rows first, then sampled ones), their settings as
    device tensors (temperatures, filters, penalty factors: uploaded once,
    here) and the order back to row order. `launch` then takes only what
    changes per token (each sampled row's (seed, counter), each penalized
    row's recent ids) in one upload. The engine keeps one plan while the
    same generations are in the batch in the same order; `PendingIds` makes
    a plan per call. The tokens are the same either way (`sample_rows`).

    params: every row's settings; vocab: the logits' width; device: theirs."""

    def __init__(self, params: Sequence[SamplingParams], vocab: int, device: torch.device):
        self.size, self.vocab, self.device = len(params), vocab, device
        greedy = [i for i, p in enumerate(params) if p.temperature == 0]
        sampled = [i for i, p in enumerate(params) if p.temperature != 0]
        self.sampled_rows = sampled  # the rows whose (seed, counter) `launch` takes, in this order
        static = _Layout(torch.float32), _Layout(torch.int64)
        self._groups = [_Group(members, params, self.size, vocab, static, sampled=bool(k))
                        for k, members in enumerate((greedy, sampled)) if members]
        self.penalized_rows = [g.members[j] for g in self._groups for j in g.penalized]  # `launch`'s recents
        self.logprobs = any(p.logprobs is not None for p in params)
        order = greedy + sampled
        if any(i != j for i, j in enumerate(order)):  # grouped: back to row order
            static[1].add("order", order)
        self._static = {}  # name -> its slice of the uploaded settings, made once
        for layout in static:
            self._static.update(layout.views(_upload(layout.parts, layout.dtype, device)))

    def launch(self, logits: torch.Tensor, rngs: Sequence[tuple[int, int] | None],
               recents: Sequence[torch.Tensor | None], graphs: Callable | None = None) -> torch.Tensor:
        """Launch the sampling of every row: token ids, int64 [B] on the
        device, in row order. logits: float32 [B, V] (a strided view is
        fine); rngs: (seed, counter) of each of `sampled_rows`; recents: the
        recent ids of each of `penalized_rows` (int64 CPU tensors or None)."""
        if tuple(logits.shape) != (self.size, self.vocab):
            raise ValueError(f"sample_rows: logits of shape {tuple(logits.shape)} for a plan of {self.size} rows "
                             f"of {self.vocab}")
        per_tick = _Layout(torch.int64)
        if self.sampled_rows:
            per_tick.add("rng_words", _stream_words_of(rngs, self.sampled_rows))
        if self.penalized_rows:
            per_tick.add("pen_ids", _penalty_ids(recents, self.vocab))
        values = per_tick.views(_upload(per_tick.parts, torch.int64, self.device))
        values.update(self._static)
        pen_ids = values["pen_ids"].view(len(self.penalized_rows), -1) if self.penalized_rows else None
        outputs, pen_start = [], 0
        for group in self._groups:
            outputs.append(group.run(logits, values, pen_ids, pen_start, graphs))
            pen_start += len(group.penalized)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if "order" in values:
            out = torch.empty_like(out).index_copy_(0, values["order"], out)
        return out


def _stream_words_of(rngs: Sequence[tuple[int, int] | None], index: Sequence[int]) -> torch.Tensor:
    """`philox.stream_words` of every (seed, counter), int64 [R, 4]: in one
    numpy pass when every stream is a pair of Python ints in range (the
    engine's case: this runs per tick), else row by row (which names a
    missing stream or a value out of range). index: the rows' numbers, for errors."""
    if all(type(p) is tuple and len(p) == 2 and type(p[0]) is int and type(p[1]) is int for p in rngs):
        try:
            pairs = np.array(rngs, dtype=np.uint64).reshape(len(rngs), 2)
        except OverflowError:  # below 0 or beyond 64 bits: named below
            pairs = None
        if pairs is not None:
            words = np.empty((len(rngs), 4), dtype=np.int64)
            words[:, 0::2] = pairs & np.uint64(0xFFFFFFFF)
            words[:, 1::2] = pairs >> np.uint64(32)
            return torch.from_numpy(words)
    out = []
    for i, rng in zip(index, rngs):
        if rng is None:
            raise ValueError(f"sample_rows: row {i} samples but has no random stream (SampleRow.rng is None)")
        out.append(stream_words(*rng))  # raises, naming the values
    return torch.tensor(out, dtype=torch.int64).reshape(len(rngs), 4)


def _subset(x: torch.Tensor, local: list[int], index: torch.Tensor | None, fn) -> torch.Tensor:
    """Apply `fn` ([n, V] -> [n, V]) to rows `local` of x ([R, V]). All rows:
    returns fn(x). Else x must be a private tensor: it is updated in place
    (`index`: `local` on the device) and returned."""
    if len(local) == x.shape[0]:
        return fn(x)
    x.index_copy_(0, index, fn(x.index_select(0, index)))
    return x


class _Group:
    """The greedy rows, or the sampled rows, of a plan: their settings, put in
    the plan's static layouts (float32, int64) under names of this group."""

    def __init__(self, members: list[int], params: Sequence[SamplingParams], batch: int, vocab: int,
                 static: tuple[_Layout, _Layout], sampled: bool):
        self.members = members
        self.sampled = sampled
        self.all_rows = len(members) == batch
        floats, ints = static
        self._tag = tag = "s_" if sampled else "g_"
        if not self.all_rows:
            ints.add(tag + "members", members)
        params = [params[i] for i in members]
        # Penalties: local row indices and factors (the recent ids come per tick).
        self.penalized = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0]
        if self.penalized:
            ints.add(tag + "pen_rows", self.penalized)
            floats.add(tag + "pen_factors", [[params[j].repetition_penalty, params[j].presence_penalty]
                                             for j in self.penalized])
        if not sampled:
            return
        temps = [p.temperature for p in params]
        # Dividing by 1 is exact: a batch of temperature-1 rows skips the division.
        self.scale = any(t != 1.0 for t in temps)
        if self.scale:
            floats.add(tag + "temps", temps)
        # Filters: per member, off values where a row has none (top_k 0, top_p 1, log(min_p) -inf).
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        self.has_top_k = any(top_k)
        self.has_top_p = any(p.top_p < 1.0 for p in params)
        self.filtered = self.has_top_k or self.has_top_p or any(p.min_p > 0.0 for p in params)
        self.small_k = small_k_slots(top_k)  # 0: the radix pipeline
        if self.filtered:
            ints.add(tag + "top_k", top_k)
            floats.add(tag + "top_p", [p.top_p for p in params])
            floats.add(tag + "log_min_p", [math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in params])

    def run(self, logits: torch.Tensor, values: dict[str, torch.Tensor], pen_ids: torch.Tensor | None,
            pen_start: int, graphs: Callable | None = None) -> torch.Tensor:
        """This group's ids. values: the plan's named device slices; pen_ids:
        every penalized row's recent ids [P, W]; this group's start at pen_start."""
        n, tag = len(self.members), self._tag
        x = logits if self.all_rows else logits.index_select(0, values[tag + "members"])
        private = not self.all_rows  # x may be updated in place
        if self.penalized:
            if not private and len(self.penalized) < n:
                x, private = x.clone(), True
            ids = pen_ids[pen_start:pen_start + len(self.penalized)]
            factors = values[tag + "pen_factors"].view(-1, 2)
            kernel = _cuda_kernel(x.device.type, "penalties", "penalize")
            penalize = (lambda r: kernel(r, ids, factors)) if kernel is not None else \
                (lambda r: _penalize(r, ids, factors[:, 0:1], factors[:, 1:2]))
            x = _subset(x, self.penalized, values[tag + "pen_rows"], penalize)
            private = True
        if not self.sampled:
            return x.argmax(dim=-1)
        words = values["rng_words"].view(n, 4)
        temps = values[tag + "temps"] if self.scale else None
        if self.filtered:
            # x / T is computed where x is read (x may still be the caller's strided logits view).
            return sample_filtered(x, words, temps, values[tag + "top_k"], values[tag + "top_p"],
                                   values[tag + "log_min_p"], has_top_k=self.has_top_k, has_top_p=self.has_top_p,
                                   graphs=graphs, staged=private, small_k=self.small_k)
        return gumbel_argmax(x, words, temps)


def gumbel_argmax(x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over v of x[s, v] / temps[s] - log(-log(u[s, v])) per row s, the
    smallest v on ties (the definition: `streamgemma.sampling.philox`), int64 [S] on
    x's device. x: float32 [S, V] (strided views are fine); words: int64
    [S, 4] (`philox.stream_words` of each row's (seed, counter)); temps:
    float32 [S] or None. The Triton kernel on CUDA, the PyTorch reference
    elsewhere (or where Triton is missing)."""
    kernel = _cuda_kernel(x.device.type, "gumbel_argmax", "gumbel_argmax")
    if kernel is not None:
        return kernel(x, words, temps)
    return gumbel_argmax_reference(x, words, temps)


@functools.cache
def _cuda_kernel(device_type: str, module: str, name: str):
    """A Triton kernel of `streamgemma.kernels` on CUDA, else None (the PyTorch
    form runs instead: on the CPU, or on a GPU without Triton; same values,
    more launches)."""
    if device_type != "cuda":
        return None
    try:
        return getattr(importlib.import_module(f"streamgemma.kernels.{module}"), name)
    except ImportError:
        return None
