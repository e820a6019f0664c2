"""`Model`: a loaded Griffin network with its tokenizer and its state pool;
`load`: open a checkpoint by path."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import GriffinConfig
from ..errors import CheckpointError, InvalidValueError
from ..fast.decode import GraphedDecoder, KernelDecoder, check_kernels_usable, kernels_available
from ..fast.fused_weights import FusedWeights
from ..fast.prefill import KernelPrefill
from ..fast.tuning import KernelConfig
from ..model import checkpoint as weights
from ..model import hub
from ..model.fingerprint import fingerprint as weights_fingerprint
from ..model.griffin import Griffin
from ..model.placement import resolve_device_dtype
from ..model.pool import StatePool, available_memory
from ..model.quantize import check_format, quantize_network
from ..model.save import save_hf
from ..sampling.filters import device_kernel
from ..sampling.graphs import FilterGraphs
from ..tokenizer import Tokenizer
from ..validate import check_int, check_seed, short
from . import snapshot as snapshot_format
from .session import Session, check_token_ids

DEFAULT_PREFILL_CHUNK = 256  # tokens per parallel chunk: bounds activation memory for any input length


class Model:
    """A Griffin model ready to serve sessions.

    Attributes: `config` (GriffinConfig), `tokenizer` (Tokenizer or None),
    `network` (the PyTorch module), `pool` (StatePool of all sessions' state),
    `kernel_config` (KernelConfig: launch choices of the Triton decode and
    prefill kernels; a replacement takes effect at the next decode, whose
    graphs are captured anew, and the next prefill).

    The pool holds at most `max_sessions` sessions and `max_state_bytes` of
    state (default: half the memory free on the model's device when it is
    built); past them `session()` raises CapacityError. `fingerprint`: the
    weights' digest, when the network's values no longer give it (`load` and
    `random` pass the digest of the weights before a cast to float16).
    """

    def __init__(self, network: Griffin, tokenizer: Tokenizer | None = None, source: str | None = None,
                 prefill_chunk: int | None = None, kernels: bool | None = None,
                 kernel_config: KernelConfig | None = None, max_sessions: int | None = None,
                 max_state_bytes: int | None = None, fingerprint: str | None = None):
        self.network = network.eval()
        self.config: GriffinConfig = network.config
        self.tokenizer = tokenizer
        self.source = source
        # Tokens per parallel chunk. Larger chunks amortise per-chunk launches on a GPU;
        # memory stays bounded by the chunk whatever the input length.
        if prefill_chunk is not None:
            check_int("prefill_chunk", prefill_chunk, 1)
        self.prefill_chunk = prefill_chunk or (2048 if network.device.type == "cuda" else DEFAULT_PREFILL_CHUNK)
        bounded = max_state_bytes is not None
        check_pool_bounds(max_sessions, max_state_bytes)
        if max_state_bytes is None:
            free = available_memory(network.device)
            # The other half is for activations, each session's host state and the program around them.
            max_state_bytes = None if free is None else free // 2
        self.pool = StatePool(self.config, network.dtype, network.device, max_capacity=max_sessions,
                              max_bytes=max_state_bytes)
        if bounded and self.pool.max_slots() == 0:
            raise InvalidValueError("max_state_bytes", f"max_state_bytes {max_state_bytes} holds no session: one "
                                                       f"takes {self.pool.slot_bytes()} bytes")
        # Sessions of one model share the pool; `Session` holds this while it
        # touches the pool, so sessions may be driven from several threads
        # (agenerate steps run in worker threads).
        self.lock = threading.RLock()
        # Given where the network's values may no longer give it (a float16 cast of a checkpoint, or a
        # load of such a cast's save); then also the digest of the values as loaded, which a save records
        # it beside while they are unchanged.
        self._fingerprint: str | None = fingerprint
        cast = fingerprint is not None and network.quantization is None
        self._cast_fingerprint = weights_fingerprint(network) if cast else None
        # None: the Triton decode step (in CUDA graphs) on CUDA, the PyTorch reference elsewhere.
        self.kernels = kernels_available(self.device) if kernels is None else kernels
        if kernels is None and self.device.type == "cuda" and not self.kernels:
            warnings.warn("Triton is not installed: this CUDA model decodes on the slow PyTorch reference path; "
                          "install it with pip install 'streamgemma[cuda]'", stacklevel=2)
        if self.kernels:
            check_kernels_usable(self.device)
        self.kernel_config = kernel_config or KernelConfig()
        self._fused: FusedWeights | None = None
        self._kernel_decoder: KernelDecoder | None = None
        self._kernel_prefill: KernelPrefill | None = None
        self._graphed: GraphedDecoder | None = None
        self._sampling_graphs: FilterGraphs | None = None

    def __repr__(self) -> str:
        preset = self.config.matching_preset() or "custom"
        weights = f"{self.quantization} weights, " if self.quantization else ""
        return (f"Model({preset}, {self.num_parameters() / 1e6:.1f}M parameters, {weights}{self.dtype}, "
                f"{self.device}, tokenizer={'yes' if self.tokenizer else 'no'})")

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' and the state's dtype (also the weights', unless quantized)."""
        return self.network.dtype

    @property
    def quantization(self) -> str | None:
        """"int8", "fp8" or "int4" for quantized weights (see docs/quantization.md), else None."""
        q = self.network.quantization
        return None if q is None else q.format

    @property
    def fingerprint(self) -> str:
        """Digest of the config and weights (see `model.fingerprint.fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.network)
        return self._fingerprint

    def num_parameters(self) -> int:
        """Weights of the network (a quantized weight's scales not counted; an
        int4 byte holds two)."""
        return sum(p.numel() * (2 if p.dtype == torch.uint8 else 1)
                   for name, p in self.network.named_parameters() if not name.endswith("_scale"))

    def weight_bytes(self) -> int:
        """Bytes the network's parameters take on its device (a quantized
        model's scales and unquantized tensors included)."""
        return sum(p.numel() * p.element_size() for p in self.network.parameters())

    @classmethod
    def random(cls, config: GriffinConfig, seed: int = 0, device=None, dtype=None,
               tokenizer: Tokenizer | None = None, quantize: str | None = None, **options) -> Model:
        """A model with random weights (tests, benchmarks). Weights are drawn on
        the CPU in float32 from `seed`, so they do not depend on device or dtype.
        quantize: "int8", "fp8" or "int4" quantizes them after the cast to `dtype`, as
        `load` does; the model keeps the unquantized weights' fingerprint."""
        if not isinstance(config, GriffinConfig):
            raise TypeError(f"config must be a GriffinConfig (e.g. GriffinConfig.preset('tiny')), got {short(config)}")
        check_int("seed", seed, -(1 << 63), (1 << 64) - 1)
        check_format(quantize)
        device, dtype = resolve_device_dtype(device, dtype)
        network = Griffin(config, dtype=torch.float32, device="cpu")
        network.init_random_(torch.Generator().manual_seed(seed))
        digest = weights_fingerprint(network)  # of the weights as drawn (a float16 cast rounds differently)
        if quantize is None:
            network = network.to(device=device, dtype=dtype)
        else:  # cast on the host, quantized one matrix at a time on the device (as `load` does)
            network = network.to(dtype=dtype)
            quantize_network(network, quantize, digest, device=device)
            network = network.to(device)
        return cls(network, tokenizer=tokenizer, source=f"random(seed={seed})", fingerprint=digest, **options)

    def session(self, seed: int | None = None) -> Session:
        """A new session at position 0 with its own slot in the state pool.
        CapacityError when the pool's budget holds no further session;
        InvalidValueError for a seed a snapshot could not hold."""
        seed = check_seed(seed)
        with self.lock:
            slot = self.pool.allocate()
        return Session(self, slot, seed=seed)

    def restore(self, snapshot: bytes | bytearray | memoryview | snapshot_format.SnapshotContents,
                threads: int | None = None) -> Session:
        """A new session that continues exactly where the snapshotted one was
        (bit-identical on the same device and dtype). `snapshot` is a blob
        from `Session.snapshot` or what `Session.capture` returned. The
        snapshot may come from another device or dtype: state is cast to this
        model's dtype (from float32 to bfloat16 this rounds it, so the
        continuation is close, not identical); the RG-LRU state stays float32.
        `session.snapshot_metadata` holds the snapshot's metadata. `threads`:
        how many decompress a blob's frames (None: one per core, at most 16).

        A blob is fully validated before a slot is taken; failures raise a
        SnapshotError subclass: SnapshotFormatError, SnapshotCorrupted,
        SnapshotVersionError, SnapshotModelMismatch."""
        contents = snapshot
        if isinstance(contents, snapshot_format.SnapshotContents):
            snapshot_format.check_contents_model(contents, self.config, self.fingerprint)
        else:
            contents = snapshot_format.decode(snapshot, self.config, self.fingerprint, threads)
        session = self.session(seed=contents.seed)
        try:
            with self.lock:
                snapshot_format.load_into(self.pool, session.slot, contents)
            session.restore_host(contents.extra)
        except BaseException:
            session.close()
            raise
        session.snapshot_metadata = dict(contents.metadata)  # (contents may restore other sessions too)
        return session

    def restore_file(self, path: str | os.PathLike, threads: int | None = None) -> Session:
        """`restore` the snapshot file at `path` (as written by `Session.save`
        or a DirectorySnapshotStore). OSError if it cannot be read."""
        return self.restore(snapshot_format.read_file(path, self.config), threads)

    def save(self, directory: str | os.PathLike, max_shard_bytes: int = 4 * 1024**3, *,
             quantized: bool | None = None, progress: bool | None = None) -> None:
        """Write the model in the Hugging Face layout (config.json, safetensors,
        tokenizer.model) so `streamgemma.load` and transformers can read it.
        A quantized model is written quantized (int8 / fp8 tensors and their
        scales, the format in config.json: docs/quantization.md), which
        `streamgemma.load` reads back without quantizing again; transformers
        cannot read that. quantized: True or False asserts which of the two
        is written (ValueError when the model is the other kind). progress:
        show a progress line (default: when stderr is a terminal)."""
        check_int("max_shard_bytes", max_shard_bytes, 1)  # (0 or -1 wrote a file per tensor)
        if quantized is not None and bool(quantized) != (self.quantization is not None):
            have = f"{self.quantization} weights" if self.quantization else "unquantized weights"
            raise ValueError(f"save(quantized={quantized}): this model has {have}; quantize at load time "
                             "(load(..., quantize='int8', 'fp8' or 'int4')) to save a quantized copy, or load the "
                             "original checkpoint for an unquantized one")
        # (None: a tokenizer an earlier save left there would be loaded as this model's)
        tokenizer = self.tokenizer.save if self.tokenizer is not None else None
        save_hf(self.network, Path(directory), max_shard_bytes=max_shard_bytes,
                extra_files={"tokenizer.model": tokenizer}, fingerprint=self._saved_fingerprint(), progress=progress)

    def _saved_fingerprint(self) -> str | None:
        """The fingerprint a save records beside the weights' own: one given at load, while the weights are
        those loaded (changed since, they are other weights: nothing is recorded)."""
        if self._cast_fingerprint is None or weights_fingerprint(self.network) != self._cast_fingerprint:
            return None
        return self.fingerprint

    def warm_up(self, max_batch: int = 1, prompt_tokens: int = 16) -> float:
        """Do the fast paths' one-time work now instead of in the first
        requests: on CUDA, compile the kernels (prefill of `prompt_tokens`,
        decode, sampling) and capture the decode graph of every batch bucket
        up to `max_batch` (the state pool grows to `max_batch` slots, as it
        would as sessions arrive). A server calls this before it listens:
        otherwise the first generation waits ~1 s for compilation, and every
        stream stalls while a new batch size's graph is captured. Returns the
        seconds spent; on the CPU there is nothing to prepare (returns 0)."""
        check_int("max_batch", max_batch, 1)
        check_int("prompt_tokens", prompt_tokens, 1)
        if self.device.type != "cuda":
            return 0.0
        from ..sampling.params import SamplingParams
        from ..sampling.sampler import SampleRow, sample_rows

        start = time.perf_counter()
        sessions = [self.session() for _ in range(max_batch)]
        try:
            sessions[0].feed([1 + k % 100 for k in range(prompt_tokens)], add_bos=False)
            sampled = [SampleRow(SamplingParams(), (k, 0)) for k in range(max_batch)]
            greedy = SampleRow(SamplingParams(temperature=0))
            batch = 1
            while True:
                logits = self.decode([s.slot for s in sessions[:batch]], [1] * batch)
                sample_rows(logits[:batch], sampled[:batch])
                sample_rows(logits[:1], [greedy])
                if batch == max_batch:
                    break
                batch = min(2 * batch, max_batch)
            torch.cuda.synchronize(self.device)
        finally:
            for s in sessions:
                s.close()
        return time.perf_counter() - start

    # -- batched paths (used by Session and, later, the engine) --------------------------
    def _check_ids(self, ids: list) -> None:
        """ValueError (TypeError) naming an id outside the vocabulary (not an int): on the
        device, an embedding lookup out of bounds reads other memory or faults."""
        try:
            if not ids or (0 <= min(ids) and max(ids) < self.config.vocab_size):
                return  # (the common case, at a few microseconds for a batch of 256)
        except TypeError:
            pass
        check_token_ids(ids, self.config.vocab_size)

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One token for each slot: returns float32 logits [B, vocab] and
        advances each slot by one position. Slots must be distinct.

        tokens: B ids on the host, or an int64 tensor [B] on the model's
        device. A device tensor is read by the device itself, in stream
        order: a caller that samples on the device can launch this step
        before the sampled ids reach the host (nothing waits for them).

        The returned tensor is new on every path: the caller may keep it (the
        graphed CUDA path soft-caps into it after the graph, so keeping the
        logits costs no copy of a graph's buffer)."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"decode: duplicate slots in {list(slots)}")
        if isinstance(tokens, torch.Tensor):
            if tokens.dtype != torch.long or tuple(tokens.shape) != (len(slots),) \
                    or tokens.device.type != self.device.type:
                raise ValueError(f"decode: tokens must be int64 [{len(slots)}] on {self.device}, got "
                                 f"{tokens.dtype} {list(tokens.shape)} on {tokens.device}")
        else:
            tokens = list(tokens)
            if len(tokens) != len(slots):
                raise ValueError(f"decode: {len(slots)} slots but {len(tokens)} tokens")
            self._check_ids(tokens)
        positions = [self.pool.positions[s] for s in slots]
        if self.kernels:
            logits = self._decode_with_kernels(list(slots), tokens, positions)
        else:
            dev = self.device
            slots_t = torch.tensor(list(slots), dtype=torch.long, device=dev)
            states = self.pool.gather(slots_t)
            logits, states = self.network.forward_decode(_long_tensor(tokens, dev),
                                                         torch.tensor(positions, dtype=torch.long, device=dev),
                                                         states)
            self.pool.scatter(slots_t, states)
        for s in slots:
            self.pool.positions[s] += 1
        return logits

    @property
    def sampling_graphs(self) -> FilterGraphs | None:
        """CUDA graphs of the top-k/top-p/min-p kernels, which samplers of this
        model's logits pass to `PendingIds` (None off CUDA or without kernels)."""
        if self._sampling_graphs is None and self.kernels and self.device.type == "cuda":
            kernel = device_kernel("cuda")
            self._sampling_graphs = FilterGraphs(kernel) if kernel is not None else None
        return self._sampling_graphs

    def _fused_weights(self) -> FusedWeights:
        if self._fused is None:
            self._fused = FusedWeights(self.network)
        return self._fused

    def _decode_with_kernels(self, slots: list[int], tokens: list[int] | torch.Tensor,
                             positions: list[int]) -> torch.Tensor:
        if self._kernel_decoder is None or self._kernel_decoder.kernel_config is not self.kernel_config:
            self._kernel_decoder = KernelDecoder(self.network, self.pool, self._fused_weights(), self.kernel_config)
            if self.device.type == "cuda":
                self._graphed = GraphedDecoder(self._kernel_decoder)
        if self._graphed is not None:
            return self._graphed.step(tokens, slots, positions)
        dev = self.device
        return self._kernel_decoder.step(_long_tensor(tokens, dev), _long_tensor(slots, dev),
                                         _long_tensor(positions, dev))

    @torch.no_grad()
    def prefill(self, slot: int, tokens: Sequence[int], all_logits: bool = False,
                chunk_size: int | None = None) -> torch.Tensor:
        """Consume `tokens` for one slot with the parallel path, in chunks of
        `chunk_size` (default `prefill_chunk`) so memory is bounded for any length.
        Returns float32 logits [vocab] after the last token, or [T, vocab] for
        every token if `all_logits`. The slot's state advances chunk by chunk, so
        an error mid-way leaves it consistent at the last finished chunk."""
        chunk = chunk_size or self.prefill_chunk
        dev = self.device
        outputs = []
        for start in range(0, len(tokens), chunk):
            part = list(tokens[start:start + chunk])
            self._check_ids(part)
            p0 = self.pool.positions[slot]
            last = start + chunk >= len(tokens)
            mode = "all" if all_logits else ("last" if last else "none")
            part_t = torch.tensor(part, dtype=torch.long, device=dev)
            if self.kernels:
                if self._kernel_prefill is None or self._kernel_prefill.kernel_config is not self.kernel_config:
                    self._kernel_prefill = KernelPrefill(self.network, self.pool, self._fused_weights(),
                                                         self.kernel_config)
                logits = self._kernel_prefill.chunk(slot, part_t, p0, logits=mode)
            else:
                slot_t = torch.tensor([slot], dtype=torch.long, device=dev)
                pos = torch.arange(p0, p0 + len(part), dtype=torch.long, device=dev)[None]
                states = self.pool.gather(slot_t)
                logits, states = self.network.forward_chunk(part_t[None], pos, states, logits=mode)
                self.pool.scatter(slot_t, states)
                logits = None if logits is None else logits[0]
            self.pool.positions[slot] = p0 + len(part)
            if logits is not None:
                outputs.append(logits if all_logits else logits.reshape(-1))
        return torch.cat(outputs, dim=0) if all_logits else outputs[-1]


DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.model")


def demo_path() -> Path:
    """The directory of the small demo model that ships inside the package
    (`sg.load("demo")`); CheckpointError if the installation lacks its files."""
    directory = Path(__file__).resolve().parents[1] / "demo"
    missing = [name for name in DEMO_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"the bundled demo model is incomplete: {', '.join(missing)} missing from "
                              f"{directory}; reinstall streamgemma, or pass the path of a checkpoint")
    return directory


def load(path: str | os.PathLike, device=None, dtype=None, *, quantize: str | None = None,
         config: GriffinConfig | None = None, progress: bool | None = None, kernels: bool | None = None,
         kernel_config: KernelConfig | None = None, threads: int | None = None,
         max_sessions: int | None = None, max_state_bytes: int | None = None) -> Model:
    """Open a checkpoint.

    path: a Hugging Face directory (config.json + model.safetensors or sharded
    safetensors with model.safetensors.index.json), an official state dict
    (`.pt`, or a directory holding one), a directory written by `Model.save`,
    "demo": the small model that ships with the package (unless a directory
    named "demo" exists in the working directory), or a Hugging Face Hub id
    ("google/recurrentgemma-2b-it", when no such local path exists), fetched
    through huggingface_hub into its cache (see docs/loading.md).
    A `tokenizer.model` beside the weights is loaded as `model.tokenizer`.
    device: default CUDA if available, else CPU. dtype: "float32",
    "bfloat16", "float16" or a torch dtype; default bfloat16 on CUDA, float32
    on CPU; with quantized weights, the activations' and state's dtype.
    quantize: None, "int8", "fp8" or "int4": weight-only quantization of
    every large matrix at load time, one float32 scale per output channel
    (int4: per 128 weights of a row; see docs/quantization.md); a directory
    saved quantized loads as saved.
    config: hyper-parameters that an official state dict's shapes do
    not carry (window, soft cap, embedding scaling); checked against the
    weights. progress: show a progress line (default: when stderr is a terminal).
    kernels: use the Triton kernels for decode and prefill (default: on CUDA).
    kernel_config: their launch choices (default: `KernelConfig()`).
    threads: torch's CPU threads, set for the whole process (torch has one
    pool); default for a CPU model: `default_threads`, unless
    OMP_NUM_THREADS is set. max_sessions, max_state_bytes: bounds of the
    state pool (see `Model`).

    Raises CheckpointError (files, keys, shapes), DeviceError (device/dtype).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or a path, got {short(path)}")
    if not str(path).strip():  # (e.g. --model "$MODEL" with MODEL unset: it loaded the current directory)
        raise ValueError("the model path is empty: name a checkpoint directory, file, Hub id or 'demo'")
    # arguments are checked before a Hub download
    check_format(quantize)
    if config is not None and not isinstance(config, GriffinConfig):
        raise TypeError(f"config must be a GriffinConfig or None, got {short(config)}")
    check_pool_bounds(max_sessions, max_state_bytes)
    device, dtype = resolve_device_dtype(device, dtype)
    if str(path) == "demo" and not Path("demo").is_dir():
        path = demo_path()
    source = str(path)
    if hub.is_model_id(path):
        path = hub.download(source)
    ckpt = weights.discover(path)
    network, digest = weights.load_network(ckpt, device, dtype, config=config, progress=progress, quantize=quantize)
    tokenizer = None
    if ckpt.tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(ckpt.tokenizer_file)
        if tokenizer.vocab_size > network.config.vocab_size:
            raise CheckpointError(f"{ckpt.tokenizer_file}: has {tokenizer.vocab_size} pieces but the model's "
                                  f"vocabulary has {network.config.vocab_size} entries")
    if threads is None and device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        threads = default_threads(sum(p.numel() for p in network.parameters()))
    if threads is not None:
        torch.set_num_threads(threads)
    return Model(network, tokenizer=tokenizer, source=source, kernels=kernels, kernel_config=kernel_config,
                 max_sessions=max_sessions, max_state_bytes=max_state_bytes, fingerprint=digest)


def check_pool_bounds(max_sessions: object, max_state_bytes: object) -> None:
    """max_sessions and max_state_bytes: None or ints >= 1."""
    for name, value in (("max_sessions", max_sessions), ("max_state_bytes", max_state_bytes)):
        if value is not None:
            check_int(name, value, 1)


def default_threads(num_parameters: int) -> int:
    """torch CPU threads for a model of `num_parameters`: one per 10 million
    parameters (a smaller model's ops end before another thread could help),
    and at most every CPU this process may use but one. A thread per CPU
    stalls every op whenever anything else runs: another busy process, or a
    server's event loop (bench/RESULTS.md, "CPU threads")."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus - 1, num_parameters // 10_000_000))


def _long_tensor(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """int64 [N] on `device` from host ints (or a tensor already there)."""
    if isinstance(values, torch.Tensor):
        return values
    return torch.tensor(values, dtype=torch.long, device=device)
