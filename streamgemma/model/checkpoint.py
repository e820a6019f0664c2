"""Checkpoint discovery and loading (saving is `save`; the weights' digest is in
`fingerprint`, the device and dtype in `placement`).

Formats a user has on disk:
- Hugging Face: `config.json` + `model.safetensors` (or shards with
  `model.safetensors.index.json`), key names of transformers'
  RecurrentGemmaForCausalLM. `model.save` writes this layout too.
- Official PyTorch (Kaggle): a flat state dict `{variant}.pt` with the
  reference's key names; the config is inferred from the tensor shapes.

Tensors are read one at a time (safetensors are memory-mapped, `.pt` files are
opened with `mmap=True, weights_only=True`), converted, and copied into a
network built on the meta device, so host memory holds one tensor beyond the
mapped file at a time. A pickle cannot run code: only `weights_only` loading is
used.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from ..config import ATTENTION, GriffinConfig
from ..errors import CheckpointError, ConfigError
from ..progress import Progress
from .fingerprint import SourceDigest, loaded_fingerprint
from .griffin import Griffin
from .quantize import FORMATS, Quantization, check_format, quantize_network, quantized_layout, quantized_weight_names

OFFICIAL_SUFFIXES = (".pt", ".pth", ".ckpt")
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
QUANT_METHOD = "streamgemma"  # config.json's quantization_config.quant_method of a quantized save


# -- key layouts ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """Where a tensor of a checkpoint layout lands in the network.

    kind: "same" (copy), "transpose" (2-D), "conv" ([L, 1, K] <-> [K, L]).
    index: a leading index into the target parameter (the MLP's fused
    up-projection holds transformers' gate and up projections as [0] and [1]).
    """

    target: str
    kind: str = "same"
    index: tuple[int, ...] = ()

    def source_shape(self, target_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = target_shape[len(self.index):]
        if self.kind == "transpose":
            return tuple(reversed(shape))
        if self.kind == "conv":
            return (shape[1], 1, shape[0])
        return tuple(shape)

    def to_target(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "transpose":
            return t.T
        if self.kind == "conv":
            return t[:, 0, :].T
        return t

    def to_source(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "transpose":
            return t.T
        if self.kind == "conv":
            return t.T[:, None, :]
        return t


def official_layout(network: Griffin) -> dict[str, Rule]:
    """The reference state dict: our parameter names, unchanged."""
    return {name: Rule(name) for name, _ in network.named_parameters()}


def hf_layout(config: GriffinConfig) -> dict[str, Rule]:
    """transformers' RecurrentGemmaForCausalLM key names -> network parameters."""
    rules = {"model.embed_tokens.weight": Rule("embedder.input_embedding"),
             "model.final_norm.weight": Rule("final_norm.scale")}
    for i, kind in enumerate(config.block_types):
        hf, us = f"model.layers.{i}.", f"blocks.{i}."
        rules[hf + "temporal_pre_norm.weight"] = Rule(us + "temporal_pre_norm.scale")
        rules[hf + "channel_pre_norm.weight"] = Rule(us + "channel_pre_norm.scale")
        t = hf + "temporal_block."
        if kind == ATTENTION:
            a = us + "attention_block."
            for h_name, o_name in (("q_proj", "proj_q"), ("k_proj", "proj_k"), ("v_proj", "proj_v"),
                                   ("o_proj", "proj_final")):
                rules[t + h_name + ".weight"] = Rule(a + o_name + ".weight")
            rules[t + "o_proj.bias"] = Rule(a + "proj_final.bias")
        else:
            r = us + "recurrent_block."
            for lin in ("linear_x", "linear_y", "linear_out"):
                rules[t + lin + ".weight"] = Rule(r + lin + ".weight")
                rules[t + lin + ".bias"] = Rule(r + lin + ".bias")
            rules[t + "conv_1d.weight"] = Rule(r + "conv_1d.w", "conv")
            rules[t + "conv_1d.bias"] = Rule(r + "conv_1d.b")
            rules[t + "rg_lru.recurrent_param"] = Rule(r + "rg_lru.a_param")
            rules[t + "rg_lru.input_gate_weight"] = Rule(r + "rg_lru.input_gate.w")
            rules[t + "rg_lru.input_gate_bias"] = Rule(r + "rg_lru.input_gate.b")
            rules[t + "rg_lru.recurrent_gate_weight"] = Rule(r + "rg_lru.a_gate.w")
            rules[t + "rg_lru.recurrent_gate_bias"] = Rule(r + "rg_lru.a_gate.b")
        m, mm = hf + "mlp_block.", us + "mlp_block."
        for j, proj in enumerate(("gate_proj", "up_proj")):
            rules[m + proj + ".weight"] = Rule(mm + "ffw_up.w", "transpose", (j,))
            rules[m + proj + ".bias"] = Rule(mm + "ffw_up.b", "same", (j, 0, 0))
        rules[m + "down_proj.weight"] = Rule(mm + "ffw_down.weight")
        rules[m + "down_proj.bias"] = Rule(mm + "ffw_down.bias")
    return rules


# -- discovery -----------------------------------------------------------------------
@dataclasses.dataclass
class Checkpoint:
    """What `discover` found at a path."""

    format: str  # "hf" or "official"
    root: Path
    weight_files: list[Path]
    config_file: Path | None
    tokenizer_file: Path | None


def discover(path: str | os.PathLike) -> Checkpoint:
    """Identify the checkpoint format at `path` (a directory or a `.pt` file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in OFFICIAL_SUFFIXES:
            return Checkpoint("official", p.parent, [p], _beside(p.parent, "config.json"),
                              _beside(p.parent, "tokenizer.model"))
        if p.suffix == ".safetensors" or p.name in (HF_INDEX, "config.json"):
            p = p.parent
        else:
            raise CheckpointError(f"{p}: unknown checkpoint format; expected a Hugging Face directory "
                                  f"(config.json + *.safetensors) or an official state dict "
                                  f"({', '.join(OFFICIAL_SUFFIXES)})")
    tokenizer = _beside(p, "tokenizer.model")
    if (p / "config.json").is_file() and ((p / HF_INDEX).is_file() or (p / HF_SINGLE).is_file()):
        if (p / HF_INDEX).is_file():
            files = _shards_from_index(p / HF_INDEX)
        else:
            files = [p / HF_SINGLE]
        return Checkpoint("hf", p, files, p / "config.json", tokenizer)
    official = sorted(f for f in p.iterdir() if f.suffix in OFFICIAL_SUFFIXES and f.is_file())
    if len(official) == 1:
        return Checkpoint("official", p, official, _beside(p, "config.json"), tokenizer)
    if len(official) > 1:
        raise CheckpointError(f"{p}: several state dicts ({', '.join(f.name for f in official)}); "
                              "pass the path of the one to load")
    seen = ", ".join(sorted(f.name for f in p.iterdir())[:10]) or "nothing"
    if (p / "config.json").is_file():
        raise CheckpointError(f"{p}: has config.json but no {HF_SINGLE} or {HF_INDEX}")
    raise CheckpointError(f"{p}: no checkpoint found (found: {seen}); expected config.json + "
                          f"{HF_SINGLE} (Hugging Face) or one {'/'.join(OFFICIAL_SUFFIXES)} state dict")


def _beside(directory: Path, name: str) -> Path | None:
    f = directory / name
    return f if f.is_file() else None


def _shards_from_index(index_file: Path) -> list[Path]:
    try:
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
    if not names:
        raise CheckpointError(f"{index_file}: its weight_map lists no shard files")
    if not all(isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n for n in names):
        raise CheckpointError(f"{index_file}: a shard named in the index is not a file name of this directory")
    files = [index_file.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_file}: shard files listed in the index are missing: {', '.join(missing)}")
    return files


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# -- tensor sources ------------------------------------------------------------------
def _iter_safetensors(
        files: list[Path]) -> Iterator[tuple[str, Path, Callable[[], torch.Tensor], tuple[int, ...], int]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        # The handle stays open (memory-mapped) while the getters are alive.
        for key in handle.keys():
            sl = handle.get_slice(key)
            shape = tuple(sl.get_shape())
            nbytes = math.prod(shape) * _dtype_size(sl.get_dtype())
            yield key, f, (lambda h=handle, k=key: h.get_tensor(k)), shape, nbytes


def _metadata(file: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as handle:
        return handle.metadata()


def _dtype_size(name: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "F8_E4M3": 1, "BOOL": 1}.get(name, 4)


def _load_official(f: Path) -> Mapping[str, torch.Tensor]:
    """torch.load restricted to tensors (no code runs from the pickle)."""
    try:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(f, map_location="cpu", weights_only=True)  # legacy (non-zip) file
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise CheckpointError(f"{f}: refused to load: the pickle holds more than tensors ({first}). "
                              "Only plain state dicts are accepted; nothing from the file was executed.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable PyTorch state dict ({e})") from None
    if isinstance(sd, Mapping) and "model_state_dict" in sd and isinstance(sd["model_state_dict"], Mapping):
        sd = sd["model_state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f}: expected a flat state dict of tensors, got {type(sd).__name__}")
    return sd


# -- loading -------------------------------------------------------------------------
def build_config(ckpt: Checkpoint, config: GriffinConfig | None) -> GriffinConfig:
    """The config of a checkpoint: config.json for Hugging Face; the tensor shapes
    (plus an optional config.json or `config` argument) for official state dicts."""
    if ckpt.format == "hf":
        try:
            found = GriffinConfig.from_hf_dict(read_json(ckpt.config_file), source=str(ckpt.config_file))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if config is not None and config != found:
            raise CheckpointError(f"{ckpt.config_file}: describes {_diff(found, config)}, "
                                  "which contradicts the config passed to load()")
        return found
    return config  # official: inferred after the shapes are read


def _diff(a: GriffinConfig, b: GriffinConfig) -> str:
    parts = [f"{k}={getattr(a, k)!r} (expected {getattr(b, k)!r})" for k in a.to_dict()
             if getattr(a, k) != getattr(b, k)]
    return ", ".join(parts)


def saved_quantization(ckpt: Checkpoint) -> Quantization | None:
    """The quantization a checkpoint was saved with (config.json's
    `quantization_config`, written by `save_hf` of a quantized network), or None."""
    if ckpt.format != "hf":
        return None
    q = read_json(ckpt.config_file).get("quantization_config")
    if q is None:
        return None
    where = f"{ckpt.config_file}: quantization_config"
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(f"{where}: quant_method {method!r} is not supported; streamgemma loads its own "
                              f"quantized saves ({QUANT_METHOD!r}) and unquantized checkpoints")
    fmt, fp = q.get("format"), q.get("fingerprint")
    hex_digest = isinstance(fp, str) and len(fp) == 32 and all(c in "0123456789abcdef" for c in fp)
    if not isinstance(fmt, str) or fmt not in FORMATS or not hex_digest:
        raise CheckpointError(f"{where}: want a format ({', '.join(FORMATS)}) and a 32-hex-digit fingerprint, "
                              f"got {fmt!r} and {fp!r}")
    return Quantization(fmt, fp)


def load_network(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 config: GriffinConfig | None = None, progress: bool | None = None,
                 quantize: str | None = None) -> tuple[Griffin, str]:
    """Read a checkpoint into a new network on `device` in `dtype` (the
    activations' dtype), and its fingerprint (of the weights as stored, so a
    float16 load has the checkpoint's). quantize: "int8", "fp8" or "int4" quantizes the weights after
    reading them into host memory, one matrix at a time on `device` (so the
    device never holds the unquantized model); a checkpoint saved quantized
    loads as saved, and asking for another format is a CheckpointError."""
    check_format(quantize)
    saved = saved_quantization(ckpt)
    if saved is not None and quantize not in (None, saved.format):
        raise CheckpointError(f"{ckpt.root}: holds {saved.format} weights; cannot quantize them to {quantize} "
                              "(load the unquantized checkpoint with that quantize= instead)")
    if ckpt.format == "hf":
        cfg = build_config(ckpt, config)
        sources = list(_iter_safetensors(ckpt.weight_files))
        metadata = _metadata(ckpt.weight_files[0])
        layout_of = hf_layout
    else:
        f = ckpt.weight_files[0]
        sd, metadata = _load_official(f), None
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        hypers = {}
        if config is None and ckpt.config_file is not None:
            config = _config_beside(ckpt.config_file)
        if config is not None:
            hypers = {k: getattr(config, k) for k in ("attention_window", "logits_soft_cap",
                                                      "embeddings_scale_by_sqrt_dim", "conv_width",
                                                      "rms_norm_eps", "rope_base")}
        try:
            cfg = GriffinConfig.from_official_shapes(shapes, source=str(f), **hypers)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if config is not None and config != cfg:
            raise CheckpointError(f"{f}: the tensor shapes give {_diff(cfg, config)}, "
                                  "which contradicts the given config")
        sources = [(k, f, (lambda v=v: v), tuple(v.shape), v.numel() * v.element_size()) for k, v in sd.items()]
        layout_of = lambda c: official_layout(Griffin(c, device="meta"))  # noqa: E731

    layout = layout_of(cfg)
    with torch.device("meta"):
        network = Griffin(cfg, dtype=dtype)
    if saved is not None:  # the quantized structure, its tensors loaded as stored
        try:
            quantize_network(network, saved.format, saved.fingerprint)
        except ValueError as e:  # (a config edited after the save, e.g. a width int4 cannot take)
            raise CheckpointError(f"{ckpt.config_file}: {e}") from None
        layout = quantized_layout(layout, quantized_weight_names(network), Rule)
    scales = {r.target for k, r in layout.items() if k.endswith("_scale") and saved is not None}
    requantize = quantize is not None and saved is None
    digest = SourceDigest(network) if saved is None else None
    # Checked before anything is allocated: a corrupt config can ask for terabytes.
    _check_tensors(ckpt, sources, layout, dict(network.named_parameters()))
    network = network.to_empty(device=torch.device("cpu") if requantize else device)
    params = dict(network.named_parameters())
    bar = Progress(f"loading {ckpt.root.name or ckpt.root}", sum(s[4] for s in sources), unit="B",
                   enabled=progress)
    with torch.no_grad():
        for key, file, get, _, nbytes in sources:
            if key == "lm_head.weight":  # tied to the embedding: nothing to copy
                bar.advance(nbytes)
                continue
            rule, tensor = layout[key], get()
            target = params[rule.target]
            if digest is not None:
                digest.add(rule.target, rule.index, rule.to_target(tensor))
            quantized = target.dtype in (d for d, _ in FORMATS.values())
            if quantized and tensor.dtype != target.dtype:
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {tensor.dtype}; the checkpoint's "
                                      f"quantization_config says {target.dtype}")
            if not quantized and not tensor.is_floating_point():
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {tensor.dtype}; expected floating point")
            dst = target[rule.index] if rule.index else target
            dst.copy_(rule.to_target(tensor).to(device=dst.device, dtype=target.dtype))
            if _damaged(dst):
                if not _damaged(tensor):  # finite in the file: the cast overflowed
                    raise CheckpointError(f"{file}: tensor {key!r} has values beyond the range of "
                                          f"{target.dtype}; load it in another dtype (bfloat16, float32)")
                raise CheckpointError(f"{file}: tensor {key!r} holds NaN or infinite values: the file is damaged "
                                      "(download it again)")
            if rule.target in scales and not bool((dst > 0).all()):  # quantize() never writes one
                raise CheckpointError(f"{file}: tensor {key!r} holds a scale that is not positive: the file is "
                                      "damaged or was not written by streamgemma")
            bar.advance(nbytes)
    bar.close()
    fp = loaded_fingerprint(digest.hexdigest(), metadata) if digest is not None else saved.fingerprint
    if requantize:
        quantize_network(network, quantize, fp, device=device, progress=progress)
        network = network.to(device)
    return network, fp


def _damaged(t: torch.Tensor) -> bool:
    """Whether `t` holds NaN or infinity (e4m3: its one NaN code; integer bytes: never)."""
    if t.dtype == torch.float8_e4m3fn:
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if not t.is_floating_point():
        return False
    return not bool(torch.isfinite(t).all())


def _config_beside(path: Path) -> GriffinConfig:
    data = read_json(path)
    try:
        if "model_type" in data or "hidden_size" in data:
            return GriffinConfig.from_hf_dict(data, source=str(path))
        return GriffinConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _check_tensors(ckpt: Checkpoint, sources: list, layout: dict[str, Rule], params: dict) -> None:
    """The checkpoint has each tensor the config implies, once, in the shape it implies."""
    keys = [s[0] for s in sources]
    present = set(keys)
    if len(present) != len(keys):  # (one tensor in two shards: which one the loader took would be arbitrary)
        twice = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
        raise CheckpointError(f"{ckpt.root}: tensor(s) stored more than once: {', '.join(map(repr, twice[:5]))}")
    allowed_extra = {"lm_head.weight"} if ckpt.format == "hf" else set()
    unexpected = sorted(present - set(layout) - allowed_extra)
    missing = sorted(set(layout) - present)
    where = ", ".join(str(f) for f in ckpt.weight_files[:3]) + (" ..." if len(ckpt.weight_files) > 3 else "")
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s) the config requires, e.g. "
                              f"{', '.join(repr(k) for k in missing[:5])}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) not in a {ckpt.format} RecurrentGemma "
                              f"checkpoint of this config: {', '.join(repr(k) for k in unexpected[:5])}")
    if "lm_head.weight" in present:
        layout["lm_head.weight"] = Rule("embedder.input_embedding")  # tied: shape-checked, then skipped
    config = ckpt.config_file if ckpt.format == "hf" else "inferred from the state dict and hyper-parameters"
    for key, file, _, shape, _ in sources:
        expected = layout[key].source_shape(tuple(params[layout[key].target].shape))
        if shape != expected:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(shape)} but the config "
                                  f"({config}) implies {list(expected)}")
