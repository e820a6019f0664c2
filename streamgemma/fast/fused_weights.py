"""Projection weights fused for the kernel paths (decode and prefill).

Projections that read the same input become one matrix, so one matrix product
serves them: x|y of each recurrent block, q|k|v of each attention block, and
the MLP's gate|up. The network's parameters are re-pointed to views into the
fused tensors, so no weight is stored twice and the reference path, saving and
fingerprints see the same values.

Quantized weights (model/quantize.py) fuse the same way: their rows are
output channels, so the fused scale is the concatenation of the scales. Every
product's weight, scale (None unless quantized) and bias are listed per layer
under one prefix, so the decode and prefill paths read them in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ATTENTION
from ..model.griffin import Griffin
from ..model.quantize import byte_view


def _cat_rows(*tensors: torch.Tensor) -> torch.Tensor:
    if tensors[0].element_size() == 1:  # int8 / fp8 weights: concatenated as bytes
        return torch.cat([byte_view(t.detach()) for t in tensors], dim=0).view(tensors[0].dtype)
    return torch.cat([t.detach() for t in tensors], dim=0).contiguous()


def _fuse(entry: dict, name: str, parts: list, attr: str, sizes: list[int]) -> None:
    """entry[name] = the rows of `attr` of every module in `parts`, one tensor;
    each module's `attr` becomes a view into it."""
    fused = _cat_rows(*(getattr(m, attr) for m in parts))
    start = 0
    for m, size in zip(parts, sizes):
        getattr(m, attr).data = fused[start:start + size]
        start += size
    entry[name] = fused


class FusedWeights:
    """Per layer: {"w_qkv", "s_qkv"} (attention) or {"w_xy", "s_xy", "b_xy",
    "neg8_softplus_a", "w_gates" [2, H, bw, bw]} (recurrent); {"w_out", "s_out",
    "b_out"}: the temporal block's output projection; {"w_up", "s_up", "b_up"}
    and {"w_down", "s_down", "b_down"} for the MLP. `embedding`, `embedding_scale`:
    the tied embedding / LM head. `s_*`: float32 per-row scales of quantized
    weights (int4: per row and group, [N, K / G]), None otherwise. `inv_freq` [head_dim / 4] float32 RoPE frequencies.
    `quantized`: the weights' format ("int8", "fp8", "int4") or None."""

    def __init__(self, network: Griffin):
        cfg = network.config
        q = network.quantization
        self.quantized = None if q is None else q.format
        self.layers: list[dict[str, torch.Tensor | None]] = []
        emb = network.embedder
        self.embedding = emb.input_embedding
        self.embedding_scale = emb.input_embedding_scale if q is not None else None
        with torch.no_grad():
            for block in network.blocks:
                entry: dict[str, torch.Tensor | None] = {}
                if block.kind == ATTENTION:
                    att = block.attention_block
                    d, hd = cfg.width, cfg.head_dim
                    parts, sizes = [att.proj_q, att.proj_k, att.proj_v], [d, hd, hd]
                    _fuse(entry, "w_qkv", parts, "weight", sizes)
                    entry["s_qkv"] = None
                    if q is not None:
                        _fuse(entry, "s_qkv", parts, "weight_scale", sizes)
                    out = att.proj_final
                else:
                    rec = block.recurrent_block
                    l = cfg.lru_width
                    parts, sizes = [rec.linear_x, rec.linear_y], [l, l]
                    _fuse(entry, "w_xy", parts, "weight", sizes)
                    _fuse(entry, "b_xy", parts, "bias", sizes)
                    entry["s_xy"] = None
                    if q is not None:
                        _fuse(entry, "s_xy", parts, "weight_scale", sizes)
                    out = rec.linear_out
                    neg8 = (-8.0 * F.softplus(rec.rg_lru.a_param.detach().float())).contiguous()
                    lru = rec.rg_lru
                    # both gates' [H, bw, bw] blocks stacked: one batched product computes both
                    w_gates = torch.stack([lru.input_gate.w.detach(), lru.a_gate.w.detach()]).contiguous()
                    lru.input_gate.w.data, lru.a_gate.w.data = w_gates[0], w_gates[1]
                    entry.update(neg8_softplus_a=neg8, w_gates=w_gates)
                _plain(entry, "out", out)
                mlp = block.mlp_block
                up = mlp.ffw_up
                e = cfg.mlp_width
                if q is None:
                    # official layout [2, D, E] ([in, out]) -> one [2E, D] weight for F.linear
                    w_up = up.w.detach().transpose(1, 2).reshape(2 * e, cfg.width).contiguous()
                    up.w.data = w_up.view(2, e, cfg.width).transpose(1, 2)
                    entry["w_up"], entry["s_up"] = w_up, None
                else:  # stored [2, E, D] already: rows are output channels
                    entry["w_up"] = up.w.detach().reshape(2 * e, up.w.shape[-1])
                    entry["s_up"] = up.w_scale.reshape(2 * e, *up.w_scale.shape[2:])
                entry["b_up"] = up.b.detach().reshape(2 * e)
                _plain(entry, "down", mlp.ffw_down)
                self.layers.append(entry)
            hd = cfg.head_dim
            n = hd // 4  # rotated pairs per head: RoPE covers the first half of the head
            exponents = 2 * torch.arange(n, device=network.device) / (hd // 2)
            self.inv_freq = (1.0 / (cfg.rope_base ** exponents)).float().contiguous()


def _plain(entry: dict, name: str, linear) -> None:
    """An unfused projection's weight, scale (None unless quantized) and bias."""
    entry["w_" + name] = linear.weight
    entry["s_" + name] = getattr(linear, "weight_scale", None)
    entry["b_" + name] = linear.bias
