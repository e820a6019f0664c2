"""Projection weights fused for the kernel paths (decode and prefill).

Projections that read the same input become one matrix, so one matrix product
serves them: x|y of each recurrent block, q|k|v of each attention block, and
the MLP's gate|up. The network's parameters are re-pointed to views into the
fused tensors, so no weight is stored twice and the reference path, saving and
fingerprints see the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ATTENTION
from ..model.griffin import Griffin


def _cat_rows(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.detach() for t in tensors], dim=0).contiguous()


class FusedWeights:
    """Per layer: {"w_qkv"} (attention) or {"w_xy", "b_xy", "neg8_softplus_a",
    "w_gates" [2, H, bw, bw]} (recurrent), and {"w_up", "b_up"} for the MLP; `inv_freq` [head_dim / 4]
    float32 RoPE frequencies."""

    def __init__(self, network: Griffin):
        cfg = network.config
        self.layers: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for block in network.blocks:
                if block.kind == ATTENTION:
                    att = block.attention_block
                    w_qkv = _cat_rows(att.proj_q.weight, att.proj_k.weight, att.proj_v.weight)
                    d, hd = cfg.width, cfg.head_dim
                    att.proj_q.weight.data = w_qkv[:d]
                    att.proj_k.weight.data = w_qkv[d:d + hd]
                    att.proj_v.weight.data = w_qkv[d + hd:]
                    entry = {"w_qkv": w_qkv}
                else:
                    rec = block.recurrent_block
                    l = cfg.lru_width
                    w_xy = _cat_rows(rec.linear_x.weight, rec.linear_y.weight)
                    b_xy = _cat_rows(rec.linear_x.bias, rec.linear_y.bias)
                    rec.linear_x.weight.data, rec.linear_y.weight.data = w_xy[:l], w_xy[l:]
                    rec.linear_x.bias.data, rec.linear_y.bias.data = b_xy[:l], b_xy[l:]
                    neg8 = (-8.0 * F.softplus(rec.rg_lru.a_param.detach().float())).contiguous()
                    lru = rec.rg_lru
                    # both gates' [H, bw, bw] blocks stacked: one batched product computes both
                    w_gates = torch.stack([lru.input_gate.w.detach(), lru.a_gate.w.detach()]).contiguous()
                    lru.input_gate.w.data, lru.a_gate.w.data = w_gates[0], w_gates[1]
                    entry = {"w_xy": w_xy, "b_xy": b_xy, "neg8_softplus_a": neg8, "w_gates": w_gates}
                up = block.mlp_block.ffw_up
                e = cfg.mlp_width
                # official layout [2, D, E] ([in, out]) -> one [2E, D] weight for F.linear
                w_up = up.w.detach().transpose(1, 2).reshape(2 * e, cfg.width).contiguous()
                up.w.data = w_up.view(2, e, cfg.width).transpose(1, 2)
                entry["w_up"], entry["b_up"] = w_up, up.b.detach().reshape(2 * e)
                self.layers.append(entry)
            hd = cfg.head_dim
            n = hd // 4  # rotated pairs per head: RoPE covers the first half of the head
            exponents = 2 * torch.arange(n, device=network.device) / (hd // 2)
            self.inv_freq = (1.0 / (cfg.rope_base ** exponents)).float().contiguous()
