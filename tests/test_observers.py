"""The running range of :mod:`lrquant.quant.observers`."""

from __future__ import annotations

import torch

from lrquant.quant.observers import MinMaxObserver


def test_minmax_observer_is_per_channel_and_independent_of_the_split():
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole, parts = MinMaxObserver(), MinMaxObserver()
    assert whole.min is None and whole.max is None
    whole.update(x)
    for chunk in (x[:1], x[1:4], x[4:]):
        parts.update(chunk)
    flat = x.reshape(-1, 8)
    assert torch.equal(whole.min, flat.amin(0)) and torch.equal(whole.max, flat.amax(0))
    assert whole.min.shape == (8,) and whole.min.dtype == torch.bfloat16
    assert torch.equal(parts.min, whole.min) and torch.equal(parts.max, whole.max)


def test_minmax_observer_keeps_no_graph():
    x = torch.randn(4, 3, requires_grad=True)
    obs = MinMaxObserver()
    obs.update(x * 2)
    assert not obs.min.requires_grad and not obs.max.requires_grad
