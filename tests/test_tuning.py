"""KernelConfig: one immutable value instead of tuning globals."""

import dataclasses

import pytest

import streamgemma as sg


def test_defaults_leave_every_choice_to_the_kernels():
    config = sg.KernelConfig()
    assert config.gemv_max_batch == 1 and config.pdl is None and config.rglru_launch is None
    assert config.prefill_attention == "triton" and config.prefill_attention_tiles is None
    assert config.gemv_block(1, "plain", 2560, 2560) is None and config.attention_block(1) is None


def test_a_config_is_immutable_and_compares_by_value():
    blocks = {(1, "plain", 256, 128): (8, 256, 4)}
    config = sg.KernelConfig(gemv_blocks=blocks, attention_blocks={4: 32})
    blocks[(1, "plain", 256, 128)] = (4, 128, 4)  # the caller's dict is copied
    assert config.gemv_block(1, "plain", 256, 128) == (8, 256, 4)
    assert config.gemv_block(3, "plain", 256, 128) is None  # batch 3 is bucket 4
    with pytest.raises(TypeError):
        config.gemv_blocks[(1, "plain", 1, 1)] = (1, 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pdl = False
    again = sg.KernelConfig(gemv_blocks={(1, "plain", 256, 128): (8, 256, 4)}, attention_blocks={4: 32})
    assert config == again and hash(config) == hash(again)


@pytest.mark.parametrize("bad", [dict(gemv_max_batch=-1), dict(gemv_blocks={(3, "plain", 1, 1): (8, 8, 4)}),
                                 dict(gemv_blocks={(1, "fused", 1, 1): (8, 8, 4)}),
                                 dict(gemv_blocks={(1, "plain", 1, 1): (6, 8, 4)}),
                                 dict(gemv_blocks={(1, "plain", 1, 1): (8, 16, 4, "tc")}),  # BN < 16
                                 dict(gemv_blocks={(1, "plain", 1, 1): (16, 16, 4, "mma")}),
                                 dict(gemv_blocks={(1, "plain", 1, 1): (16, 16, 4, "tc", 0)}),  # no stages
                                 dict(gemv_blocks={(1, "plain", 1, 1): (16, 16, 4, "tc", 3, 0)}),  # no splits
                                 dict(gemv_blocks={(1, "plain", 1, 1): (16, 16, 4, "tc", 3, 2, 1)}),
                                 dict(gemv_blocks={(1, "plain", 1, 1, "int2"): (8, 8, 4)}),
                                 dict(gemv_tensor_cores={"bf16": (2,)}), dict(gemv_tensor_cores={"int8": (3,)}),
                                 dict(gemv_tensor_cores={"int4": (1,)}),
                                 dict(gemv_blocks={(1, "plain", 64, 64, "int4"): (16, 64, 4, "tc")}),
                                 dict(gemv_blocks={(2, "plain", 64, 64, "int4"): (4, 512, 2)}),
                                 dict(attention_blocks={1: 8}), dict(rglru_launch=(32,)), dict(pdl="yes"),
                                 dict(prefill_attention="flash"), dict(prefill_attention_tiles=(128, 64, 8)),
                                 dict(prefill_attention_tiles=(8, 64, 8, 2)),
                                 dict(prefill_attention_tiles=(128, 64, 8, 0)), dict(one_byte_words="no"),
                                 dict(dequantize_rows=-1), dict(batched_pdl=1)])
def test_bad_values_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        sg.KernelConfig(**bad)


def test_tensor_core_choice_per_shape_and_weight_format():
    """A block ending in "tc" picks the tensor-core kernel for its shape; a key
    with a weight format wins for that format; gemv_tensor_cores picks the
    kernel (default block) per format and batch bucket where no block is named."""
    blocks = {(8, "plain", 256, 128): (32, 128, 4, "tc"), (8, "plain", 256, 128, "int8"): (8, 64, 4),
              (1, "geglu", 512, 128, "fp8"): (64, 256, 8, "tc")}
    config = sg.KernelConfig(gemv_blocks=blocks, gemv_tensor_cores={"fp8": [1, 16], "float": (16,)})
    assert config.gemv_launch(5, "plain", 256, 128) == ((32, 128, 4, "tc"), True)
    assert config.gemv_launch(5, "plain", 256, 128, "int8") == ((8, 64, 4), False)
    assert config.gemv_launch(5, "plain", 256, 128, "fp8") == ((32, 128, 4, "tc"), True)
    assert config.gemv_launch(1, "geglu", 512, 128, "fp8") == ((64, 256, 8, "tc"), True)
    assert config.gemv_launch(1, "geglu", 512, 128) == (None, False)
    assert config.gemv_launch(1, "plain", 64, 64, "fp8") == (None, True)
    assert config.gemv_launch(9, "plain", 64, 64) == (None, True)  # bucket 16
    assert config.gemv_launch(9, "plain", 64, 64, "int8") == (None, False)
    assert config == sg.KernelConfig(gemv_blocks=blocks, gemv_tensor_cores={"fp8": (16, 1), "float": [16]})
    assert hash(config) == hash(sg.KernelConfig(gemv_blocks=blocks, gemv_tensor_cores={"fp8": (1, 16),
                                                                                       "float": (16,)}))


def test_gemv_blocks_from_the_tuning_json():
    from streamgemma.fast.tuning import gemv_blocks_from_json

    blocks = gemv_blocks_from_json({"8,plain,256,128": [32, 128, 4, "tc"], "1,conv,512,128,int8": [4, 256, 2],
                                    "4,geglu,512,128": [64, 128, 4, "tc", 3, 4]})
    assert blocks == {(8, "plain", 256, 128): (32, 128, 4, "tc"), (1, "conv", 512, 128, "int8"): (4, 256, 2),
                      (4, "geglu", 512, 128): (64, 128, 4, "tc", 3, 4)}
    config = sg.KernelConfig(gemv_blocks=blocks)
    assert config.gemv_launch(8, "plain", 256, 128)[1]
    assert config.gemv_launch(3, "geglu", 512, 128) == ((64, 128, 4, "tc", 3, 4), True)


def test_prefill_tiles_are_normalised_and_hashed():
    config = sg.KernelConfig(prefill_attention_tiles=[64, 32, 4, 3])
    assert config.prefill_attention_tiles == (64, 32, 4, 3)
    assert hash(config) != hash(sg.KernelConfig()) and config != sg.KernelConfig()
