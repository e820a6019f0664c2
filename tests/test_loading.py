"""Loading every checkpoint format through `sg.load`, saving, and the errors
for bad input."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import random_tokens
from reference import hf_model, official_griffin, rel_err
from safetensors.torch import load_file, save_file

import streamgemma as sg
from streamgemma.model.griffin import Griffin


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = sg.GriffinConfig.preset("tiny")
    path = tmp_path_factory.mktemp("hf")
    hf_model(cfg, seed=3).save_pretrained(path)
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def logits_of(model, n=12):
    return model.session().feed(random_tokens(n, model.config.vocab_size, seed=1))


def train_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}"
                                for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "spm"),
                                   vocab_size=vocab_size, byte_fallback=True, minloglevel=2)
    return directory / "spm.model"


# -- formats -------------------------------------------------------------------------------
def test_hf_single_and_sharded_give_the_same_model(hf_dir, tmp_path):
    from transformers import RecurrentGemmaForCausalLM

    single = sg.load(hf_dir)
    sharded_dir = tmp_path / "sharded"
    RecurrentGemmaForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded_dir, max_shard_size="100KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 1
    sharded = sg.load(sharded_dir)
    assert torch.equal(logits_of(single), logits_of(sharded))
    assert single.fingerprint == sharded.fingerprint


def test_official_state_dict_by_file_and_by_directory(tmp_path):
    cfg = sg.GriffinConfig.preset("tiny")
    torch.save(official_griffin(cfg, seed=4).state_dict(), tmp_path / "tiny.pt")
    by_file = sg.load(tmp_path / "tiny.pt", config=cfg)
    by_dir = sg.load(tmp_path, config=cfg)
    assert by_file.config == cfg
    assert torch.equal(logits_of(by_file), logits_of(by_dir))


def test_official_state_dict_with_config_json_beside_it(tmp_path):
    cfg = sg.GriffinConfig.preset("tiny")
    torch.save(official_griffin(cfg, seed=4).state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert sg.load(tmp_path / "tiny.pt").config == cfg


@pytest.mark.parametrize("name", ["recurrentgemma-2b", "recurrentgemma-9b", "griffin-7b", "hawk-7b"])
def test_config_inferred_from_official_shapes_and_hf_json(name):
    cfg = sg.GriffinConfig.preset(name)
    shapes = {k: tuple(p.shape) for k, p in Griffin(cfg, device="meta").named_parameters()}
    assert sg.GriffinConfig.from_official_shapes(shapes) == cfg
    assert sg.GriffinConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    assert cfg.matching_preset() == name


def test_preset_parameter_counts():
    for name, count in (("recurrentgemma-2b", 2_682_862_080), ("recurrentgemma-9b", 8_579_977_216)):
        cfg = sg.GriffinConfig.preset(name)
        assert sum(p.numel() for p in Griffin(cfg, device="meta").parameters()) == count
        assert cfg.num_parameters() == count


def test_save_load_round_trip_with_tokenizer_and_shards(tmp_path):
    tok = sg.Tokenizer.from_file(train_tokenizer(tmp_path))
    model = sg.Model.random(sg.GriffinConfig.preset("tiny", vocab_size=512), seed=5, tokenizer=tok)
    model.save(tmp_path / "one")
    model.save(tmp_path / "many", max_shard_bytes=40_000)
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 1
    for d in ("one", "many"):
        loaded = sg.load(tmp_path / d)
        assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == tok.vocab_size
        assert torch.equal(logits_of(loaded), logits_of(model))
        assert loaded.fingerprint == model.fingerprint
    text = "the lazy dog"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    s = loaded.session()
    s.feed(text)  # text input works once a tokenizer is present; BOS is added at position 0
    assert s.position == len(tok.encode(text)) + 1


def test_a_sharded_save_holds_one_shard_in_host_memory_and_shows_progress(tmp_path, monkeypatch, capsys):
    """Every shard's tensors were copied to host memory before the first was written (a 9B model
    on a GPU: 17 GB of host memory at once), and a long save showed nothing."""
    import safetensors.torch

    from streamgemma.model.checkpoint import Rule

    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=5, dtype="float32")
    copied, written, real_save, real_copy = [0], [], safetensors.torch.save_file, Rule.to_source

    def save_file(tensors, path, metadata=None):
        written.append((len(tensors), copied[0]))  # (tensors in the shard, copies made so far)
        copied[0] = 0
        real_save(tensors, path, metadata=metadata)

    def to_source(rule, t):
        copied[0] += 1
        return real_copy(rule, t)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(Rule, "to_source", to_source)
    model.save(tmp_path / "many", max_shard_bytes=40_000, progress=True)
    assert len(written) > 1 and all(n == made for n, made in written), written
    err = capsys.readouterr().err
    assert "saving many: 100%" in err and err.endswith("\n")
    assert torch.equal(logits_of(sg.load(tmp_path / "many", progress=False)), logits_of(model))
    model.save(tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_dtype_and_fingerprint(hf_dir):
    f32 = sg.load(hf_dir, dtype="float32")
    bf16 = sg.load(hf_dir, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.network.blocks[0].recurrent_block.linear_x.weight.dtype == torch.bfloat16
    assert f32.fingerprint == bf16.fingerprint  # same weights, whatever the dtype
    other = sg.Model.random(f32.config, seed=99)
    assert other.fingerprint != f32.fingerprint
    assert rel_err(logits_of(bf16), logits_of(f32)) < 5e-2


def test_progress_line(hf_dir, capsys):
    sg.load(hf_dir, progress=True)
    err = capsys.readouterr().err
    assert "loading" in err and "100%" in err


# -- bad input ---------------------------------------------------------------------------
def error_of(fn, *args, kind=sg.CheckpointError, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_missing_and_unknown_paths(tmp_path):
    assert "no such file" in error_of(sg.load, tmp_path / "nope")
    assert "no checkpoint found" in error_of(sg.load, tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x" * 10)
    assert "unknown checkpoint format" in error_of(sg.load, tmp_path / "weights.bin")
    (tmp_path / "config.json").write_text("{}")
    assert "no model.safetensors" in error_of(sg.load, tmp_path)


def test_hf_missing_and_unexpected_keys(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    d = copy_dir(hf_dir, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.temporal_block.k_proj.weight"},
              d / "model.safetensors")
    msg = error_of(sg.load, d)
    assert "missing" in msg and "model.layers.2.temporal_block.k_proj.weight" in msg and "model.safetensors" in msg
    d = copy_dir(hf_dir, tmp_path / "extra")
    save_file({**tensors, "model.layers.0.surprise.weight": torch.zeros(2)}, d / "model.safetensors")
    assert "model.layers.0.surprise.weight" in error_of(sg.load, d)


def test_config_contradicting_the_weights(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 2 * 100
    (d / "config.json").write_text(json.dumps(cfg))
    msg = error_of(sg.load, d)
    assert "model.layers.0.mlp_block" in msg and "100" in msg and "config.json" in msg
    cfg = sg.GriffinConfig.preset("tiny")
    torch.save(official_griffin(cfg).state_dict(), tmp_path / "tiny.pt")
    msg = error_of(sg.load, tmp_path / "tiny.pt", config=cfg.replace(mlp_width=100))
    assert "mlp_width=192" in msg and "expected 100" in msg


def test_bad_config_json(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "j")
    (d / "config.json").write_text("{not json")
    assert "config.json" in error_of(sg.load, d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert "model_type" in error_of(sg.load, d)
    (d / "config.json").write_text(json.dumps({"model_type": "recurrent_gemma", "hidden_size": 64}))
    assert "missing field" in error_of(sg.load, d)


def test_corrupt_and_truncated_files(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "safetensors" in error_of(sg.load, d)
    cfg = sg.GriffinConfig.preset("tiny")
    torch.save(official_griffin(cfg).state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "cut.pt" in error_of(sg.load, tmp_path / "cut" / "cut.pt", config=cfg)


def test_missing_shard(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "s")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    assert "model-00001-of-00002.safetensors" in error_of(sg.load, d)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_execute(tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    torch.save({"embedder.input_embedding": torch.zeros(2, 2), "evil": payload}, tmp_path / "evil.pt")
    msg = error_of(sg.load, tmp_path / "evil.pt")
    assert "evil.pt" in msg and "refused" in msg
    assert not payload.marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    assert "state dict" in error_of(sg.load, tmp_path / "list.pt")
    torch.save({"embedder.input_embedding": torch.zeros(4, 4)}, tmp_path / "partial.pt")
    assert "blocks.0" in error_of(sg.load, tmp_path / "partial.pt")


def test_integer_weights_rejected(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "int")
    tensors = load_file(d / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors["model.final_norm.weight"].to(torch.int32)
    save_file(tensors, d / "model.safetensors")
    assert "model.final_norm.weight" in error_of(sg.load, d)


def test_tokenizer_larger_than_vocabulary(tmp_path):
    tok_path = train_tokenizer(tmp_path, vocab_size=300)  # more pieces than tiny's 256 ids
    cfg = sg.GriffinConfig.preset("tiny")  # 256 entries
    sg.Model.random(cfg).save(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.model").write_bytes(tok_path.read_bytes())
    assert "300 pieces" in error_of(sg.load, tmp_path / "m")


def test_bad_device_and_dtype(hf_dir):
    assert "int8" in error_of(sg.load, hf_dir, dtype="int8", kind=sg.DeviceError)
    assert "unknown device" in error_of(sg.load, hf_dir, device="warp-drive", kind=sg.DeviceError)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in error_of(sg.load, hf_dir, device="cuda", kind=sg.DeviceError)


def test_bad_config_values():
    with pytest.raises(sg.ConfigError, match="num_heads"):
        sg.GriffinConfig.preset("tiny", num_heads=3)
    with pytest.raises(sg.ConfigError, match="block_types"):
        sg.GriffinConfig.preset("tiny", block_types=("recurrent", "mamba"))
    with pytest.raises(sg.ConfigError, match="unknown preset"):
        sg.GriffinConfig.preset("gemma-7b")


def test_bad_session_input():
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"))
    s = model.session()
    with pytest.raises(ValueError, match="256"):
        s.step(256)
    with pytest.raises(ValueError, match="-1"):
        s.step(-1)
    with pytest.raises(TypeError, match="1.5"):
        s.step(1.5)
    with pytest.raises(ValueError, match="no tokens"):
        s.feed([])
    with pytest.raises(ValueError, match="tokenizer"):
        s.feed("hello")
    assert s.position == 0  # nothing was consumed by the failed calls
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.step(1)


def test_pool_grows_and_sessions_stay_independent():
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"))
    tokens = random_tokens(10, 256, seed=2)
    ref = model.session().feed(tokens)
    sessions = [model.session() for _ in range(5)]
    for i, s in enumerate(sessions):
        s.feed(random_tokens(3 + i, 256, seed=10 + i))
    late = model.session()
    assert torch.equal(late.feed(tokens), ref)
    assert model.pool.capacity >= 7


def test_fingerprint_sample_indices_stay_in_range_for_huge_tensors():
    from streamgemma.model.fingerprint import sample_indices

    for numel in (1, 2, 63, 64, 65, 1000, 2**24 + 1, 256_000 * 2560):
        idx = sample_indices(numel, 64)
        assert idx.numel() == min(64, numel)
        assert idx[0] == 0 and idx[-1] == numel - 1
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx.max()) < numel


# -- torch threads (issue #22, item 1; the figures: bench/RESULTS.md, "CPU threads") ----------------
def test_default_threads_one_for_small_models_and_never_every_cpu(monkeypatch):
    from streamgemma.session import model as model_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert model_module.default_threads(5_858_560) == 1  # the demo model
    assert model_module.default_threads(71_000_000) == 7
    assert model_module.default_threads(2_683_000_000) == 15  # all CPUs but one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert model_module.default_threads(2_683_000_000) == 1


def test_load_sets_torch_threads_unless_omp_num_threads_is_set(monkeypatch, hf_dir):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    sg.load(hf_dir, device="cpu")
    sg.load(hf_dir, device="cpu", threads=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    sg.load(hf_dir, device="cpu")  # the user chose: left alone
    assert calls == [1, 2]
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        sg.load(hf_dir, threads=0)


def test_a_checkpoint_with_nan_values_is_refused(tmp_path):
    """A damaged download (bytes overwritten) can hold NaN weights: refused at load, naming the tensor,
    instead of a model that generates nothing but pad tokens."""
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0)
    with torch.no_grad():
        next(p for name, p in model.network.named_parameters() if "proj_v" in name).view(-1)[3] = float("nan")
    model.save(tmp_path / "damaged")
    with pytest.raises(sg.CheckpointError, match="v_proj.weight. holds NaN or infinite values"):
        sg.load(tmp_path / "damaged")


# -- damaged, mistyped and interrupted quantized saves (a review's findings) -------------------
TINY = sg.GriffinConfig.preset("tiny")
K = "model.layers.0.temporal_block.linear_x.weight"


def test_fp8_save_with_nan_weight_is_refused(tmp_path):
    sg.Model.random(TINY, device="cpu", quantize="fp8").save(tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    w = t[K].view(torch.uint8).clone()
    w[0, 0] = 0x7F  # e4m3fn NaN
    t[K] = w.view(torch.float8_e4m3fn)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(sg.CheckpointError, match="NaN"):
        sg.load(tmp_path, device="cpu")


def test_quantization_config_format_of_wrong_type_is_a_checkpoint_error(tmp_path):
    sg.Model.random(TINY, device="cpu", quantize="int8").save(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c["quantization_config"]["format"] = ["int8"]
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(sg.CheckpointError, match="format"):
        sg.load(tmp_path, device="cpu")


def test_unhashable_quantize_argument_is_a_value_error():
    with pytest.raises(ValueError, match="unknown quantization"):
        sg.Model.random(TINY, device="cpu", quantize=["int8"])


def test_bad_quantize_is_refused_before_downloading_a_hub_model(monkeypatch):
    from streamgemma.model import hub

    def download(model_id):
        raise AssertionError(f"downloaded {model_id} before validating quantize=")

    monkeypatch.setattr(hub, "download", download)
    with pytest.raises(ValueError, match="unknown quantization"):
        sg.load("google/recurrentgemma-2b-it", device="cpu", quantize="nf4")


def test_save_without_a_tokenizer_leaves_no_stale_tokenizer(tmp_path):
    sg.load("demo", device="cpu", quantize="int8").save(tmp_path)
    sg.Model.random(TINY, device="cpu").save(tmp_path)
    back = sg.load(tmp_path, device="cpu")
    assert back.tokenizer is None


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    old = sg.Model.random(TINY, seed=0, device="cpu", quantize="int8")
    old.save(tmp_path)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        sg.Model.random(TINY, seed=1, device="cpu", quantize="int8").save(tmp_path)
    monkeypatch.undo()
    assert sg.load(tmp_path, device="cpu").fingerprint == old.fingerprint


def test_save_interrupted_before_config_does_not_give_new_weights_the_old_fingerprint(tmp_path, monkeypatch):
    old = sg.Model.random(TINY, seed=0, device="cpu", quantize="int8")
    old.save(tmp_path)
    new = sg.Model.random(TINY, seed=1, device="cpu", quantize="int8")

    def killed(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sg.GriffinConfig, "to_hf_dict", killed)  # any failure between the weights and config.json
    with pytest.raises(OSError):
        new.save(tmp_path)
    monkeypatch.undo()
    back = sg.load(tmp_path, device="cpu")
    same_weights = torch.equal(back.network.embedder.input_embedding, new.network.embedder.input_embedding)
    assert not (same_weights and back.fingerprint == old.fingerprint)


def test_int4_save_with_edited_width_is_a_checkpoint_error(tmp_path):
    sg.Model.random(TINY, device="cpu", quantize="int4").save(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c["lru_width"] = 48
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(sg.CheckpointError):
        sg.load(tmp_path, device="cpu")


def test_a_float16_model_keeps_the_checkpoints_fingerprint():
    """float16 rounds some values differently than bfloat16 does (and flushes the smallest), so the
    digest of a float16 network's own values differed: snapshots of the same checkpoint were refused.
    The digest is now of the weights before the cast, loaded or drawn, quantized or not."""
    f32 = sg.load("demo", device="cpu", dtype="float32")
    for model in (sg.load("demo", device="cpu", dtype="float16"),
                  sg.load("demo", device="cpu", dtype="float16", quantize="int8")):
        assert model.fingerprint == f32.fingerprint
    with f32.session() as s:
        s.feed("Portable state")
        blob = s.snapshot()
    with sg.load("demo", device="cpu", dtype="float16", quantize="int8").restore(blob) as restored:
        assert restored.position == s.position
    plain = sg.Model.random(TINY, device="cpu", dtype="float32").fingerprint
    for kwargs in ({}, {"quantize": "int8"}):
        assert sg.Model.random(TINY, device="cpu", dtype="float16", **kwargs).fingerprint == plain
