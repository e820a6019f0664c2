"""The parallel path trains: gradients reach every parameter and stay finite,
including through the RG-LRU's clipped-derivative sqrt at a state reset."""

import torch
import torch.nn.functional as F

import streamgemma as sg
from streamgemma.model.griffin import Griffin


def test_gradients_reach_every_parameter_and_are_finite():
    cfg = sg.GriffinConfig.preset("tiny")
    net = Griffin(cfg, dtype=torch.float32, device="cpu")
    net.init_random_(torch.Generator().manual_seed(0))
    tokens = torch.randint(0, cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(20)[None].expand(3, -1)
    logits, states = net.forward_chunk(tokens[:, :-1], pos, None, logits="all")
    assert states is None
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # One optimizer step lowers the loss on the same batch.
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.05 * p.grad
    again, _ = net.forward_chunk(tokens[:, :-1], pos, None, logits="all")
    assert F.cross_entropy(again.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1)) < loss
