"""Griffin / RecurrentGemma hyper-parameters, presets, and conversion from the
config formats found next to real checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_KINDS = (RECURRENT, ATTENTION)


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """Block kinds (recurrent, recurrent, attention) repeated over `num_layers`."""
    return tuple(ATTENTION if i % 3 == 2 else RECURRENT for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    """Architecture of a Griffin / Hawk / RecurrentGemma model.

    All fields are plain Python values so a config round-trips through JSON
    (it is part of a model's fingerprint).
    """

    vocab_size: int
    width: int
    mlp_width: int  # hidden width of the GeGLU MLP (3 x width in the presets)
    num_heads: int  # attention heads, and blocks of the RG-LRU gates
    lru_width: int
    block_types: tuple[str, ...]
    attention_window: int = 2048  # previous tokens a query sees (it sees window + 1 keys)
    logits_soft_cap: float = 30.0  # 0 disables the cap
    embeddings_scale_by_sqrt_dim: bool = True
    conv_width: int = 4
    rms_norm_eps: float = 1e-6
    rope_base: float = 10_000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_types", tuple(self.block_types))
        for name in ("vocab_size", "width", "mlp_width", "num_heads", "lru_width",
                     "attention_window", "conv_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if not self.block_types:
            raise ConfigError("config field 'block_types' is empty: a model needs at least one block")
        bad = [b for b in self.block_types if b not in BLOCK_KINDS]
        if bad:
            raise ConfigError(f"config field 'block_types' has unknown kinds {sorted(set(bad))}; "
                              f"expected {BLOCK_KINDS}")
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.lru_width % self.num_heads:
            raise ConfigError(f"lru_width {self.lru_width} is not divisible by num_heads {self.num_heads}")
        if ATTENTION in self.block_types and self.head_dim % 4:
            # RoPE rotates the first half of each head in two halves.
            raise ConfigError(f"head_dim {self.head_dim} must be a multiple of 4 for partial RoPE")
        for name, least, strict in (("logits_soft_cap", 0.0, False), ("rms_norm_eps", 0.0, True),
                                    ("rope_base", 0.0, True)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value) \
                    or value < least or (strict and value == least):
                raise ConfigError(f"config field {name!r} must be a finite number {'>' if strict else '>='} "
                                  f"{least:g}, got {value!r}")
            object.__setattr__(self, name, float(value))  # (JSON reads 0 back as 0.0: one fingerprint)
        if not isinstance(self.embeddings_scale_by_sqrt_dim, bool):
            raise ConfigError(f"config field 'embeddings_scale_by_sqrt_dim' must be True or False, "
                              f"got {self.embeddings_scale_by_sqrt_dim!r}")

    # -- derived ---------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.block_types) if b == ATTENTION)

    def num_parameters(self) -> int:
        """Parameter count (the LM head is tied to the embedding, counted once)."""
        d, e, l, h = self.width, self.mlp_width, self.lru_width, self.num_heads
        norms_mlp = 2 * d + (2 * d * e + 2 * e) + (e * d + d)
        recurrent = 2 * (d * l + l) + (l * d + d)  # linear_x, linear_y, linear_out
        recurrent += self.conv_width * l + l + l  # conv w, conv b, a_param
        recurrent += 2 * (l * l // h + l)  # two block-diagonal gates
        attention = d * d + 2 * d * self.head_dim + d * d + d
        total = self.vocab_size * d + d  # embedding, final norm
        for kind in self.block_types:
            total += norms_mlp + (recurrent if kind == RECURRENT else attention)
        return total

    # -- presets ---------------------------------------------------------------
    @staticmethod
    def presets() -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GriffinConfig:
        """A named preset: recurrentgemma-2b, recurrentgemma-9b, griffin-7b, hawk-7b, tiny."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}")
        fields = dict(_PRESETS[name])
        fields.update(overrides)
        return cls(**fields)

    def matching_preset(self) -> str | None:
        """The name of the preset this config equals, if any (vocab size aside)."""
        for name in _PRESETS:
            if self.replace(vocab_size=_PRESETS[name]["vocab_size"]) == self.preset(name):
                return name
        return None

    def replace(self, **changes: Any) -> GriffinConfig:
        return dataclasses.replace(self, **changes)

    # -- serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_types"] = list(self.block_types)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GriffinConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"incomplete config: missing fields {missing}")
        try:
            return cls(**d)
        except TypeError as e:  # (a field of the wrong type that a check compared)
            raise ConfigError(f"bad config field: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers' RecurrentGemmaForCausalLM reads.

        transformers always scales embeddings and soft-caps logits; the two
        `streamgemma_*` keys record presets (Griffin/Hawk 7B) where we do not,
        which transformers ignores.
        """
        return {
            "architectures": ["RecurrentGemmaForCausalLM"],
            "model_type": "recurrent_gemma",
            "vocab_size": self.vocab_size,
            "hidden_size": self.width,
            "intermediate_size": 2 * self.mlp_width,  # transformers halves it per projection
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "lru_width": self.lru_width,
            "num_hidden_layers": self.num_layers,
            "block_types": list(self.block_types),
            "attention_window_size": self.attention_window,
            "conv1d_width": self.conv_width,
            "logits_soft_cap": self.logits_soft_cap,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_base,
            "partial_rotary_factor": 0.5,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "tie_word_embeddings": True,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "streamgemma_embeddings_scale_by_sqrt_dim": self.embeddings_scale_by_sqrt_dim,
            "streamgemma_logits_soft_cap": self.logits_soft_cap,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> GriffinConfig:
        """Build from a Hugging Face RecurrentGemma `config.json` mapping."""
        try:
            return cls._from_hf_dict(d, source)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type (null, a string, ...)
            raise ConfigError(f"{source}: bad field value: {e}") from None

    @classmethod
    def _from_hf_dict(cls, d: Mapping[str, Any], source: str) -> GriffinConfig:
        model_type = d.get("model_type")
        if model_type not in (None, "recurrent_gemma"):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'recurrent_gemma'")
        try:
            width = int(d["hidden_size"])
            num_layers = int(d["num_hidden_layers"])
            num_heads = int(d["num_attention_heads"])
            vocab = int(d["vocab_size"])
            intermediate = int(d["intermediate_size"])
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad field value: {e}") from None
        if d.get("tie_word_embeddings", True) is False:
            raise ConfigError(f"{source}: tie_word_embeddings is false; RecurrentGemma's LM head is its embedding "
                              "(an untied lm_head is not supported)")
        kv_heads = d.get("num_key_value_heads", 1)
        if kv_heads not in (None, 1):
            raise ConfigError(f"{source}: num_key_value_heads is {kv_heads}; Griffin attention is "
                              "multi-query (1 key/value head)")
        if d.get("attention_bias", False):
            raise ConfigError(f"{source}: attention_bias is true; Griffin attention has no q/k/v bias")
        if num_heads <= 0:
            raise ConfigError(f"{source}: num_attention_heads must be positive, got {num_heads}")
        head_dim = d.get("head_dim")
        if head_dim is not None and int(head_dim) != width // num_heads:
            raise ConfigError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads "
                              f"({width // num_heads})")
        pattern = [str(b) for b in d.get("block_types", ["recurrent", "recurrent", "attention"])]
        if not pattern:
            raise ConfigError(f"{source}: block_types is empty")
        rope = d.get("rope_parameters") or {}
        rope_base = float(d.get("rope_theta", rope.get("rope_theta", 10_000.0)))
        partial = float(d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5)))
        if partial != 0.5:
            raise ConfigError(f"{source}: partial_rotary_factor {partial} is not supported (Griffin uses 0.5)")
        cap = d.get("streamgemma_logits_soft_cap", d.get("logits_soft_cap", 30.0))
        try:
            return cls(
                vocab_size=vocab,
                width=width,
                mlp_width=intermediate // 2,
                num_heads=num_heads,
                lru_width=int(d.get("lru_width") or width),
                block_types=_repeat(tuple(pattern), num_layers),
                attention_window=int(d.get("attention_window_size", 2048)),
                logits_soft_cap=float(cap or 0.0),
                embeddings_scale_by_sqrt_dim=d.get("streamgemma_embeddings_scale_by_sqrt_dim", True),
                conv_width=int(d.get("conv1d_width", 4)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_base=rope_base,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_official_shapes(cls, shapes: Mapping[str, tuple[int, ...]], source: str = "state dict",
                             **hypers: Any) -> GriffinConfig:
        """Infer the config of an official (Kaggle) PyTorch state dict from its shapes.

        Shapes do not carry the window, the soft cap or the embedding scaling:
        they come from `hypers`, else from the preset whose shapes match, else
        the RecurrentGemma defaults.
        """
        try:
            vocab, width = shapes["embedder.input_embedding"]
            _, _, mlp_width = shapes["blocks.0.mlp_block.ffw_up.w"]
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r}; is this an official "
                              "RecurrentGemma state dict?") from None
        except ValueError:
            raise ConfigError(f"{source}: unexpected shape for the embedding or blocks.0.mlp_block.ffw_up.w") from None
        block_types, num_heads, lru_width, head_dim = [], None, width, None
        i = 0
        while f"blocks.{i}.channel_pre_norm.scale" in shapes:
            gate = shapes.get(f"blocks.{i}.recurrent_block.rg_lru.a_gate.w")
            k_proj = shapes.get(f"blocks.{i}.attention_block.proj_k.weight")
            if (gate is not None and len(gate) != 3) or (gate is None and k_proj is not None and len(k_proj) != 2):
                name, shape = (("recurrent_block.rg_lru.a_gate.w", gate) if gate is not None
                               else ("attention_block.proj_k.weight", k_proj))
                raise ConfigError(f"{source}: unexpected shape {list(shape)} for 'blocks.{i}.{name}'")
            if gate is not None:
                block_types.append(RECURRENT)
                num_heads, block_width, _ = gate
                lru_width = num_heads * block_width
            elif k_proj is not None:
                block_types.append(ATTENTION)
                head_dim = k_proj[0]
            else:
                raise ConfigError(f"{source}: block {i} is neither recurrent nor attention "
                                  f"(no 'blocks.{i}.recurrent_block.rg_lru.a_gate.w' or "
                                  f"'blocks.{i}.attention_block.proj_k.weight')")
            i += 1
        if not block_types:
            raise ConfigError(f"{source}: no 'blocks.N.channel_pre_norm.scale' keys found")
        if head_dim is not None:
            attn_heads = width // head_dim
            if num_heads is not None and num_heads != attn_heads:
                raise ConfigError(f"{source}: RG-LRU gates have {num_heads} blocks but attention has "
                                  f"{attn_heads} heads; Griffin uses one number for both")
            num_heads = attn_heads
        fields = dict(vocab_size=vocab, width=width, mlp_width=mlp_width, num_heads=num_heads,
                      lru_width=lru_width, block_types=tuple(block_types))
        defaults = {}
        for name in _PRESETS:
            preset = cls.preset(name)
            if name != "tiny" and all(getattr(preset, k) == v for k, v in fields.items() if k != "vocab_size"):
                defaults = {k: getattr(preset, k) for k in ("attention_window", "logits_soft_cap",
                                                            "embeddings_scale_by_sqrt_dim")}
                break
        defaults.update(hypers)
        try:
            return cls(**fields, **defaults)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _repeat(pattern: tuple[str, ...], n: int) -> tuple[str, ...]:
    return tuple(pattern[i % len(pattern)] for i in range(n))


_PRESETS: dict[str, dict[str, Any]] = {
    "recurrentgemma-2b": dict(vocab_size=256_000, width=2560, mlp_width=3 * 2560, num_heads=10,
                              lru_width=2560, block_types=griffin_pattern(26)),
    "recurrentgemma-9b": dict(vocab_size=256_000, width=4096, mlp_width=3 * 4096, num_heads=16,
                              lru_width=4096, block_types=griffin_pattern(38)),
    "griffin-7b": dict(vocab_size=256_000, width=4096, mlp_width=3 * 4096, num_heads=32, lru_width=5632,
                       block_types=griffin_pattern(32), attention_window=1024, logits_soft_cap=0.0,
                       embeddings_scale_by_sqrt_dim=False),
    "hawk-7b": dict(vocab_size=256_000, width=4096, mlp_width=3 * 4096, num_heads=32, lru_width=5632,
                    block_types=(RECURRENT,) * 32, attention_window=1024, logits_soft_cap=0.0,
                    embeddings_scale_by_sqrt_dim=False),
    # Small enough for CPU tests; a window of 8 makes the attention ring wrap quickly.
    "tiny": dict(vocab_size=256, width=64, mlp_width=192, num_heads=2, lru_width=64,
                 block_types=griffin_pattern(6), attention_window=8),
}


def _finite(value: int | float) -> bool:
    """Whether `value` is a finite float (an int too large for one is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
