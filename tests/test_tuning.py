"""KernelConfig: one immutable value instead of tuning globals."""

import dataclasses

import pytest

import streamgemma as sg


def test_defaults_leave_every_choice_to_the_kernels():
    config = sg.KernelConfig()
    assert config.gemv_max_batch == 1 and config.pdl is None and config.rglru_launch is None
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
                                 dict(attention_blocks={1: 8}), dict(rglru_launch=(32,)), dict(pdl="yes")])
def test_bad_values_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        sg.KernelConfig(**bad)
