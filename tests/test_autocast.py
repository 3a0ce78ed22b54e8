"""Autocast: normops follows torch's policy per op (aten/src/ATen/autocast_mode.cpp):
under CUDA autocast layer norm and group norm run in float32 and return
float32; batch norm and instance norm run in the input dtype with float32
parameters; CPU autocast casts none of them."""
import copy

import pytest
import torch

import normops
from helpers import DEVICES, assert_close

F = torch.nn.functional
LOW = {"cpu": torch.bfloat16, "cuda": torch.float16}
# normops ops whose CUDA autocast kernel casts to float32; every other op
# must have none (it runs in the input dtype).
CUDA_FLOAT32 = {"normops::layer_norm", "normops::group_norm"}


def test_every_op_has_torchs_autocast_policy():
    names = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("normops::")}
    assert CUDA_FLOAT32 <= names and len(names) >= 10
    for name in names:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")
        assert has_cuda == (name in CUDA_FLOAT32), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU"), name


def _pairs(C=8):
    """(torch functional, normops functional) on the same arguments."""
    w, b = torch.randn(C), torch.randn(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    return {
        "batch_norm": lambda f, x: f.batch_norm(x, rm.to(x.device), rv.to(x.device),
                                                w.to(x.device), b.to(x.device), True),
        "layer_norm": lambda f, x: f.layer_norm(x, x.shape[-1:], torch.randn(x.shape[-1:]).to(
            x.device), None),
        "group_norm": lambda f, x: f.group_norm(x, 2, w.to(x.device), b.to(x.device)),
        "instance_norm": lambda f, x: f.instance_norm(x, weight=w.to(x.device),
                                                      bias=b.to(x.device)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "group_norm", "instance_norm"])
@pytest.mark.parametrize("input_dtype", ["low", "float32"])
def test_functional_under_autocast_matches_torch(device, op, input_dtype):
    low = LOW[device]
    x = torch.randn(4, 8, 5, 6, device=device) * 3 + 1
    x = x.to(low) if input_dtype == "low" else x
    call = _pairs()[op]
    with torch.autocast(device, dtype=low):
        torch.manual_seed(1)
        ref = call(F, x)
        torch.manual_seed(1)
        ours = call(normops.functional, x)
    assert ours.dtype == ref.dtype
    assert_close(ours, ref, dtype=ref.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_model_under_autocast_matches_torch(device):
    """Convolutions give low-precision activations to every norm module."""
    low = LOW[device]
    torch.manual_seed(0)
    nn = torch.nn
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.GroupNorm(4, 8),
        nn.Conv2d(8, 8, 1), nn.InstanceNorm2d(8, affine=True), nn.Flatten(2),
        nn.Linear(16, 16), nn.LayerNorm(16)).to(device)
    ours = normops.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    outs = []
    for model in (ref, ours):
        with torch.autocast(device, dtype=low):
            y = model(x)
        y.float().square().mean().backward()
        outs.append(y)
    assert outs[1].dtype == outs[0].dtype
    assert_close(outs[1], outs[0], dtype=low)
    for (name, po), pr in zip(ours.named_parameters(), ref.parameters()):
        assert po.grad.dtype == pr.grad.dtype == torch.float32, name
        torch.testing.assert_close(po.grad, pr.grad, rtol=5e-2, atol=5e-2, msg=name)
    for bo, br in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(bo, br, rtol=2e-2, atol=2e-2)
