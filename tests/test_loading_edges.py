"""Loading at its edges: malformed config fields and official shapes, shard indexes that point outside the
directory or name a tensor twice, an untied LM head (each found by a review)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streamgemma as sg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32").save(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# 1. a malformed config.json field gives a bare ValueError/TypeError/AttributeError
@pytest.mark.parametrize("field,value", [
    ("attention_window_size", None), ("attention_window_size", "x"), ("conv1d_width", None),
    ("rms_norm_eps", "x"), ("rope_theta", None), ("head_dim", "abc"), ("block_types", 5),
    ("rope_parameters", [1]), ("streamgemma_logits_soft_cap", "abc"), ("lru_width", "x"),
    ("partial_rotary_factor", None),
])
def test_malformed_config_field_is_a_checkpoint_error(saved, tmp_path, field, value):
    d = _copy(saved, tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(sg.CheckpointError, match="config.json"):
        sg.load(d, progress=False)


# 2. an official state dict with a malformed shape gives a bare ValueError/IndexError
@pytest.mark.parametrize("key,shape", [
    ("blocks.0.recurrent_block.rg_lru.a_gate.w", (4, 4)),
    ("blocks.2.attention_block.proj_k.weight", ()),
])
def test_malformed_official_shape_is_a_checkpoint_error(tmp_path, key, shape):
    model = sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu", dtype="float32")
    sd = dict(model.network.state_dict())
    sd[key] = torch.zeros(shape)
    torch.save(sd, tmp_path / "tiny.pt")
    with pytest.raises(sg.CheckpointError, match="tiny.pt"):
        sg.load(tmp_path / "tiny.pt", progress=False)


# 3. a shard index may point outside the checkpoint directory (relative or absolute path)
@pytest.mark.parametrize("absolute", [False, True])
def test_index_cannot_point_outside_the_directory(saved, tmp_path, absolute):
    outside = tmp_path / "outside"
    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=7, device="cpu", dtype="float32").save(outside)
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(saved / "config.json", d / "config.json")
    shard = str(outside / "model.safetensors") if absolute else "../outside/model.safetensors"
    keys = load_file(outside / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))
    with pytest.raises(sg.CheckpointError, match="index"):
        sg.load(d, progress=False)  # today: loads the other directory's weights silently


# 4. a non-string shard name in the index is a bare TypeError
def test_index_with_non_string_shard_name_is_a_checkpoint_error(saved, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(saved / "config.json", d / "config.json")
    keys = load_file(saved / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: 5 for k in keys}}))
    with pytest.raises(sg.CheckpointError, match="index"):
        sg.load(d, progress=False)


# 5. a tensor present in two shards: the one the index does NOT name silently wins
def test_index_decides_which_shard_a_tensor_comes_from(saved, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(saved / "config.json", d / "config.json")
    sd = load_file(saved / "model.safetensors")
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file(sd, str(d / one))
    save_file({"model.final_norm.weight": torch.full_like(sd["model.final_norm.weight"], 5.0)}, str(d / two))
    weight_map = {k: one for k in sd}
    weight_map["model.layers.0.mlp_block.down_proj.bias"] = two  # (so the index lists shard 2)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        model = sg.load(d, progress=False)
    except sg.CheckpointError:
        return  # refusing the contradiction is fine too
    assert torch.equal(model.network.final_norm.scale, sd["model.final_norm.weight"])  # the index's shard


# 7. an untied lm_head (config says tie_word_embeddings: false) is silently dropped
def test_untied_lm_head_is_not_silently_ignored(saved, tmp_path):
    d = _copy(saved, tmp_path / "ckpt")
    sd = load_file(d / "model.safetensors")
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(sg.CheckpointError, match="lm_head"):
        sg.load(d, progress=False)  # today: loads, logits use the embedding, fingerprint unchanged


def test_a_float16_save_loads_with_the_fingerprint_of_the_weights_it_was_cast_from(tmp_path):
    """A float16 model's fingerprint is taken before the cast; its save was fingerprinted from the float16 file,
    so the reloaded model refused the original's snapshots. The save now records the model's fingerprint beside
    the file's own, which stands only while the weights are the ones written."""
    source = tmp_path / "source"
    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=1, device="cpu", dtype="float32").save(source)
    half = sg.load(source, dtype="float16", progress=False)
    half.save(tmp_path / "half")
    again = sg.load(tmp_path / "half", dtype="float16", progress=False)
    assert again.fingerprint == half.fingerprint == sg.load(source, progress=False).fingerprint
    session = half.session()
    session.feed([1, 2, 3])
    again.restore(session.snapshot())  # (SnapshotModelMismatch before)
    # weights edited after the save: their own fingerprint, not the recorded one
    file = tmp_path / "half" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(file)
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[name][0, 0] += 1.0  # (the first element is always among the sampled)
    save_file(tensors, file, metadata=metadata)
    edited = sg.load(tmp_path / "half", dtype="float16", progress=False)
    assert edited.fingerprint not in (half.fingerprint, again.fingerprint)


