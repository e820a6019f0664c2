"""Weight-only quantization: int8 and fp8 (e4m3) weights with one float32
scale per output channel, int4 weights with one float32 scale per group of
input channels, and the PyTorch reference of every quantized op.

What is quantized: every large matrix, i.e. the recurrent blocks' linear_x,
linear_y and linear_out, the attention projections (q, k, v, final), the
MLP's gate|up and down projections, and the tied embedding / LM head. What is
not: biases, norm scales, the conv taps, the RG-LRU's block-diagonal gates
and its a_param (together about 1% of the bytes), the activations and every
state tensor.

Scales: symmetric, per output channel (per row of an [out, in] weight):
int8 `scale = absmax / 127`, `q = round(w / scale)`; fp8 `scale = absmax /
448` (e4m3's largest finite value), `q = e4m3(w / scale)`. The embedding's
output channel is the vocabulary row, so one scale per row serves both the
lookup (row * scale) and the LM head (logit * scale).

int4: symmetric per group of G consecutive input channels of a row (G = 128,
or 64 / 32 where the row length is not a multiple of 128), `q = round(w /
scale)` clamped to [-8, 7], the scale chosen among `INT4_CLIP_RATIOS` x
absmax / 7 as the one of least squared error in the group (clipping a few
outliers buys finer steps for the rest); stored as q + 8 in a nibble, two
to a byte (column 2j in the low nibble of byte j, 2j + 1 in the high one):
a uint8 [N, K / 2] weight and float32 [N, K / G] scales. Four bits give too
few levels for one scale per row; a scale per 128 weights costs 1/4 bit a
weight.

A quantized weight is a parameter of the int8 / float8 dtype (never
trainable) next to its scale, named like the weight plus `_scale`
(`linear_x.weight` -> `linear_x.weight_scale`, `ffw_up.w` -> `ffw_up.w_scale`,
`input_embedding` -> `input_embedding_scale`). The MLP's up projection is
stored as [2, mlp_width, width] ([out, in] per half) so its rows are its
output channels, like every other quantized weight.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ATTENTION
from ..progress import Progress

# format -> (storage dtype, largest magnitude a scaled weight may take)
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0), "int4": (torch.uint8, 7.0)}
INT4_GROUPS = (128, 64, 32)  # int4 group sizes, in order of preference: the first that divides the row
# int4 scales tried per group, as multiples of absmax / 7: the demo model's held-out loss rises 1.5% with
# the least-error choice against 2.7% with absmax / 7 alone (docs/quantization.md)
INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 1.05, 1.1, 8 / 7)
_ROWS_PER_PIECE = 8192  # rows quantized at once: bounds the float32 temporary of a 256k-row embedding


def check_format(fmt: str | None) -> str | None:
    """`fmt` if it names a format (or is None); ValueError otherwise."""
    if fmt is not None and (not isinstance(fmt, str) or fmt not in FORMATS):
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {', '.join(FORMATS)} (or None)")
    return fmt


def storage_dtype(fmt: str) -> torch.dtype:
    return FORMATS[fmt][0]


def format_of(dtype: torch.dtype) -> str | None:
    """The format whose storage dtype is `dtype`, or None."""
    return next((f for f, (d, _) in FORMATS.items() if d == dtype), None)


def int4_group(k: int) -> int:
    """The int4 group size of rows of `k` weights (ValueError if none fits)."""
    group = next((g for g in INT4_GROUPS if k % g == 0), None)
    if group is None:
        raise ValueError(f"int4 needs rows of a multiple of {INT4_GROUPS[-1]} weights, got {k}")
    return group


def weight_shape(fmt: str, n: int, k: int) -> tuple[int, int]:
    """The stored shape of an [n, k] weight in `fmt`."""
    return (n, k // 2) if fmt == "int4" else (n, k)


def scale_shape(fmt: str, n: int, k: int) -> tuple[int, ...]:
    """The shape of an [n, k] weight's scales in `fmt`: [n] (per row) or [n, k / G] (int4)."""
    return (n, k // int4_group(k)) if fmt == "int4" else (n,)


# -- the ops' references ----------------------------------------------------------------
def quantize_rows(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w` [..., N, K] per row: returns (q [..., N, K] in the format's
    dtype, scale [..., N] float32) with w ~= q * scale[..., None]. An all-zero
    row gets scale 1 (q = 0), so no scale is 0 or NaN. int4: (q [..., N, K / 2]
    uint8, two nibbles a byte, scale [..., N, K / G]), the same per group.
    ValueError if `w` holds NaN or infinity (no scale represents its row)."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"a weight of shape {tuple(w.shape)} holds NaN or infinite values: it cannot be quantized")
    if fmt == "int4":
        return _quantize_int4(w)
    dtype, qmax = FORMATS[fmt]
    flat = w.reshape(-1, w.shape[-1])
    q = torch.empty(flat.shape, dtype=dtype, device=w.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, flat.shape[0], _ROWS_PER_PIECE):
        piece = flat[start:start + _ROWS_PER_PIECE].float()
        s = piece.abs().amax(dim=-1) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        scaled = piece / s[:, None]
        if dtype == torch.int8:
            scaled = scaled.round()
        q[start:start + _ROWS_PER_PIECE] = scaled.clamp(-qmax, qmax).to(dtype)
        scale[start:start + _ROWS_PER_PIECE] = s
    return q.reshape(w.shape), scale.reshape(w.shape[:-1])


def _quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = w.shape[-1]
    group = int4_group(k)
    flat = w.reshape(-1, k)
    q = torch.empty(flat.shape[0], k // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(flat.shape[0], k // group, dtype=torch.float32, device=w.device)
    for start in range(0, flat.shape[0], _ROWS_PER_PIECE):
        piece = flat[start:start + _ROWS_PER_PIECE].float().reshape(-1, k // group, group)
        amax = piece.abs().amax(dim=-1)
        best = best_err = None
        for ratio in INT4_CLIP_RATIOS:  # the scale of least squared error (absmax / 7 clips nothing)
            s = amax * (ratio / 7.0)
            s = torch.where(s > 0, s, torch.ones_like(s))
            err = ((piece / s[..., None]).round().clamp(-8, 7) * s[..., None] - piece).square().sum(dim=-1)
            if best is None:
                best, best_err = s, err
            else:  # ties keep the earlier candidate
                better = err < best_err
                best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
        nib = ((piece / best[..., None]).round().clamp(-8, 7) + 8).to(torch.uint8).reshape(-1, k // 2, 2)
        q[start:start + _ROWS_PER_PIECE] = nib[..., 0] | (nib[..., 1] << 4)
        scale[start:start + _ROWS_PER_PIECE] = best
    return q.reshape(*w.shape[:-1], k // 2), scale.reshape(*w.shape[:-1], k // group)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 weights [..., K / 2] (uint8, two nibbles a byte) as int8 [..., K] in [-8, 7]."""
    pairs = torch.stack([q & 0xF, q >> 4], dim=-1).to(torch.int8) - 8
    return pairs.reshape(*q.shape[:-1], 2 * q.shape[-1])


def byte_view(q: torch.Tensor) -> torch.Tensor:
    """q's bytes as uint8: gathers and concatenations of 1-byte weights run on
    every device and torch version this way (some lack float8 kernels for them)."""
    return q.view(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale per row (int4: per group), computed in float32 and rounded once to `dtype`."""
    if q.dtype == torch.uint8:
        w = unpack_int4(q).float()
        groups = scale.shape[-1]
        w = w.reshape(*w.shape[:-1], groups, -1) * scale[..., None]
        return w.reshape(*q.shape[:-1], 2 * q.shape[-1]).to(dtype)
    return (q.float() * scale[..., None]).to(dtype)


def quantized_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference quantized linear: F.linear(x, dequantize(q, scale), bias)
    in x's dtype. q: [N, K] ([N, K / 2] int4); scale: [N] ([N, K / G]) float32."""
    return F.linear(x, dequantize(q, scale, x.dtype), bias)


# -- quantized modules (the reference network's layers) ---------------------------------
def _frozen(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight [out, in] and its scale [out] (int4:
    [out, in / 2] and [out, in / G]); the bias (if any) stays in the model dtype."""

    def __init__(self, out_features: int, in_features: int, bias: bool, fmt: str, dtype, device):
        super().__init__()
        self.format = fmt
        self.weight = _frozen(weight_shape(fmt, out_features, in_features), storage_dtype(fmt), device)
        self.weight_scale = _frozen(scale_shape(fmt, out_features, in_features), torch.float32, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear_ref(x, self.weight, self.weight_scale, self.bias)


class QuantUpProjection(nn.Module):
    """The MLP's gate|up projection: w [2, E, D] quantized ([out, in] per half),
    w_scale [2, E] (int4: w [2, E, D / 2], w_scale [2, E, D / G]), b [2, 1, 1, E]
    in the model dtype (the official bias shape)."""

    def __init__(self, width: int, mlp_width: int, fmt: str, dtype, device):
        super().__init__()
        self.format = fmt
        self.w = _frozen((2, *weight_shape(fmt, mlp_width, width)), storage_dtype(fmt), device)
        self.w_scale = _frozen((2, *scale_shape(fmt, mlp_width, width)), torch.float32, device)
        self.b = nn.Parameter(torch.empty((2, 1, 1, mlp_width), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(quantized_linear_ref(x, self.w[j], self.w_scale[j], self.b[j, 0, 0]) for j in range(2))


class QuantEmbedder(nn.Module):
    """The tied embedding / LM head: input_embedding [V, D] quantized, one scale
    per vocabulary row (input_embedding_scale [V]; int4: [V, D / G]) for both directions."""

    def __init__(self, vocab_size: int, width: int, emb_scale: float | None, fmt: str, dtype, device):
        super().__init__()
        self.format, self.dtype, self.scale = fmt, dtype, emb_scale
        self.input_embedding = _frozen(weight_shape(fmt, vocab_size, width), storage_dtype(fmt), device)
        self.input_embedding_scale = _frozen(scale_shape(fmt, vocab_size, width), torch.float32, device)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = byte_view(self.input_embedding)[tokens].view(self.input_embedding.dtype)
        x = dequantize(rows, self.input_embedding_scale[tokens], self.dtype)
        return x * self.scale if self.scale is not None else x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear_ref(x, self.input_embedding, self.input_embedding_scale)


# -- whole networks ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Quantization:
    """What a quantized network records: its format and the fingerprint of the
    checkpoint it was quantized from (its identity for snapshots)."""

    format: str
    fingerprint: str


def quantize_network(network, fmt: str, fingerprint: str, device: torch.device | None = None,
                     progress: bool | None = None) -> None:
    """Replace, in place, every large matrix of `network` (a Griffin) by its
    `fmt` quantization. On the meta device only the structure changes (a
    checkpoint's quantized tensors are then loaded into it). `fingerprint`:
    the digest of the unquantized weights, kept as the network's identity.
    device: where the quantized matrices are computed and kept (default: the
    network's); the caller moves the rest of the network there. progress: show
    a progress line, a layer at a time (default: when stderr is a terminal)."""
    check_format(fmt)
    if network.quantization is not None:
        raise ValueError(f"the network is already quantized ({network.quantization.format})")
    if fmt == "int4":
        cfg = network.config
        widths = {"width": cfg.width, "lru_width": cfg.lru_width, "mlp_width": cfg.mlp_width}
        bad = {name: v for name, v in widths.items() if v % INT4_GROUPS[-1]}
        if bad:
            raise ValueError(f"int4 needs every matrix's input width to be a multiple of {INT4_GROUPS[-1]}; this "
                             f"model has {', '.join(f'{k}={v}' for k, v in bad.items())} (use int8 or fp8)")
    dtype = network.dtype
    fill = network.device.type != "meta"
    device = network.device if device is None else device
    cfg = network.config
    bar = Progress(f"quantizing to {fmt}", len(network.blocks) + 1, unit="layers", enabled=progress if fill else False)
    with torch.no_grad():
        for block in network.blocks:
            if block.kind == ATTENTION:
                owner = block.attention_block
                names = ("proj_q", "proj_k", "proj_v", "proj_final")
            else:
                owner = block.recurrent_block
                names = ("linear_x", "linear_y", "linear_out")
            for name in names:
                setattr(owner, name, _quantized_linear(getattr(owner, name), fmt, dtype, device, fill))
            mlp = block.mlp_block
            mlp.ffw_down = _quantized_linear(mlp.ffw_down, fmt, dtype, device, fill)
            up = QuantUpProjection(cfg.width, cfg.mlp_width, fmt, dtype, device)
            if fill:
                # official [2, D, E] ([in, out]) -> [2, E, D] ([out, in]): rows are output channels
                up.w.data, up.w_scale.data = quantize_rows(mlp.ffw_up.w.detach().to(device).transpose(1, 2), fmt)
                up.b.data = mlp.ffw_up.b.detach()
            mlp.ffw_up = up
            bar.advance(1)
        old = network.embedder
        emb = QuantEmbedder(cfg.vocab_size, cfg.width, old.scale, fmt, dtype, device)
        if fill:
            emb.input_embedding.data, emb.input_embedding_scale.data = quantize_rows(
                old.input_embedding.detach().to(device), fmt)
        network.embedder = emb
    bar.advance(1)
    bar.close()
    network.quantization = Quantization(fmt, fingerprint)


def _quantized_linear(linear: nn.Linear, fmt: str, dtype, device, fill: bool) -> QuantLinear:
    out_f, in_f = linear.weight.shape
    q = QuantLinear(out_f, in_f, linear.bias is not None, fmt, dtype, device)
    if fill:
        q.weight.data, q.weight_scale.data = quantize_rows(linear.weight.detach().to(device), fmt)
        if linear.bias is not None:
            q.bias.data = linear.bias.detach()
    return q


def quantized_weight_names(network) -> set[str]:
    """Names of the quantized weight parameters of `network` (each has a
    `<name>_scale` parameter beside it)."""
    return {name for name, p in network.named_parameters() if format_of(p.dtype) is not None}


def quantized_layout(rules: dict, weight_names: set[str], rule_type) -> dict:
    """A checkpoint layout (key -> rule) for a quantized network: the rules of
    quantized weights copy as stored ([out, in]: the MLP's transpose is gone),
    and each gains a `<key>_scale` entry for its scale."""
    out = {}
    for key, rule in rules.items():
        if rule.target in weight_names:
            out[key] = rule_type(rule.target, "same", rule.index)
            out[key + "_scale"] = rule_type(rule.target + "_scale", "same", rule.index)
        else:
            out[key] = rule
    return out
