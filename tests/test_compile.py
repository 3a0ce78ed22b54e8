"""torch.compile(fullgraph=True) over every module: no graph break, same
numbers as eager, running statistics updated."""
import pytest
import torch

import normops
from helpers import assert_close, make_input, step_and_compare

CASES = [
    (lambda: normops.nn.BatchNorm2d(4), (3, 4, 5, 5)),
    (lambda: normops.nn.BatchNormAct2d(4, activation="relu6"), (3, 4, 5, 5)),
    (lambda: normops.nn.BatchNorm1d(4, momentum=None), (6, 4)),
    (lambda: normops.nn.LayerNorm(8), (3, 5, 8)),
    (lambda: normops.nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    (lambda: normops.nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 5)),
]


@pytest.mark.parametrize("make,shape", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph(make, shape, layout):
    torch._dynamo.reset()
    eager, compiled = make(), make()
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for training in (True, True, False):
        eager.train(training), compiled.train(training)
        x = make_input(shape, layout=layout if len(shape) == 4 else "contiguous")
        step_and_compare(run, eager, x, steps=1)


def test_compile_inductor_model():
    """A small conv net with every normops module, through inductor."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), normops.nn.BatchNormAct2d(8, activation="relu"),
        torch.nn.Conv2d(8, 8, 3), normops.nn.GroupNorm(4, 8), normops.nn.InstanceNorm2d(8),
        torch.nn.Flatten(1), normops.nn.LayerNorm(8 * 4 * 4))
    ref = torch.nn.Sequential(*[m for m in model])
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
