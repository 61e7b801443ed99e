"""The loss workspace hands out reusable buffers of the asked shape, dtype and device."""

import torch

from losses._kernels.workspace import Workspace


def test_buffers_are_reused_and_grown():
    workspace = Workspace()
    like = torch.zeros(4, 3)
    first = workspace("a", like)
    assert first.shape == (4, 3) and first.dtype == like.dtype
    smaller = workspace("a", like, (2, 5))
    assert smaller.shape == (2, 5) and smaller.data_ptr() == first.data_ptr()
    larger = workspace("a", like, (10, 10))
    assert larger.shape == (10, 10) and larger.is_contiguous()
    assert workspace("b", like).data_ptr() != workspace("a", like).data_ptr()
    doubles = workspace("a", like.double())
    assert doubles.dtype == torch.float64


def test_loss_values_do_not_depend_on_an_earlier_call():
    from losses import build_loss

    torch.manual_seed(0)
    x, y = torch.randn(12, 8), torch.arange(4).repeat_interleave(3)
    for name in ("multi_similarity", "circle"):
        fresh = build_loss(name)(x, y)
        reused = build_loss(name)
        reused(torch.randn(30, 8), torch.arange(10).repeat_interleave(3))
        assert torch.equal(reused(x, y), fresh)
