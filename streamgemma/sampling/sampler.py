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
    forms run on the CPU. Per row the host only packs a few numbers into the
    one upload of per-row values. The host never waits for the device except
    for the final read of the B ids.
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

    def __init__(self, logits: torch.Tensor, rows: Sequence[SampleRow], graphs: Callable | None = None):
        self._host: torch.Tensor | None = None
        self._event = None
        self.device_ids = torch.empty(0, dtype=torch.int64, device=logits.device)
        if not rows:
            return
        values, order = _sample_on_device(logits, rows, graphs)
        if any(i != j for i, j in enumerate(order)):  # grouped (greedy rows first): back to row order
            index = torch.tensor(order, dtype=torch.int64)
            if values.device.type == "cuda":
                index = index.pin_memory()
            values = torch.empty_like(values).index_copy_(0, index.to(values.device, non_blocking=True), values)
        self.device_ids = values
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def ids(self) -> list[int]:
        self.wait()
        return self._host.tolist() if self._host is not None else []


def sample(logits: torch.Tensor, params: SamplingParams, rng: RandomStream | None) -> torch.Tensor:
    """The next token id, a 0-dim int64 tensor on the logits' device: one row
    of `sample_rows` (same noise, same token), without reading it back.

    logits: float32 [V] (penalties are applied by `sample_rows` from the row's
    recent ids; here there are none). `rng` is only used, and then advanced
    by one, when sampling (temperature > 0); it may be None for greedy params.
    """
    row = SampleRow(params, None if params.greedy or rng is None else rng.take())
    values, _ = _sample_on_device(logits[None], [row])
    return values[0]


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


