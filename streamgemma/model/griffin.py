"""The Griffin network in plain PyTorch: the reference path and the CPU path.

Parameter names mirror the official `recurrentgemma` PyTorch state dict, so an
official checkpoint loads without renaming. Two paths share the weights:

- `Griffin.forward_chunk`: many tokens per row (prefill, training); starts
  from a given state and returns the state after the chunk.
- `Griffin.forward_decode`: one token per row, each row at its own position;
  reads the attention ring in place order (the layout the GPU kernels use).

State per layer (see `state.py`): recurrent layers keep the conv buffer
`[B, conv_width - 1, lru_width]` (model dtype) and the RG-LRU state
`[B, lru_width]` (float32); attention layers keep a ring of the previous
`window` keys and values `[B, window, head_dim]` (model dtype) where the key of
absolute position q lives at index q % window.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ATTENTION, GriffinConfig

_MAX_SQRT_GRADIENT = 1000.0
_MASK_VALUE = -2.3819763e38  # the reference's masked-logit value

LayerState = tuple[torch.Tensor, torch.Tensor]  # (conv, h) or (keys, values)


class _SqrtBoundDerivative(torch.autograd.Function):
    """sqrt whose gradient is clipped at _MAX_SQRT_GRADIENT, as in the reference:
    1 - a^2 reaches 0 and an unbounded derivative gives NaNs in bf16 training."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output / torch.sqrt(torch.clip(4.0 * x, min=1 / _MAX_SQRT_GRADIENT**2))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class _Params(nn.Module):
    """A bag of named parameters (`w`, `b`, ...) matching the official key names."""

    def __init__(self, **shapes_and_dtype):
        super().__init__()
        dtype = shapes_and_dtype.pop("dtype")
        device = shapes_and_dtype.pop("device")
        for name, shape in shapes_and_dtype.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + scale), computed in the input dtype like the reference."""

    def __init__(self, width: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.empty(width, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = torch.mean(torch.square(x), dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * (self.scale + 1)


class BlockDiagonalLinear(_Params):
    """`num_blocks` independent square linears over consecutive slices, with bias."""

    def __init__(self, width: int, num_blocks: int, dtype, device):
        bw = width // num_blocks
        super().__init__(w=(num_blocks, bw, bw), b=(num_blocks, bw), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bw, _ = self.w.shape
        xs = x.unflatten(-1, (h, bw))
        y = torch.einsum("...hi,hij->...hj", xs, self.w) + self.b
        return y.flatten(-2)


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit with its two block-diagonal gates."""

    def __init__(self, width: int, num_heads: int, dtype, device):
        super().__init__()
        self.a_param = nn.Parameter(torch.empty(width, dtype=dtype, device=device))
        self.input_gate = BlockDiagonalLinear(width, num_heads, dtype, device)
        self.a_gate = BlockDiagonalLinear(width, num_heads, dtype, device)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, L] model dtype; pos: [B, T] int64; h: [B, L] float32.
        Returns y [B, T, L] (model dtype) and the state after the last token."""
        reset = (pos == 0)[..., None]
        gate_x = torch.sigmoid(self.input_gate(x))
        gate_a = torch.sigmoid(self.a_gate(x))
        log_a = -8.0 * gate_a * F.softplus(self.a_param)
        a = torch.exp(log_a)
        a_square = torch.exp(2 * log_a)
        multiplier = _SqrtBoundDerivative.apply(1 - a_square)
        multiplier = torch.where(reset, torch.ones_like(multiplier), multiplier)
        normalized_x = (x * gate_x) * multiplier.type(x.dtype)
        a = torch.where(reset, torch.zeros_like(a), a).float()
        xs = normalized_x.float()
        ys = []
        for t in range(x.shape[1]):  # the reference's sequential scan; kernels replace it on GPU
            h = a[:, t] * h + xs[:, t]
            ys.append(h.type(x.dtype))
        return torch.stack(ys, dim=1), h


class Conv1D(_Params):
    """Depthwise causal conv over time: out[t] = b + sum_k w[k] * x[t - (K-1) + k]."""

    def __init__(self, width: int, temporal_width: int, dtype, device):
        super().__init__(w=(temporal_width, width), b=(width,), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, L]; pos: [B, T]; buf: [B, K-1, L], the K-1 inputs before x.
        Returns out [B, T, L] and the new buffer (the last K-1 inputs)."""
        k = self.w.shape[0]
        t = x.shape[1]
        full = torch.cat([buf.type(x.dtype), x], dim=1)  # [B, K-1+T, L]
        out = None
        for shift in range(k):  # shift back in time, 0 = current token (reference order)
            window = full[:, k - 1 - shift: k - 1 - shift + t]
            # A token `shift` steps back exists only if the current position is >= shift;
            # this is the reference's document mask and makes a reset need no zeroed buffer.
            window = window * (pos >= shift)[..., None].type(x.dtype)
            term = window * self.w[k - 1 - shift]
            out = term if out is None else out + term
        return out + self.b, full[:, t:]


