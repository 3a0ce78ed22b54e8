"""Statistics over spans longer than one two-pass block (kMomentBlockElems =
4096 values, csrc/cpu/kernels/kernels_impl.h): layer-norm rows, NCHW groups,
planes and channels reduced as several blocks and a partial one, then
Chan-merged. On a mean far from zero, where a lost or misweighted block
shows."""
import pytest
import torch
import torch.nn.functional as TF

import normops.functional as NF
from helpers import assert_close

CASES = [
    # (name, shape, normops, torch)
    ("layer_norm two blocks and a tail", (3, 2 * 4096 + 37),
     lambda x: NF.layer_norm(x, (x.size(-1),)), lambda x: TF.layer_norm(x, (x.size(-1),))),
    ("layer_norm one whole block", (2, 4096),
     lambda x: NF.layer_norm(x, (4096,)), lambda x: TF.layer_norm(x, (4096,))),
    ("group_norm by group", (2, 8, 45, 47),
     lambda x: NF.group_norm(x, 2), lambda x: TF.group_norm(x, 2)),
    ("instance_norm planes", (2, 3, 65, 67),
     lambda x: NF.instance_norm(x), lambda x: TF.instance_norm(x)),
    ("batch_norm channels of long planes", (2, 3, 65, 67),
     lambda x: NF.batch_norm(x, None, None, training=True),
     lambda x: TF.batch_norm(x, None, None, training=True)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,shape,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_spans_of_several_blocks(name, shape, ours, theirs, dtype):
    torch.manual_seed(0)
    x64 = torch.randn(shape, dtype=torch.float64) * 2 + 100
    x = x64.to(dtype).requires_grad_()
    ref = x.detach().double().requires_grad_()
    y, yr = ours(x), theirs(ref)
    assert_close(y, yr, dtype=dtype)
    g = torch.randn(shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g.to(dtype))
    (gr,) = torch.autograd.grad(yr, ref, g)
    assert_close(gx, gr, dtype=dtype, grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,ours,theirs", [
    ("group_norm", lambda x: NF.group_norm(x, 4), lambda x: TF.group_norm(x, 4)),
    ("batch_norm", lambda x: NF.batch_norm(x, None, None, training=True),
     lambda x: TF.batch_norm(x, None, None, training=True)),
], ids=["group_norm", "batch_norm"])
@pytest.mark.parametrize("plane", [(40, 50), (50, 60), (70, 80)], ids=["2000", "3000", "5600"])
def test_half_gradient_sums_of_long_planes(name, ours, theirs, dtype, plane):
    """16-bit NCHW planes are widened into a float block for the statistics
    and the gradient sums when two of a span's planes fit in it (batch
    norm's channels here), and reduced as they are otherwise (longer planes;
    group norm's one plane per call): both sides of that limit (2048
    values)."""
    torch.manual_seed(0)
    x = (torch.randn(3, 8, *plane, dtype=torch.float64) * 2 + 3).to(dtype).requires_grad_()
    ref = x.detach().double().requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y, yr = ours(x), theirs(ref)
    assert_close(y, yr, dtype=dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(yr, ref, g.double())
    assert_close(gx, gr, dtype=dtype, grad=True)
