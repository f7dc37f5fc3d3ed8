"""tinystories.loss: the head fused with cross-entropy, against F.cross_entropy on explicit logits."""

import pytest
import torch
import torch.nn.functional as F

from tinystories.loss import linear_cross_entropy, slice_rows


def reference(hidden, weight, targets, softcap=None):
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


def inputs(n=70, c=12, v=33, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=generator, dtype=torch.float64).requires_grad_()
    weight = (3 * torch.randn(v, c, generator=generator, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[:5] = -1  # padding is ignored
    targets[40:44] = -1
    return hidden, weight, targets


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("rows", [1, 16, 64, 1000])  # one row per slice, uneven slices, one slice
def test_loss_and_gradients_equal_plain_cross_entropy(softcap, rows):
    hidden, weight, targets = inputs()
    expected = reference(hidden, weight, targets, softcap)
    grad_hidden, grad_weight = torch.autograd.grad(3.0 * expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, softcap, rows=rows)
    got_hidden, got_weight = torch.autograd.grad(3.0 * loss, (hidden, weight))  # the incoming gradient scales
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_hidden, grad_hidden, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_weight, grad_weight, rtol=1e-9, atol=1e-9)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, rows=16)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach())


def test_a_batch_of_padding_only_has_zero_loss_and_zero_gradient():
    hidden, weight, _ = inputs()
    targets = torch.full((hidden.shape[0],), -1)
    loss = linear_cross_entropy(hidden, weight, targets, rows=16)
    loss.backward()
    assert float(loss) == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_soft_capped_logits_by_hand():
    # one row, two classes, logits (4, 0) capped at 2: 2 tanh(2) and 0; loss = log(1 + e^(-2 tanh 2))
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[4.0], [0.0]])
    loss = linear_cross_entropy(hidden, weight, torch.tensor([0]), softcap=2.0)
    capped = 2.0 * torch.tanh(torch.tensor(2.0))
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-capped)))


def test_slices_hold_about_two_million_logits():
    assert slice_rows(4096) == 512
    assert slice_rows(50257) == 64  # at least 64 rows