class RecurrentBlock(nn.Module):
    """linear_y -> gelu; linear_x -> conv1d -> RG-LRU; product -> linear_out."""

    def __init__(self, cfg: GriffinConfig, dtype, device):
        super().__init__()
        d, l = cfg.width, cfg.lru_width
        self.linear_y = nn.Linear(d, l, dtype=dtype, device=device)
        self.linear_x = nn.Linear(d, l, dtype=dtype, device=device)
        self.linear_out = nn.Linear(l, d, dtype=dtype, device=device)
        self.conv_1d = Conv1D(l, cfg.conv_width, dtype, device)
        self.rg_lru = RGLRU(l, cfg.num_heads, dtype, device)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """x: [B, T, D]; pos: [B, T]; state: (conv [B, K-1, L], h [B, L] fp32)."""
        conv_buf, h = state
        y = gelu_tanh(self.linear_y(x))
        xb, conv_buf = self.conv_1d(self.linear_x(x), pos, conv_buf)
        xb, h = self.rg_lru(xb, pos, h)
        return self.linear_out(xb * y), (conv_buf, h)


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding on the first half of the last dim, as the reference does it.

    x: [..., T, N, head_dim]; pos: [..., T] int64. Angles are computed in float32
    and cast to x's dtype before the rotation (the reference's rounding).
    """
    x_rope, x_pass = torch.chunk(x, 2, dim=-1)
    n = x_rope.shape[-1] // 2
    freq_exponents = 2 * torch.arange(n, device=x.device) / x_rope.shape[-1]
    inv_freq = 1.0 / (base ** freq_exponents)
    angles = pos[..., None, None].float() * inv_freq
    sin, cos = torch.sin(angles).type_as(x), torch.cos(angles).type_as(x)
    first, second = torch.chunk(x_rope, 2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin, x_pass], dim=-1)


class LocalAttentionBlock(nn.Module):
    """Multi-query local attention: a query at p sees keys p - window .. p."""

    def __init__(self, cfg: GriffinConfig, dtype, device):
        super().__init__()
        d, hd = cfg.width, cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_heads, hd
        self.window, self.rope_base = cfg.attention_window, cfg.rope_base
        self.proj_q = nn.Linear(d, d, bias=False, dtype=dtype, device=device)
        self.proj_k = nn.Linear(d, hd, bias=False, dtype=dtype, device=device)
        self.proj_v = nn.Linear(d, hd, bias=False, dtype=dtype, device=device)
        self.proj_final = nn.Linear(d, d, bias=True, dtype=dtype, device=device)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        q = rope(self.proj_q(x).unflatten(-1, (self.num_heads, self.head_dim)), pos, self.rope_base)
        k = rope(self.proj_k(x).unsqueeze(-2), pos, self.rope_base).squeeze(-2)
        return q, k, self.proj_v(x)

    def _attend(self, q, keys, values, mask):
        """q [B, T, N, h]; keys/values [B, S, h]; mask [B, T, S] -> [B, T, N*h]."""
        logits = torch.einsum("btnh,bsh->bnts", q, keys) * (self.head_dim ** -0.5)
        logits = torch.where(mask[:, None], logits, _MASK_VALUE).float()
        probs = torch.softmax(logits, dim=-1).type_as(q)
        return torch.einsum("bnts,bsh->btnh", probs, values).flatten(-2)

    def forward(self, x: torch.Tensor, pos: torch.Tensor,
                state: LayerState | None) -> tuple[torch.Tensor, LayerState | None]:
        """Parallel path. x: [B, T, D]; pos: [B, T], consecutive per row;
        state: rings (keys, values) [B, W, h] or None (no history, no state kept).
        Keys of the previous W positions are read in logical order; the chunk's
        own keys are written into the returned rings."""
        q, k, v = self._qkv(x, pos)
        if state is None:
            keys, values, kpos = k, v, pos
        else:
            ring_k, ring_v = state
            w = self.window
            # Positions p0 - W .. p0 - 1 (those < 0 never existed) and their ring slots.
            prev = pos[:, :1] - w + torch.arange(w, device=pos.device)
            idx = (prev % w)[..., None].expand(-1, -1, self.head_dim)
            keys = torch.cat([ring_k.gather(1, idx), k], dim=1)
            values = torch.cat([ring_v.gather(1, idx), v], dim=1)
            kpos = torch.cat([torch.where(prev >= 0, prev, torch.full_like(prev, -(2 ** 62))), pos], dim=1)
        qpos = pos[..., None]
        mask = (kpos[:, None, :] <= qpos) & (kpos[:, None, :] >= qpos - self.window)
        out = self.proj_final(self._attend(q, keys, values, mask))
        if state is None:
            return out, None
        n = min(x.shape[1], self.window)
        slots = (pos[:, -n:] % self.window)[..., None].expand(-1, -1, self.head_dim)
        ring_k = ring_k.scatter(1, slots, k[:, -n:].type(ring_k.dtype))
        ring_v = ring_v.scatter(1, slots, v[:, -n:].type(ring_v.dtype))
        return out, (ring_k, ring_v)

    def forward_decode(self, x: torch.Tensor, pos: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """One-token path. x: [B, D]; pos: [B]; state: rings [B, W, h] in place order.
        Attends to the W ring entries that hold positions >= 0, plus the current
        key, then writes the current key/value at pos % W (in place)."""
        ring_k, ring_v = state
        w = self.window
        q, k, v = self._qkv(x[:, None], pos[:, None])  # [B, 1, N, h], [B, 1, h]
        keys = torch.cat([ring_k, k.type(ring_k.dtype)], dim=1)
        values = torch.cat([ring_v, v.type(ring_v.dtype)], dim=1)
        # Ring index j holds position p - W + ((j - p) mod W), which exists iff j < p or p >= W.
        valid = torch.arange(w, device=x.device)[None] < pos[:, None]
        mask = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)[:, None]
        out = self.proj_final(self._attend(q, keys, values, mask))[:, 0]
        rows = torch.arange(x.shape[0], device=x.device)
        ring_k[rows, pos % w] = k[:, 0].type(ring_k.dtype)
        ring_v[rows, pos % w] = v[:, 0].type(ring_v.dtype)
        return out, (ring_k, ring_v)


class UpProjection(_Params):
    """The MLP's gate and up projections: w [2, D, E] ([in, out], the official
    layout), b [2, 1, 1, E]. Returns the two pre-activations."""

    def __init__(self, width: int, mlp_width: int, dtype, device):
        super().__init__(w=(2, width, mlp_width), b=(2, 1, 1, mlp_width), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ self.w[0] + self.b[0, 0], x @ self.w[1] + self.b[1, 0]


class MLPBlock(nn.Module):
    """GeGLU: down(gelu(x W0 + b0) * (x W1 + b1))."""

    def __init__(self, cfg: GriffinConfig, dtype, device):
        super().__init__()
        d, e = cfg.width, cfg.mlp_width
        self.ffw_up = UpProjection(d, e, dtype, device)
        self.ffw_down = nn.Linear(e, d, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.ffw_up(x)
        return self.ffw_down(gelu_tanh(gate) * up)


class ResidualBlock(nn.Module):
    def __init__(self, cfg: GriffinConfig, kind: str, dtype, device):
        super().__init__()
        self.kind = kind
        self.temporal_pre_norm = RMSNorm(cfg.width, cfg.rms_norm_eps, dtype, device)
        if kind == ATTENTION:
            self.attention_block = LocalAttentionBlock(cfg, dtype, device)
        else:
            self.recurrent_block = RecurrentBlock(cfg, dtype, device)
        self.channel_pre_norm = RMSNorm(cfg.width, cfg.rms_norm_eps, dtype, device)
        self.mlp_block = MLPBlock(cfg, dtype, device)

    def forward(self, x, pos, state, decode: bool = False):
        normed = self.temporal_pre_norm(x)
        if self.kind == ATTENTION:
            fn = self.attention_block.forward_decode if decode else self.attention_block.forward
            y, state = fn(normed, pos, state)
        else:
            if decode:
                y, state = self.recurrent_block(normed[:, None], pos[:, None], state)
                y = y[:, 0]
            else:
                y, state = self.recurrent_block(normed, pos, state)
        residual = x + y
        return residual + self.mlp_block(self.channel_pre_norm(residual)), state


def _round_to_bfloat16(value: float) -> float:
    # Built on the CPU explicitly: networks are constructed under torch.device("meta").
    return float(torch.tensor(value, device="cpu").to(torch.bfloat16))


class Embedder(nn.Module):
    def __init__(self, cfg: GriffinConfig, dtype, device):
        super().__init__()
        self.input_embedding = nn.Parameter(torch.empty(cfg.vocab_size, cfg.width, dtype=dtype, device=device))
        # The reference rounds sqrt(width) to bfloat16 "to match training".
        self.scale = _round_to_bfloat16(math.sqrt(cfg.width)) if cfg.embeddings_scale_by_sqrt_dim else None

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.input_embedding[tokens]
        return x * self.scale if self.scale is not None else x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.input_embedding.T


class Griffin(nn.Module):
    """The whole network. Build it on the meta device and load weights into it,
    or call `init_random_` for tests."""

    def __init__(self, cfg: GriffinConfig, dtype=torch.float32, device=None):
        super().__init__()
        self.config = cfg
        self.embedder = Embedder(cfg, dtype, device)
        self.blocks = nn.ModuleList(ResidualBlock(cfg, kind, dtype, device) for kind in cfg.block_types)
        self.final_norm = RMSNorm(cfg.width, cfg.rms_norm_eps, dtype, device)
        # None, or what model/quantize.py recorded when it quantized the weights
        self.quantization = None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized network's weights have another)."""
        return self.final_norm.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.scale.device

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.embedder.decode(self.final_norm(x))
        cap = self.config.logits_soft_cap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def forward_chunk(self, tokens: torch.Tensor, pos: torch.Tensor, states: list[LayerState] | None,
                      logits: Literal["all", "last", "none"] = "last"):
        """Parallel path.

        tokens, pos: [B, T] int64 (positions consecutive per row; position 0
        resets the row's state). states: per-layer state gathered for these rows
        (see module doc), or None for a stateless pass (training).
        Returns (logits, new_states): logits float32 [B, T, V] ("all"),
        [B, V] ("last") or None; new_states like `states` (None if None).
        """
        if states is None:
            states = [self._zero_recurrent(tokens.shape[0]) if b.kind != ATTENTION else None
                      for b in self.blocks]
            keep = False
        else:
            keep = True
        x = self.embedder.encode(tokens)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, pos, state)
            new_states.append(state)
        if logits == "none":
            out = None
        else:
            out = self._logits(x if logits == "all" else x[:, -1])
        return out, (new_states if keep else None)

    def forward_decode(self, tokens: torch.Tensor, pos: torch.Tensor, states: list[LayerState]):
        """One-token path. tokens, pos: [B] int64; states: per-layer state for
        these rows (attention rings are updated in place). Returns float32
        logits [B, V] and the new states."""
        x = self.embedder.encode(tokens)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, pos, state, decode=True)
            new_states.append(state)
        return self._logits(x), new_states

    def _zero_recurrent(self, batch: int) -> LayerState:
        cfg = self.config
        return (torch.zeros(batch, cfg.conv_width - 1, cfg.lru_width, dtype=self.dtype, device=self.device),
                torch.zeros(batch, cfg.lru_width, dtype=torch.float32, device=self.device))

    @torch.no_grad()
    def init_random_(self, generator: torch.Generator) -> None:
        """Random weights at the reference's scales. Biases and norm scales are
        random too (the reference zeroes them) so tests exercise every parameter."""
        for name, p in self.named_parameters():
            if name.endswith("a_param"):
                # Decay radius r uniform in [0.9, 0.999] as the reference: a_param = softplus^-1(-log r).
                r = torch.empty(p.shape, device=generator.device).uniform_(0.9, 0.999, generator=generator)
                p.copy_(torch.log(1 / r - 1))
            elif p.ndim >= 2:
                # nn.Linear weights are [out, in]; the official `.w` tensors are [..., in, out].
                fan_in = p.shape[-2] if name.endswith(".w") else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=generator, device=generator.device) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=generator, device=generator.device) * 0.1)
