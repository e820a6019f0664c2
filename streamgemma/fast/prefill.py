"""Prefill of one session's chunk on the kernel path, state read and written
in place at the session's slot.

Same function as `Griffin.forward_chunk` on the slot's gathered state, with
far fewer launches per layer (prefill of short inputs is bound by launches,
not arithmetic): fused projections (see fused_weights.py), Triton kernels for
the norms, the conv over the chunk, the whole RG-LRU (gates' nonlinearities,
scan, gelu product) and RoPE, and a sliding-window flash-attention kernel
over the ring's previous keys (read in place) plus the chunk's.
`KernelConfig.prefill_attention` = "sdpa" swaps in PyTorch's
memory-efficient attention with an explicit mask (the earlier path, kept for
before/after comparisons).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ATTENTION
from ..model.griffin import Griffin
from ..model.pool import StatePool
from .fused_weights import FusedWeights
from .qlinear import linear
from .tuning import KernelConfig

if TYPE_CHECKING:  # the kernels import Triton: loaded when a KernelPrefill is built
    from ..kernels.recurrent_prefill import ScanLaunch


class KernelPrefill:
    """Consumes chunks of tokens for one slot of `pool`. `rglru_launch`: the
    RG-LRU kernel's block sizes (None: its default by chunk shape)."""

    def __init__(self, network: Griffin, pool: StatePool, fused: FusedWeights,
                 kernel_config: KernelConfig | None = None, rglru_launch: ScanLaunch | None = None):
        from streamgemma.kernels import attention_prefill, elementwise, recurrent_prefill, rope

        self._ew, self._rec, self._rope, self._attn = elementwise, recurrent_prefill, rope, attention_prefill
        self.kernel_config = kc = kernel_config or KernelConfig()
        self.rglru_launch = rglru_launch
        self._tiles = None if kc.prefill_attention_tiles is None else \
            attention_prefill.PrefillTiles(*kc.prefill_attention_tiles)
        self.network, self.pool, self.config = network, pool, network.config
        self.layers, self.inv_freq = fused.layers, fused.inv_freq
        self.embedding, self.embedding_scale = fused.embedding, fused.embedding_scale

    @torch.no_grad()
    def chunk(self, slot: int, tokens: torch.Tensor, p0: int,
              logits: Literal["all", "last", "none"] = "last") -> torch.Tensor | None:
        """tokens: [T] int64 on the device, the slot's next tokens, the first at
        position p0 (the pool's position is not advanced here). Returns float32
        logits [T, vocab] ("all"), [1, vocab] ("last") or None."""
        cfg, net = self.config, self.network
        eps = cfg.rms_norm_eps
        x = net.embedder.encode(tokens).contiguous()  # residual stream [T, D], model dtype
        normed = torch.empty_like(x)
        delta = None
        for block, entry, state in zip(net.blocks, self.layers, self.pool.layers):
            self._ew.add_rmsnorm(x, delta, block.temporal_pre_norm.scale, eps, normed)
            if block.kind == ATTENTION:
                delta = self._attention(block.attention_block, entry, state, slot, normed, p0)
            else:
                delta = self._recurrent(block.recurrent_block, entry, state, slot, normed, p0)
            self._ew.add_rmsnorm(x, delta, block.channel_pre_norm.scale, eps, normed)
            hidden = torch.empty(x.shape[0], cfg.mlp_width, dtype=x.dtype, device=x.device)
            self._ew.geglu(self._project(normed, entry, "up"), hidden)
            delta = self._project(hidden, entry, "down")
        if logits == "none":
            return None
        rows = slice(None) if logits == "all" else slice(-1, None)
        x, delta = x[rows].contiguous(), delta[rows].contiguous()
        normed = torch.empty_like(x)
        self._ew.add_rmsnorm(x, delta, net.final_norm.scale, eps, normed)
        out = torch.empty(x.shape[0], cfg.vocab_size, dtype=torch.float32, device=x.device)
        return self._ew.softcap(self._linear(normed, self.embedding, self.embedding_scale), cfg.logits_soft_cap,
                                out)

    def _linear(self, x, weight, scale, bias=None):
        return linear(x, weight, scale, bias, dequantize_rows=self.kernel_config.dequantize_rows)

    def _project(self, x: torch.Tensor, entry: dict, name: str) -> torch.Tensor:
        """The layer's projection `name` ("out", "up", "down": FusedWeights' w_/s_/b_ entries) of x."""
        return self._linear(x, entry["w_" + name], entry["s_" + name], entry["b_" + name])

    def _recurrent(self, rec, entry, state, slot: int, normed: torch.Tensor, p0: int) -> torch.Tensor:
        cfg = self.config
        steps, l = normed.shape[0], cfg.lru_width
        conv, h = state
        xy = self._linear(normed, entry["w_xy"], entry["s_xy"], entry["b_xy"])  # [T, 2L]: x | y
        xc = torch.empty(steps, l, dtype=normed.dtype, device=normed.device)
        self._rec.conv1d_chunk(xy, conv, slot, p0, rec.conv_1d.w, rec.conv_1d.b, xc)
        # the new buffer is the last K-1 inputs of (buffer, chunk); after the conv has read it
        keep = cfg.conv_width - 1
        conv[slot] = torch.cat([conv[slot], xy[-keep:, :l]])[-keep:]
        heads, bw = cfg.num_heads, l // cfg.num_heads
        # [2, H, T, bw]: one batched product per gate reads xc's heads in place (a
        # broadcast matmul against [2, H, bw, bw] copied xc twice first)
        xh = xc.view(steps, heads, bw).transpose(0, 1)
        gates = torch.empty(2, heads, steps, bw, dtype=xc.dtype, device=xc.device)
        for g in range(2):
            torch.bmm(xh, entry["w_gates"][g], out=gates[g])
        gated = torch.empty_like(xc)
        lru = rec.rg_lru
        self._rec.rglru_chunk(gates, lru.input_gate.b, lru.a_gate.b, xc, xy[:, l:], h, slot, p0,
                              entry["neg8_softplus_a"], gated, launch=self.rglru_launch)
        return self._project(gated, entry, "out")

    def _attention(self, att, entry, state, slot: int, normed: torch.Tensor, p0: int) -> torch.Tensor:
        cfg = self.config
        steps, d, hd, w = normed.shape[0], cfg.width, cfg.head_dim, cfg.attention_window
        dev = normed.device
        ring_k, ring_v = state[0][slot], state[1][slot]
        qkv = self._linear(normed, entry["w_qkv"], entry["s_qkv"])
        self._rope.rope_chunk(qkv, cfg.num_heads, hd, p0, self.inv_freq)
        q, k, v = qkv[:, :d].view(steps, cfg.num_heads, hd), qkv[:, d:d + hd], qkv[:, d + hd:]
        if self.kernel_config.prefill_attention == "sdpa":
            mixed = sdpa_attention(q, k, v, ring_k, ring_v, p0)
        else:
            mixed = torch.empty(steps, d, dtype=normed.dtype, device=dev)
            self._attn.attention_prefill(q, k, v, ring_k, ring_v, p0, mixed, self._tiles)
        n = min(steps, w)  # the chunk's last keys go into the ring
        where = torch.arange(p0 + steps - n, p0 + steps, device=dev) % w
        ring_k.index_copy_(0, where, k[-n:])
        ring_v.index_copy_(0, where, v[-n:])
        return self._project(mixed, entry, "out")


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor,
                   ring_v: torch.Tensor, p0: int) -> torch.Tensor:
    """What attention_prefill computes, with PyTorch's attention: the ring's keys
    gathered in logical order before the chunk's, an explicit [T, prev + T] mask.
    q: [T, H, hd]; k, v: [T, hd]; ring_k, ring_v: [W, hd]. Returns [T, H * hd]."""
    steps, heads, hd = q.shape
    w, dev = ring_k.shape[0], q.device
    prev = min(p0, w)  # ring entries that hold keys: positions p0 - prev .. p0 - 1
    if prev:
        idx = torch.arange(p0 - prev, p0, device=dev) % w
        keys = torch.cat([ring_k.index_select(0, idx), k])
        values = torch.cat([ring_v.index_select(0, idx), v])
    else:
        keys, values = k, v
    kpos = torch.arange(p0 - prev, p0 + steps, device=dev)
    qpos = kpos[prev:, None]
    mask = (kpos[None] <= qpos) & (kpos[None] >= qpos - w)  # [T, prev + T]
    # Multi-query: the one key/value head is broadcast (a stride-0 view, no copy). The
    # memory-efficient backend takes any mask and shape without per-shape planning
    # (cuDNN's plans anew for every new chunk length).
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        mixed = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None, None].expand(1, heads, -1, -1),
            values[None, None].expand(1, heads, -1, -1), attn_mask=mask[None, None], scale=hd ** -0.5)
    return mixed[0].transpose(0, 1).reshape(steps, heads * hd)
