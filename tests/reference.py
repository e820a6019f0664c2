"""The ground truths: the official `recurrentgemma` torch modules and
transformers' RecurrentGemmaForCausalLM, built with random weights."""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

import streamgemma as sg


def reference_torch():
    """`recurrentgemma.torch` without the package `__init__`, which imports JAX."""
    if "recurrentgemma.torch" not in sys.modules:
        spec = importlib.util.find_spec("recurrentgemma")
        if spec is None:
            raise ImportError("the official `recurrentgemma` package is a test dependency: "
                              "pip install -e '.[dev]'")
        pkg = types.ModuleType("recurrentgemma")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["recurrentgemma"] = pkg
    import recurrentgemma.torch as rg_torch

    return rg_torch


def randomize_(module: torch.nn.Module, seed: int, a_param_names=("a_param", "recurrent_param")) -> None:
    """Random values in every parameter (the libraries zero biases and norm scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1] in a_param_names:
                r = torch.empty(p.shape).uniform_(0.9, 0.999, generator=g)
                p.copy_(torch.log(1 / r - 1))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def official_griffin(cfg: sg.GriffinConfig, seed: int = 0):
    """The official reference network for `cfg`, random weights, float32."""
    rg = reference_torch()
    ref_cfg = rg.GriffinConfig(
        vocab_size=cfg.vocab_size, width=cfg.width, mlp_expanded_width=cfg.mlp_width,
        num_heads=cfg.num_heads, lru_width=cfg.lru_width,
        block_types=tuple(rg.TemporalBlockType.ATTENTION if b == "attention" else rg.TemporalBlockType.RECURRENT
                          for b in cfg.block_types),
        embeddings_scale_by_sqrt_dim=cfg.embeddings_scale_by_sqrt_dim,
        attention_window_size=cfg.attention_window, logits_soft_cap=cfg.logits_soft_cap)
    net = rg.Griffin(ref_cfg, gradient_checkpointing=False, dtype=torch.float32)
    randomize_(net, seed)
    return net.eval()


def official_logits(net, tokens: list[int]) -> torch.Tensor:
    """Reference logits [T, V] for every position of one sequence from position 0."""
    t = torch.tensor([tokens])
    with torch.no_grad():
        logits, _ = net(t, torch.arange(len(tokens))[None], return_cache=False)
    return logits[0].float()


def hf_model(cfg: sg.GriffinConfig, seed: int = 0):
    """transformers' RecurrentGemmaForCausalLM for `cfg`, random weights, float32."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    hf_cfg = RecurrentGemmaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                     if not k.startswith("streamgemma_") and k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    model = RecurrentGemmaForCausalLM(hf_cfg).eval()
    randomize_(model, seed)
    return model


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the logits' scale."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def conv1d_step_ref(state: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, conv_w: torch.Tensor,
                    conv_b: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of the causal conv1d on buffers state [S, CK-1, L] at
    `slots` (-1: a padding row) for inputs x [B, L]: (the conv output [B, L],
    the state after the step, which rows are live). An input j steps back
    counts only where pos >= j (a reset slot holds stale values)."""
    ck = conv_w.shape[0]
    full = torch.cat([state[slots.clamp(min=0)], x[:, None]], dim=1)  # [B, CK, L]
    conv = conv_b + sum(full[:, ck - 1 - j] * conv_w[ck - 1 - j] * (pos >= j)[:, None] for j in range(ck))
    new_state = state.clone()
    live = slots >= 0
    new_state[slots[live]] = full[live, 1:]
    return conv, new_state, live
