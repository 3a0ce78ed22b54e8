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
