"""Writing a network as a Hugging Face checkpoint (`Model.save`): the layout
`checkpoint` reads, a quantized network's tensors as stored."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from ..progress import Progress
from .checkpoint import HF_INDEX, HF_SINGLE, QUANT_METHOD, Rule, hf_layout
from .fingerprint import save_metadata
from .griffin import Griffin
from .quantize import quantized_layout, quantized_weight_names


def save_hf(network: Griffin, directory: Path, max_shard_bytes: int = 4 * 1024**3,
            extra_files: Mapping[str, Callable[[str], None] | None] | None = None,
            fingerprint: str | None = None, progress: bool | None = None) -> None:
    """Write `network` as a Hugging Face checkpoint (config.json + safetensors,
    sharded with an index file above `max_shard_bytes`), and `extra_files`
    (name: a writer of that path, or None: no such file); the model's
    `fingerprint`, where its weights as written give another. Every file is
    written under a temporary name first and renamed into place only when
    all are written, config.json last: a failed save leaves the checkpoint
    that was there before. Host memory holds one shard's tensors at a time.
    progress: show a progress line (default: when stderr is a terminal)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    params = dict(network.named_parameters())
    layout = hf_layout(network.config)
    if network.quantization is not None:
        layout = quantized_layout(layout, quantized_weight_names(network), Rule)
    nbytes = {key: math.prod(rule.source_shape(tuple(params[rule.target].shape))) * params[rule.target].element_size()
              for key, rule in layout.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for key in layout:
        if shards[-1] and size + nbytes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes[key]
    meta = {"format": "pt", **(save_metadata(network, fingerprint) if fingerprint else {})}
    bar = Progress(f"saving {directory.name or directory}", sum(nbytes.values()), unit="B", enabled=progress)
    staged: list[tuple[str, Path]] = []  # (temporary path, final path), in commit order

    def stage(name: str, write: Callable[[str], None]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        staged.append((tmp, directory / name))
        write(tmp)

    def write_shard(keys: list[str], path: str) -> None:
        tensors = {}
        for key in keys:
            rule = layout[key]
            t = params[rule.target].detach()
            tensors[key] = rule.to_source(t[rule.index] if rule.index else t).contiguous().cpu()
        save_file(tensors, path, metadata=meta)
        bar.advance(sum(nbytes[k] for k in keys))

    try:
        if len(shards) == 1:
            stage(HF_SINGLE, lambda path: write_shard(shards[0], path))
        else:
            names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
            for name, keys in zip(names, shards):
                stage(name, lambda path, keys=keys: write_shard(keys, path))
            total = sum(p.numel() * p.element_size() for p in network.parameters())
            weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
            index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            stage(HF_INDEX, lambda path: Path(path).write_text(index))
        for name, write in (extra_files or {}).items():
            if write is not None:
                stage(name, write)
        config = json.dumps(_hf_config(network), indent=2)
        stage("config.json", lambda path: Path(path).write_text(config))
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    finals = {final for _, final in staged}
    gone = [p for p in [*directory.glob("model*.safetensors"), directory / HF_INDEX] if p not in finals]
    gone += [directory / name for name, write in (extra_files or {}).items() if write is None]
    for old in gone:  # (another sharding's files, a file the model no longer has)
        old.unlink(missing_ok=True)
    for tmp, final in staged:
        os.replace(tmp, final)


def _hf_config(network: Griffin) -> dict:
    """config.json of a saved network (transformers' keys; the quantization it was saved with)."""
    hf_config = network.config.to_hf_dict()
    hf_config["torch_dtype"] = str(network.dtype).removeprefix("torch.")
    if network.quantization is not None:
        q = network.quantization
        scales = ("per group of input channels of an output channel (group = row length / scale columns), "
                  "float32; two weights a byte, low nibble first, stored + 8") if q.format == "int4" \
            else "per output channel, float32"
        hf_config["quantization_config"] = {"quant_method": QUANT_METHOD, "format": q.format,
                                            "scales": scales, "fingerprint": q.fingerprint}
    return hf_config
