"""The batched one-token decode step on the Triton kernels, and its CUDA-graph
replay.

`KernelDecoder.step(tokens, slots, pos)` runs the same function as
`Griffin.forward_decode` + the pool's gather/scatter, but reads and writes the
state in place at each row's slot (-1 = padding row) with a handful of fused
kernels per layer and one matrix product per projection (projections that
read the same input are fused into one weight; the network's parameters
become views into the fused weights, so no weight is stored twice).

Up to `KernelConfig.gemv_max_batch` rows (default 1, at most 16) the products
are the fused GEMV kernel of `kernels/gemv.py` instead of cuBLAS: the norms,
GeGLU, conv1d, embedding lookup and soft-cap ride in the products' prologues
and epilogues. Block shapes, the kernel variant (CUDA-core FMAs or tensor-core
MMAs with the batch padded to 16) and launch options come from the `KernelConfig`.
Quantized weights (int8 / fp8) take the same paths: the GEMV kernel reads
them as stored and applies the row scales in its epilogue, the larger batches
go through `qlinear.linear` (fp8 tensor cores, or int8 dequantized in registers).

`GraphedDecoder` captures that step once per batch-size bucket in a CUDA graph
so a step costs one graph launch plus one small host-to-device copy (and,
above the GEMV batches, the soft-cap launched after the graph into the new
tensor it returns).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..config import ATTENTION
from ..errors import DeviceError
from ..model.griffin import Griffin
from ..model.pool import StatePool
from .fused_weights import FusedWeights
from .qlinear import fp8_tensor_cores, linear
from .tuning import KernelConfig


class KernelDecoder:
    """One decode step for many sessions, state updated in place in the pool,
    launched as `kernel_config` says (default: `KernelConfig()`)."""

    def __init__(self, network: Griffin, pool: StatePool, fused: FusedWeights,
                 kernel_config: KernelConfig | None = None):
        from streamgemma.kernels import attention_decode, elementwise, gemv, gemv_tc, pdl, recurrent_decode

        self._attn, self._ew, self._rec, self._gemv = attention_decode, elementwise, recurrent_decode, gemv
        self._gemv_tc = gemv_tc
        # split-K workspaces of the tensor-core products, per (batch bucket, epilogue, weight shape, dtype)
        self._workspaces: dict[tuple, tuple | None] = {}
        self.network, self.pool, self.config = network, pool, network.config
        self.layers, self.inv_freq = fused.layers, fused.inv_freq
        self.embedding, self.embedding_scale = fused.embedding, fused.embedding_scale
        kc = self.kernel_config = kernel_config or KernelConfig()
        if kc.gemv_max_batch > gemv.MAX_BATCH:
            raise ValueError(f"gemv_max_batch {kc.gemv_max_batch} is above the GEMV kernel's {gemv.MAX_BATCH}")
        self.gemv_max_batch = kc.gemv_max_batch
        if fused.quantized == "int4" and self.gemv_max_batch > 1:
            raise ValueError(f"KernelConfig(gemv_max_batch={kc.gemv_max_batch}): int4 weights run the fused GEMV at "
                             "batch 1 only (larger batches dequantize them for cuBLAS); use gemv_max_batch <= 1")
        supported = pdl.supported(network.device)
        if kc.pdl and not supported:
            raise DeviceError(f"KernelConfig(pdl=True): {network.device} has no programmatic dependent launch "
                              "(needs a compiled CUDA device of compute capability 9.0+)")
        self.pdl = supported if kc.pdl is None else kc.pdl

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, slots, pos: [B] int64 on the device (slot -1: padding row,
        whose state is untouched). Returns float32 logits [B, vocab] (into `out`
        if given). Positions are read, not advanced: the caller owns them."""
        if self.caps_in_step(tokens.shape[0]):
            return self._step_gemv(tokens, slots, pos, out)
        return self.soft_cap(self.uncapped_logits(tokens, slots, pos), out)

    def caps_in_step(self, batch: int) -> bool:
        """Whether a step of `batch` rows soft-caps inside its last launch (the
        GEMV path's LM-head epilogue); otherwise `uncapped_logits` + `soft_cap`."""
        return batch <= self.gemv_max_batch

    def soft_cap(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 soft-capped logits (into `out`, else a new tensor) of `uncapped_logits`."""
        if out is None:
            out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        return self._ew.softcap(logits, self.config.logits_soft_cap, out)

    def uncapped_logits(self, tokens: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The batched step up to its LM head: logits [B, vocab] in the model's
        dtype before the soft-cap. A graph can end here so that the cap writes
        float32 rows into a buffer of the caller's (no copy of a graph's output)."""
        cfg, net = self.config, self.network
        batch = tokens.shape[0]
        x = net.embedder.encode(tokens).contiguous()  # residual stream [B, D], model dtype
        normed = torch.empty_like(x)
        delta = None
        eps = cfg.rms_norm_eps
        rows = self.kernel_config.fp8_matmul_rows  # (the batched fp8 products' Triton range)
        pdl = self.pdl and self.kernel_config.batched_pdl  # (cuBLAS products launch plainly: PDL stops there)

        def project(src, entry, name, xq=None):  # the layer's projection `name` (FusedWeights' w_/s_/b_ entries)
            return linear(src, entry["w_" + name], entry["s_" + name], entry["b_" + name], xq,
                          fp8_matmul_rows=rows, pdl=pdl)

        def norm(delta, scale, weight):
            """normed = the norm of x + delta; for an fp8 tensor-core product of
            `weight`, also its e4m3 input rows, made by the same launch."""
            xq = _fp8_rows_buffers(normed, weight)
            self._ew.add_rmsnorm(x, delta, scale, eps, normed, fp8=xq, pdl=pdl)
            return xq

        for block, entry, state in zip(net.blocks, self.layers, self.pool.layers):
            if block.kind == ATTENTION:
                xq = norm(delta, block.temporal_pre_norm.scale, entry["w_qkv"])
                qkv = linear(normed, entry["w_qkv"], entry["s_qkv"], x_fp8=xq, fp8_matmul_rows=rows, pdl=pdl)
                mixed = torch.empty(batch, cfg.width, dtype=x.dtype, device=x.device)
                self._attention(qkv, state, slots, pos, mixed)
                delta = project(mixed, entry, "out")
            else:
                rec = block.recurrent_block
                l = cfg.lru_width
                xq = norm(delta, block.temporal_pre_norm.scale, entry["w_xy"])
                xy = linear(normed, entry["w_xy"], entry["s_xy"], entry["b_xy"], x_fp8=xq,
                            fp8_matmul_rows=rows, pdl=pdl)
                xc = torch.empty(batch, l, dtype=x.dtype, device=x.device)
                self._rec.conv1d_decode(xy, state[0], slots, pos, rec.conv_1d.w, rec.conv_1d.b, xc, pdl=pdl)
                gated = torch.empty_like(xc)
                self._rglru(rec.rg_lru, entry, xc, xy[:, l:], state, slots, pos, gated)
                delta = project(gated, entry, "out")
            xq = norm(delta, block.channel_pre_norm.scale, entry["w_up"])
            gate_up = project(normed, entry, "up", xq)
            hidden = torch.empty(batch, cfg.mlp_width, dtype=x.dtype, device=x.device)
            hq = _fp8_rows_buffers(hidden, entry["w_down"])  # the GeGLU quantizes the down product's input
            self._ew.geglu(gate_up, hidden, fp8=hq, pdl=pdl)
            delta = project(hidden, entry, "down", hq)
        xq = norm(delta, net.final_norm.scale, self.embedding)
        return linear(normed, self.embedding, self.embedding_scale, x_fp8=xq,
                      fp8_matmul_rows=self.kernel_config.fp8_head_rows, pdl=pdl)

    def _attention(self, qkv, state, slots, pos, out):
        self._attn.attention_decode(qkv, state[0], state[1], slots, pos, self.inv_freq, self.config.num_heads, out,
                                    block=self.kernel_config.attention_block(qkv.shape[0]), pdl=self.pdl)

    def _rglru(self, lru, entry, xc, y, state, slots, pos, out):
        self._rec.rglru_decode(xc, y, state[1], slots, pos, lru.input_gate.w, lru.input_gate.b, lru.a_gate.w,
                               lru.a_gate.b, entry["neg8_softplus_a"], out, launch=self.kernel_config.rglru_launch,
                               pdl=self.pdl)

    def _step_gemv(self, tokens, slots, pos, out):
        """The small-batch step: five launches per recurrent layer (x|y product
        with norm and conv, RG-LRU, out product, gate|up product with norm and
        GeGLU, down product) and six per attention layer. The residual stream
        lives in two buffers used in turn: each normalising product reads one
        and writes `x + delta` to the other."""
        cfg, net, kc = self.config, self.network, self.kernel_config
        batch, dev, dtype = tokens.shape[0], tokens.device, net.dtype
        d, l, eps = cfg.width, cfg.lru_width, cfg.rms_norm_eps
        res = [torch.empty(batch, d, dtype=dtype, device=dev) for _ in range(2)]
        cur = None  # index into res of the residual stream (before `delta`); None: the embeddings
        delta = None

        def gemv(src, weight, out, epilogue="plain", **kw):
            fmt = _weight_format(weight)
            config, tc = kc.gemv_launch(batch, epilogue, *_logical_shape(weight), fmt)
            ws = self._split_workspace(batch, epilogue, weight, config) if tc else None
            words = True if fmt == "int4" else None if kc.one_byte_words else False
            return self._gemv.gemv(src, weight, out, epilogue=epilogue, config=config, tensor_cores=tc,
                                   pdl=self.pdl, workspace=ws, words=words,
                                   half_dot=fmt == "int4" and kc.int4_half_dot, **kw)

        def project(src, name, out):  # an unfused projection of the layer's entry
            return gemv(src, entry["w_" + name], out, weight_scale=entry["s_" + name], bias=entry["b_" + name])

        def normed(weight, scale, out, **kw):
            nonlocal cur, delta
            if cur is None:  # the first product reads the embedding rows itself (Embedder.encode)
                src = dict(src=self.embedding, tokens=tokens, emb_scale=net.embedder.scale,
                           src_scale=self.embedding_scale)
                nxt = 0
            else:
                src = dict(src=res[cur], delta=delta)
                nxt = 1 - cur
            gemv(weight=weight, out=out, norm_scale=scale, eps=eps, residual_out=res[nxt], **src, **kw)
            cur, delta = nxt, None

        for block, entry, state in zip(net.blocks, self.layers, self.pool.layers):
            pre = block.temporal_pre_norm.scale
            if block.kind == ATTENTION:
                qkv = torch.empty(batch, entry["w_qkv"].shape[0], dtype=dtype, device=dev)
                normed(entry["w_qkv"], pre, qkv, weight_scale=entry["s_qkv"])
                mixed = torch.empty(batch, cfg.width, dtype=dtype, device=dev)
                self._attention(qkv, state, slots, pos, mixed)
                delta = project(mixed, "out", torch.empty(batch, d, dtype=dtype, device=dev))
            else:
                rec = block.recurrent_block
                xy = torch.empty(batch, 2 * l, dtype=dtype, device=dev)  # conv output | y
                normed(entry["w_xy"], pre, xy, bias=entry["b_xy"], weight_scale=entry["s_xy"], epilogue="conv",
                       conv=(state[0], slots, pos, rec.conv_1d.w, rec.conv_1d.b))
                gated = torch.empty(batch, l, dtype=dtype, device=dev)
                self._rglru(rec.rg_lru, entry, xy[:, :l], xy[:, l:], state, slots, pos, gated)
                delta = project(gated, "out", torch.empty(batch, d, dtype=dtype, device=dev))
            hidden = torch.empty(batch, cfg.mlp_width, dtype=dtype, device=dev)
            normed(entry["w_up"], block.channel_pre_norm.scale, hidden, bias=entry["b_up"],
                   weight_scale=entry["s_up"], epilogue="geglu")
            delta = project(hidden, "down", torch.empty(batch, d, dtype=dtype, device=dev))
        if out is None:
            out = torch.empty(batch, cfg.vocab_size, dtype=torch.float32, device=dev)
        # the last residual is not needed after the final norm: no residual_out
        gemv(res[cur], self.embedding, out, delta=delta, norm_scale=net.final_norm.scale, eps=eps,
             weight_scale=self.embedding_scale, epilogue="softcap", cap=cfg.logits_soft_cap)
        return out


    def _split_workspace(self, batch: int, epilogue: str, weight: torch.Tensor, config) -> tuple | None:
        """The split-K workspace of a tensor-core product (None: not split),
        one per batch bucket and shape, allocated zeroed on first use (a
        graph's warm-up, before capture) and then reused: the kernel leaves it
        zero again, so replays need no memset. Products of one shape run one
        after another in the stream, so the layers share it."""
        key = (1 << (batch - 1).bit_length(), epilogue, *weight.shape, weight.dtype)
        if key not in self._workspaces:
            n_out = weight.shape[0] // 2 if epilogue == "geglu" else weight.shape[0]
            self._workspaces[key] = self._gemv_tc.workspace(n_out, weight.shape[1], config, weight.device)
        return self._workspaces[key]


def _fp8_rows_buffers(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Empty (e4m3 rows, float32 row scales) for the kernel that writes `x` to
    fill as `fp8_rows(x)`, where x @ weight.T runs on the fp8 tensor cores; else None."""
    if not fp8_tensor_cores(x, weight):
        return None
    return (torch.empty(x.shape, dtype=weight.dtype, device=x.device),
            torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device))


def _logical_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the product: an int4 weight holds two columns a byte."""
    n, k = weight.shape
    return (n, 2 * k) if weight.dtype == torch.uint8 else (n, k)


def _weight_format(weight: torch.Tensor) -> str:
    """The weight's format as KernelConfig names it."""
    return {torch.int8: "int8", torch.float8_e4m3fn: "fp8", torch.uint8: "int4"}.get(weight.dtype, "float")


class GraphedDecoder:
    """`KernelDecoder.step` replayed from CUDA graphs, one per batch bucket.

    Rows beyond the live batch are padding (slot -1). Graphs are captured on
    first use of a bucket and recaptured if the pool reallocates its tensors.
    Each step returns a new logits tensor: a batched bucket's graph ends at
    the model-dtype logits and the soft-cap, launched after it, writes the
    live rows into a new float32 tensor; a GEMV bucket (few rows, capped in
    the graph) returns a copy. Nobody keeps a buffer the next step overwrites,
    so a caller never copies 262 MB (batch 256) to keep its logits.
    """

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self, decoder: KernelDecoder, buckets: tuple[int, ...] = BUCKETS):
        self.decoder = decoder
        self.buckets = tuple(sorted(buckets))
        self._graphs: dict[int, dict] = {}
        self._pool_generation = decoder.pool.generation

    def _bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _capture(self, bucket: int) -> dict:
        dev = self.decoder.network.device
        # rows: tokens, slots, positions; one pinned host buffer -> one copy per step
        inputs = torch.zeros(3, bucket, dtype=torch.long, device=dev)
        inputs[1] = -1
        host = torch.zeros(3, bucket, dtype=torch.long).pin_memory()
        g = {
            "inputs": inputs, "tokens": inputs[0], "slots": inputs[1], "pos": inputs[2],
            "host": host, "host_np": host.numpy(),
            "copied": torch.cuda.Event(),
            "capped": self.decoder.caps_in_step(bucket),
        }
        run = self.decoder.step if g["capped"] else self.decoder.uncapped_logits
        # Every row is padding while the graph is made: the kernels touch no session's state.
        g["graph"], g["logits"] = graph_of(lambda: run(g["tokens"], g["slots"], g["pos"]))
        g["copied"].record()
        return g

    def replay(self, bucket: int, batch: int | None = None) -> torch.Tensor:
        """The step of a captured bucket on its current inputs: the graph, then
        the soft-cap of the first `batch` rows (all if None) into a new tensor
        (or a copy of the graph's capped rows). What `step` launches after
        its input copies; bench tools time it."""
        g = self._graphs[bucket]
        g["graph"].replay()
        rows = g["logits"][:batch]
        return rows.clone() if g["capped"] else self.decoder.soft_cap(rows)

    def step(self, tokens: list[int] | torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Host lists of equal length B (tokens may instead be an int64 [B]
        tensor on the device: copied into the graph's input in stream order,
        never read by the host). Returns float32 logits [B, vocab], a new
        tensor: the caller may keep it across steps."""
        batch = len(slots)
        if self.decoder.pool.generation != self._pool_generation:
            self._graphs.clear()
            self._pool_generation = self.decoder.pool.generation
        bucket = self._bucket(batch)
        if bucket is None:  # larger than the largest bucket: run in bucket-sized pieces
            top = self.buckets[-1]
            return torch.cat([self.step(tokens[i:i + top], slots[i:i + top], positions[i:i + top])
                              for i in range(0, batch, top)])
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        g = self._graphs[bucket]
        g["copied"].synchronize()  # the previous step's copy has finished reading the host buffer
        host = g["host_np"]
        on_device = isinstance(tokens, torch.Tensor)
        host[0, :batch] = 0 if on_device else tokens
        host[1, :batch] = slots
        host[2, :batch] = positions
        host[0, batch:], host[1, batch:], host[2, batch:] = 0, -1, 0
        g["inputs"].copy_(g["host"], non_blocking=True)
        g["copied"].record()
        if on_device:
            g["tokens"][:batch].copy_(tokens)
        return self.replay(bucket, batch)


def graph_of(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`fn` captured in a CUDA graph, after two warm-up calls on a side stream
    (they compile the kernels): the graph, and fn's output, which every
    replay rewrites in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Each graph keeps its own memory pool: sharing one across captures
    # tripped an allocator assertion when a second bucket was captured.
    with torch.cuda.graph(graph):
        out = fn()  # lives in the graph's pool
    return graph, out


def kernels_available(device: torch.device) -> bool:
    """True where the decode kernels run by default: CUDA devices with Triton."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_kernels_usable(device: torch.device) -> None:
    """Raise DeviceError unless the kernels can run on `device`: CUDA, or the
    CPU under Triton's interpreter (TRITON_INTERPRET=1, used by the CPU tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise DeviceError("kernels=True needs Triton (pip install triton)") from None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DeviceError(f"the Triton kernels cannot run on {device}: use CUDA, or set "
                          "TRITON_INTERPRET=1 to run them (slowly) on the CPU for testing")
