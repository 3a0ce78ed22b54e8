"""gradcheck and gradgradcheck in float64 on small shapes: first-order
gradients come from the normops backward ops; second order from the
differentiable fallback the backward switches to when a graph is built."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normops.functional as NF
from helpers import devices, make_input


def leaf(t):
    return t.detach().clone().requires_grad_()


@devices
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", [None, "relu6"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(device, layout, activation, training):
    x = leaf(make_input((3, 4, 3, 2), torch.float64, device, layout, scale=3))
    w = leaf(torch.rand(4, dtype=torch.float64, device=device) + 0.5)
    b = leaf(torch.randn(4, dtype=torch.float64, device=device))
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def f(x, w, b):
        return NF.batch_norm(x, None if training else rm, None if training else rv, w, b,
                             training=training, activation=activation)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@devices
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(device, affine):
    x = leaf(torch.randn(3, 4, 5, dtype=torch.float64, device=device))
    w = leaf(torch.randn(4, 5, dtype=torch.float64, device=device)) if affine else None
    b = leaf(torch.randn(4, 5, dtype=torch.float64, device=device)) if affine else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        return NF.layer_norm(args[0], (4, 5), *args[1:]) if affine else NF.layer_norm(args[0], (4, 5))
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@devices
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm(device, layout, groups):
    x = leaf(make_input((2, 4, 3, 2), torch.float64, device, layout))
    w = leaf(torch.rand(4, dtype=torch.float64, device=device) + 0.5)
    b = leaf(torch.randn(4, dtype=torch.float64, device=device))
    assert gradcheck(lambda x, w, b: NF.group_norm(x, groups, w, b), (x, w, b))
    assert gradgradcheck(lambda x, w, b: NF.group_norm(x, groups, w, b), (x, w, b))


@devices
def test_instance_norm(device):
    x = leaf(make_input((2, 3, 4, 3), torch.float64, device, "channels_last"))
    w = leaf(torch.rand(3, dtype=torch.float64, device=device) + 0.5)
    b = leaf(torch.randn(3, dtype=torch.float64, device=device))
    assert gradcheck(lambda x, w, b: NF.instance_norm(x, weight=w, bias=b), (x, w, b))
    assert gradgradcheck(lambda x, w, b: NF.instance_norm(x, weight=w, bias=b), (x, w, b))
    # A bias without a weight, which torch's instance norm takes (its group
    # norm, the double backward's reference, refuses the pair).
    assert gradgradcheck(lambda x, b: NF.instance_norm(x, bias=b), (x, b))


def test_gradient_penalty_through_instance_norm():
    """A critic's gradient penalty: d/dθ ||d critic / d x||², through the norm."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for norm in (torch.nn.InstanceNorm2d(4, affine=True).double(),
                 __import__("normops").nn.InstanceNorm2d(4, affine=True).double()):
        out = norm(conv(x)).pow(2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        penalty = gx.pow(2).sum()
        results.append(torch.autograd.grad(penalty, conv.weight))
    torch.testing.assert_close(results[0][0], results[1][0])
