import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import streamgemma as sg  # noqa: E402


@pytest.fixture
def tiny_config() -> sg.GriffinConfig:
    return sg.GriffinConfig.preset("tiny")


def random_tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