def test_a_float16_model_changed_after_its_cast_saves_no_claim_to_the_old_fingerprint(tmp_path):
    source = tmp_path / "source"
    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=1, device="cpu", dtype="float32").save(source)
    for dtype in ("float16", "float32"):
        model = sg.load(source, dtype=dtype, progress=False)
        snapshot = model.session().snapshot()
        with torch.no_grad():
            for p in model.network.parameters():
                p.mul_(1.5)  # other weights now (e.g. tuned in place)
        model.save(tmp_path / dtype)
        reloaded = sg.load(tmp_path / dtype, dtype=dtype, progress=False)
        assert reloaded.fingerprint != model.fingerprint
        with pytest.raises(sg.SnapshotModelMismatch):
            reloaded.restore(snapshot)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_float16_save_loaded_in_another_dtype_and_saved_again_keeps_the_fingerprint(tmp_path, dtype):
    """The model loaded from the float16 save had the original's fingerprint; its own save recorded none (only a
    float16 model's did), so the next load had another, and refused the snapshots of both."""
    source = tmp_path / "source"
    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=1, device="cpu", dtype="float32").save(source)
    sg.load(source, dtype="float16", progress=False).save(tmp_path / "half")
    widened = sg.load(tmp_path / "half", dtype=dtype, progress=False)
    widened.save(tmp_path / "again")
    again = sg.load(tmp_path / "again", dtype=dtype, progress=False)
    assert again.fingerprint == widened.fingerprint == sg.load(source, progress=False).fingerprint
    session = widened.session()
    session.feed([1, 2, 3])
    again.restore(session.snapshot())


def test_a_config_given_ints_for_its_float_fields_keeps_its_fingerprint_through_a_save(tmp_path):
    """JSON wrote 0 and read back 0.0: equal configs, other fingerprints, and the reloaded model refused the
    snapshots of the one saved ("different weights")."""
    config = sg.GriffinConfig.preset("tiny", logits_soft_cap=0, rope_base=10000, rms_norm_eps=1)
    assert isinstance(config.logits_soft_cap, float)
    model = sg.Model.random(config, seed=0, device="cpu")
    model.save(tmp_path / "m")
    again = sg.load(tmp_path / "m", progress=False)
    assert again.fingerprint == model.fingerprint


def test_an_index_that_lists_no_shards_is_a_checkpoint_error(tmp_path):
    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu").save(tmp_path, max_shard_bytes=20000)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(sg.CheckpointError, match="no shard files"):  # (a bare IndexError before)
        sg.load(tmp_path, progress=False)


def test_a_value_beyond_float16_names_the_cast_not_a_damaged_file(tmp_path):
    sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0, device="cpu").save(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.final_norm.weight"][0] = 1e5  # finite in float32, not in float16
    save_file(tensors, tmp_path / "model.safetensors")
    sg.load(tmp_path, dtype="float32", progress=False)
    with pytest.raises(sg.CheckpointError, match="beyond the range of torch.float16"):  # ("damaged" before)
        sg.load(tmp_path, dtype="float16", progress=False)


# a corrupt config.json asking for a vocabulary of 10**13 rows: the loader allocated it first (an allocator
# traceback); the tensors' shapes are checked against it before anything is allocated
def test_a_config_far_larger_than_its_tensors_is_refused_before_allocating(saved, tmp_path):
    d = _copy(saved, tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 10**13
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(sg.CheckpointError, match=r"implies \[10000000000000, "):
        sg.load(d, progress=False)