class _Upload:
    """Host values gathered before any device work, then sent in one copy per
    dtype (a pinned, non-blocking copy on CUDA: the host does not wait)."""

    def __init__(self):
        self._parts: dict[torch.dtype, list[torch.Tensor]] = {torch.int64: [], torch.float32: []}
        self._sizes: dict[torch.dtype, int] = {torch.int64: 0, torch.float32: 0}

    def add(self, values, dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        t = t.reshape(-1).to(dtype)
        start = self._sizes[dtype]
        self._parts[dtype].append(t)
        self._sizes[dtype] += t.numel()
        return dtype, start, t.numel()

    def send(self, device: torch.device) -> dict[torch.dtype, torch.Tensor]:
        out = {}
        for dtype, parts in self._parts.items():
            if parts:
                host = torch.cat(parts) if len(parts) > 1 else parts[0]
                if device.type == "cuda":
                    out[dtype] = host.pin_memory().to(device, non_blocking=True)
                else:
                    out[dtype] = host.to(device)
        return out


def _subset(x: torch.Tensor, local: list[int], index: torch.Tensor | None, fn) -> torch.Tensor:
    """Apply `fn` ([n, V] -> [n, V]) to rows `local` of x ([R, V]). All rows:
    returns fn(x). Else x must be a private tensor: it is updated in place
    (`index`: `local` on the device) and returned."""
    if len(local) == x.shape[0]:
        return fn(x)
    x.index_copy_(0, index, fn(x.index_select(0, index)))
    return x


def _sample_on_device(logits: torch.Tensor, rows: Sequence[SampleRow],
                      graphs: Callable | None = None) -> tuple[torch.Tensor, list[int]]:
    """Token ids [B] on the device, in the order `order` of rows (greedy rows
    first, then sampled ones)."""
    batch, vocab = logits.shape
    if len(rows) != batch:
        raise ValueError(f"sample_rows: {batch} rows of logits but {len(rows)} SampleRows")
    dev = logits.device

    # Host pass: group the rows and gather every per-row value before any device work.
    greedy: list[int] = []
    sampled: list[int] = []
    for i, row in enumerate(rows):
        (greedy if row.params.temperature == 0 else sampled).append(i)
    upload = _Upload()
    plans = [_GroupPlan(greedy, rows, batch, vocab, upload, sampled=False),
             _GroupPlan(sampled, rows, batch, vocab, upload, sampled=True)]
    device_values = upload.send(dev) if any(p.needs_upload for p in plans) else {}

    outputs = []
    for plan in plans:
        if plan.members:
            outputs.append(plan.run(logits, device_values, graphs))
    values = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return values, greedy + sampled


def _stream_words_of(rows: Sequence[SampleRow], index: Sequence[int]) -> torch.Tensor:
    """`philox.stream_words` of every row's (seed, counter), int64 [R, 4]: in
    one numpy pass when every stream is a pair of Python ints in range (the
    engine's case: this runs per row and per tick), else row by row (which
    names a missing stream or a value out of range). index: the rows'
    numbers, for errors."""
    rngs = [r.rng for r in rows]
    if all(type(p) is tuple and len(p) == 2 and type(p[0]) is int and type(p[1]) is int for p in rngs):
        try:
            pairs = np.array(rngs, dtype=np.uint64).reshape(len(rows), 2)
        except OverflowError:  # below 0 or beyond 64 bits: named below
            pairs = None
        if pairs is not None:
            words = np.empty((len(rows), 4), dtype=np.int64)
            words[:, 0::2] = pairs & np.uint64(0xFFFFFFFF)
            words[:, 1::2] = pairs >> np.uint64(32)
            return torch.from_numpy(words)
    out = []
    for i, r in zip(index, rows):
        if r.rng is None:
            raise ValueError(f"sample_rows: row {i} samples (temperature {r.params.temperature}) "
                             "but has no random stream (SampleRow.rng is None)")
        out.append(stream_words(*r.rng))  # raises, naming the values
    return torch.tensor(out, dtype=torch.int64).reshape(len(rows), 4)


class _GroupPlan:
    """The work for the greedy rows, or for the sampled rows, of one call."""

    def __init__(self, members: list[int], rows: Sequence[SampleRow], batch: int, vocab: int, upload: _Upload,
                 sampled: bool):
        self.members = members
        self.sampled = sampled
        self.all_rows = len(members) == batch
        self._slices: dict[str, tuple] = {}
        self.needs_upload = False
        if not members:
            return

        def put(name: str, values, dtype: torch.dtype) -> None:
            self._slices[name] = upload.add(values, dtype)
            self.needs_upload = True

        if not self.all_rows:
            put("members", members, torch.int64)
        params = [rows[i].params for i in members]
        # Penalties: local row indices, factors, recent ids padded to one width.
        self.penalized = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0]
        if self.penalized:
            ids = _penalty_ids([rows[members[j]].recent for j in self.penalized], vocab)
            put("pen_rows", self.penalized, torch.int64)
            put("pen_ids", ids, torch.int64)
            put("pen_factors", [[params[j].repetition_penalty, params[j].presence_penalty] for j in self.penalized],
                torch.float32)
            self._pen_width = ids.shape[1]
        if not sampled:
            return
        put("rng_words", _stream_words_of([rows[i] for i in members], members), torch.int64)
        temps = [p.temperature for p in params]
        # Dividing by 1 is exact: a batch of temperature-1 rows skips the division.
        self.scale = any(t != 1.0 for t in temps)
        if self.scale:
            put("temps", temps, torch.float32)
        # Filters: per member, off values where a row has none (top_k 0, top_p 1, log(min_p) -inf).
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        self.has_top_k = any(top_k)
        self.has_top_p = any(p.top_p < 1.0 for p in params)
        self.filtered = self.has_top_k or self.has_top_p or any(p.min_p > 0.0 for p in params)
        self.small_k = small_k_slots(top_k)  # 0: the radix pipeline
        if self.filtered:
            put("top_k", top_k, torch.int64)
            put("top_p", [p.top_p for p in params], torch.float32)
            put("log_min_p", [math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in params], torch.float32)

    def _get(self, values: dict[torch.dtype, torch.Tensor], name: str) -> torch.Tensor:
        dtype, start, n = self._slices[name]
        return values[dtype][start:start + n]

    def run(self, logits: torch.Tensor, values: dict[torch.dtype, torch.Tensor],
            graphs: Callable | None = None) -> torch.Tensor:
        n = len(self.members)
        get = functools.partial(self._get, values)
        x = logits if self.all_rows else logits.index_select(0, get("members"))
        private = not self.all_rows  # x may be updated in place
        if self.penalized:
            if not private and len(self.penalized) < n:
                x, private = x.clone(), True
            ids = get("pen_ids").view(len(self.penalized), self._pen_width)
            factors = get("pen_factors").view(-1, 2)
            kernel = _cuda_kernel(x.device.type, "penalties", "penalize")
            penalize = (lambda r: kernel(r, ids, factors)) if kernel is not None else \
                (lambda r: _penalize(r, ids, factors[:, 0:1], factors[:, 1:2]))
            x = _subset(x, self.penalized, get("pen_rows"), penalize)
            private = True
        if not self.sampled:
            return x.argmax(dim=-1)
        words = get("rng_words").view(n, 4)
        temps = get("temps") if self.scale else None
        if self.filtered:
            # x / T is computed where x is read (x may still be the caller's strided logits view).
            return sample_filtered(x, words, temps, get("top_k"), get("top_p"), get("log_min_p"),
                                   has_top_k=self.has_top_k, has_top_p=self.has_top_p, graphs=graphs,
                                   staged=private, small_k=self.small_k)
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
