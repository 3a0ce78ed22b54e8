"""normops.nn.InvertedResidual, normops.models.mobilenet_v2 and the
normops::inverted_residual op against torchvision's block and network
rebuilt from torch.nn (tests/reference_models.py)."""
import copy
import io
import json
from pathlib import Path

import pytest
import torch

import normops
import reference_models as ref_models
from helpers import assert_close, make_input, step_and_compare
from normops.inverted_residual import block_stages
from normops.ops.inverted_residual import reference as op_reference

SHAPES = json.loads((Path(__file__).parents[1] / "benchmarks" / "shapes.json").read_text())
# [in, out, stride, expand_ratio] of every MobileNetV2 block
BLOCKS = sorted({tuple(b[:4]) for b in SHAPES["inverted_residual"]["mobilenet_v2"]})
SMALL = [(32, 16, 1, 1), (16, 24, 2, 6), (24, 24, 1, 6), (7, 5, 2, 3)]


def block_id(b):
    return "{}-{}-s{}-t{}".format(*b)


def make_pair(cfg, dtype=torch.float64, memory_efficient=True):
    torch.manual_seed(0)
    ref = ref_models.randomize_norms(ref_models.InvertedResidual(*cfg)).to(dtype)
    ours = normops.nn.InvertedResidual(*cfg, memory_efficient=memory_efficient).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_state_dict_and_attributes_match_torchvision():
    for cfg in BLOCKS + [(32, 16, 1, 1)]:
        ours, ref = make_pair(cfg)
        assert list(ours.state_dict()) == list(ref.state_dict())
        for k, v in ref.state_dict().items():
            assert ours.state_dict()[k].shape == v.shape, k
        for attr in ("use_res_connect", "out_channels", "_is_cn", "stride"):
            assert getattr(ours, attr) == getattr(ref, attr), attr
    with pytest.raises(ValueError, match="stride should be 1 or 2"):
        normops.nn.InvertedResidual(8, 8, 3, 6)


@pytest.mark.parametrize("cfg", BLOCKS, ids=block_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_eval_matches_torchvision_block(cfg, dtype, layout):
    ours, ref = make_pair(cfg, dtype)
    ours.eval(), ref.eval()
    for N, H, W in ((2, 7, 9), (1, 1, 1), (3, 6, 5)):
        x = make_input((N, cfg[0], H, W), dtype, layout=layout)
        with torch.no_grad():
            y, expected = ours(x), ref(x)
        assert_close(y, expected, rtol=1e-4 if dtype == torch.float32 else None,
                     atol=1e-4 if dtype == torch.float32 else None)
        if layout == "channels_last" and N > 1 and H * W > 1:
            assert y.is_contiguous(memory_format=torch.channels_last)
        else:
            assert y.is_contiguous()


def _train_compare(ours, ref, x, dtype, steps=2):
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    step_and_compare(ours, ref, x, steps=steps, **tol)


@pytest.mark.parametrize("cfg", BLOCKS, ids=block_id)
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["recompute", "keep"])
def test_train_matches_torchvision_block_float64(cfg, memory_efficient):
    ours, ref = make_pair(cfg, torch.float64, memory_efficient)
    _train_compare(ours, ref, make_input((2, cfg[0], 7, 9), torch.float64), torch.float64)


@pytest.mark.parametrize("cfg", SMALL, ids=block_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_train_matches_torchvision_block_float32(cfg, layout):
    ours, ref = make_pair(cfg, torch.float32)
    _train_compare(ours, ref, make_input((3, cfg[0], 9, 7), torch.float32, layout=layout),
                   torch.float32)


@pytest.mark.parametrize("cfg", SMALL, ids=block_id)
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_train_batch_of_one(cfg, memory_efficient, dtype, layout):
    """Batch 1, where the 1x1 convolutions run as matrix products (one
    image up to 56x56; 57x57 stays a convolution: float64 only, whose
    tolerance is not at the mercy of float32 rounding over 3249 pixels)."""
    ours, ref = make_pair(cfg, dtype, memory_efficient)
    for H, W in ((9, 7), (57, 57)) if dtype == torch.float64 else ((9, 7),):
        _train_compare(ours, ref, make_input((1, cfg[0], H, W), dtype, layout=layout), dtype)


def test_train_momentum_none_and_no_grad_updates_running_stats():
    ours, ref = make_pair((16, 16, 1, 6))
    for m in list(ours.modules()) + list(ref.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    x = make_input((2, 16, 5, 5), torch.float64)
    with torch.no_grad():
        for _ in range(2):
            assert_close(ours(x), ref(x))
    for bo, br in zip(ours.buffers(), ref.buffers()):
        assert torch.equal(bo, br) if not bo.is_floating_point() else True
        assert_close(bo.double(), br.double())


@pytest.mark.parametrize("block_training", [True, False])
def test_each_batch_norm_mode_decides(block_training):
    """A frozen (eval) batch norm inside a training block uses its running
    statistics and keeps them, as in the unfused block; and the reverse."""
    ours, ref = make_pair((8, 8, 1, 6))
    for m in (ours, ref):
        m.train(block_training)
        for i, bn in enumerate(b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
            bn.train(not block_training if i != 1 else block_training)
    _train_compare(ours, ref, make_input((2, 8, 5, 6), torch.float64), torch.float64)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_one_value_per_channel_in_training_raises(memory_efficient):
    for cfg, size in (((8, 8, 1, 6), (1, 8, 1, 1)), ((8, 16, 2, 6), (1, 8, 2, 2))):
        ours, _ = make_pair(cfg, memory_efficient=memory_efficient)
        before = copy.deepcopy(ours.state_dict())
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            ours(torch.randn(size, dtype=torch.float64))
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("cfg", [(8, 8, 1, 6), (8, 16, 2, 6), (16, 8, 1, 1)], ids=block_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_under_cpu_autocast_follows_torchs_policy(cfg, training):
    """Autocast casts each of the block's ops as torch's policy says (the
    convolutions run in bfloat16): the children run, as in torchvision."""
    ours, ref = make_pair(cfg, torch.float32)
    ours.train(training), ref.train(training)
    x = make_input((2, cfg[0], 6, 5), torch.float32)
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, m.state_dict()))
    assert outs[0][0].dtype == outs[1][0].dtype
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][2], outs[1][2])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_of_another_dtype_than_the_weights_is_refused(training):
    ours, ref = make_pair((8, 16, 2, 6), torch.float32)
    ours.train(training), ref.train(training)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(2, 8, 5, 5, dtype=dtype)
        with pytest.raises(RuntimeError) as theirs:
            ref(x)
        with pytest.raises(RuntimeError) as mine:
            ours(x)
        assert str(mine.value) == str(theirs.value)


def test_eval_under_inference_mode_and_eps_changes():
    ours, ref = make_pair((8, 8, 1, 6))
    ours.eval(), ref.eval()
    x = make_input((2, 8, 5, 5), torch.float64)
    with torch.no_grad():
        assert_close(ours(x), ref(x))
        ours.conv[1][1].eps = ref.conv[1][1].eps = 0.5
        assert_close(ours(x), ref(x))
    with torch.inference_mode():
        frozen, frozen_ref = copy.deepcopy(ours), copy.deepcopy(ref)
        assert_close(frozen(x), frozen_ref(x))


def test_eval_fold_cache_follows_parameter_and_buffer_changes():
    ours, ref = make_pair((16, 16, 1, 6))
    ours.eval(), ref.eval()
    x = make_input((2, 16, 5, 5), torch.float64)
    with torch.no_grad():
        assert_close(ours(x), ref(x))
        for m in (ours, ref):
            m.conv[1][1].weight.mul_(2)
            m.conv[3].running_mean.add_(1)
            m.conv[0][0].weight.sub_(0.1)
        assert_close(ours(x), ref(x))
    ours.train(), ref.train()
    _train_compare(ours, ref, x, torch.float64, steps=1)  # moves the running stats
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_close(ours(x), ref(x))


def test_eval_fold_cache_sees_writes_that_bypass_version_counters():
    """Writes through .data, fused optimizer steps and NumPy views leave the
    version counters alone: the folded weights must follow them anyway."""
    torch.manual_seed(0)
    ours, ref = make_pair((8, 8, 1, 6), torch.float32)
    ours.eval(), ref.eval()
    x = make_input((2, 8, 5, 5), torch.float32)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, fused=True) for m in (ours, ref)]
    for step in range(3):
        with torch.no_grad():
            assert_close(ours(x), ref(x))
        for m, opt in zip((ours, ref), opts):
            if step == 0:
                for p in m.parameters():
                    p.data.mul_(0.9).add_(0.1)
            elif step == 1:
                m.conv[3].running_var.numpy()[:] *= 2
            else:
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
    with torch.no_grad():
        assert_close(ours(x), ref(x))


def test_pickling_leaves_the_fold_cache_out():
    """torch.save of an evaluated module stores its weights once; the copy
    folds again on its first call and matches."""
    ours, ref = make_pair((16, 16, 1, 6))
    ours.eval(), ref.eval()
    x = make_input((2, 16, 5, 5), torch.float64)
    with torch.no_grad():
        ours(x)
        sizes = []
        for module in (ours, normops.nn.InvertedResidual(16, 16, 1, 6).double()):
            buffer = io.BytesIO()
            torch.save(module, buffer)
            sizes.append(buffer.getbuffer().nbytes)
        assert sizes[0] < 1.1 * sizes[1]
        clone = copy.deepcopy(ours)
        assert not hasattr(clone, "_fold_cache")
        assert_close(clone(x), ref(x))


def test_same_contents_compares_bytes():
    from normops._C import same_contents
    a = torch.randn(4, 3)
    assert same_contents([a, a[0]], [a.clone(), a[0].clone()])
    assert not same_contents([a], [a.double()])          # dtype
    assert not same_contents([a], [a.view(3, 4)])        # shape
    assert same_contents([a.t()], [a.t().clone()])       # strided: compared by value
    assert not same_contents([a.t()], [a.t().clone() + 1])
    assert not same_contents([a], [a, a])
    b = a.clone()
    b[1, 2] += 1
    assert not same_contents([a], [b])
    with pytest.raises(TypeError):
        same_contents([a], [1])


def test_momentum_none_without_batch_count_leaves_running_stats():
    """torch's factor for momentum=None without num_batches_tracked is 0."""
    ours, ref = make_pair((8, 8, 1, 6))
    for m in (ours, ref):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum, bn.num_batches_tracked = None, None
    _train_compare(ours, ref, make_input((2, 8, 5, 5), torch.float64), torch.float64, steps=1)


def test_eval_gradients_flow_to_parameters_and_input():
    ours, ref = make_pair((8, 8, 1, 6))
    ours.eval(), ref.eval()
    _train_compare(ours, ref, make_input((2, 8, 5, 4), torch.float64), torch.float64, steps=1)


def test_saved_activations_of_memory_efficient_training():
    """The memory-efficient backward keeps bottleneck-sized tensors, against
    the expanded activations torch.nn keeps."""
    saved_bytes = ref_models.saved_activation_bytes
    cfg = (24, 24, 1, 6)
    x = make_input((4, 24, 28, 28), torch.float32, layout="channels_last").requires_grad_()
    ours, ref = make_pair(cfg, torch.float32)
    ours_bytes, ref_bytes = saved_bytes(ours, x), saved_bytes(ref, x)
    # the input, the projection's output (both bottleneck-sized) and the
    # batch norms' (mean, var): 2 x (144 + 144 + 24) floats
    assert ours_bytes == 2 * x.numel() * x.element_size() + 2 * (144 + 144 + 24) * 4
    assert ours_bytes <= 0.2 * ref_bytes, (ours_bytes, ref_bytes)
    keep, _ = make_pair(cfg, torch.float32, memory_efficient=False)
    assert saved_bytes(keep, x) > 10 * ours_bytes


def test_saved_tensor_hooks_see_the_saved_input():
    ours, ref = make_pair((8, 8, 1, 6))
    x = make_input((2, 8, 5, 5), torch.float64).requires_grad_()
    with torch.autograd.graph.save_on_cpu():
        y = ours(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward(g)
    assert_close(x.grad, xr.grad, grad=True)


def _op_args(cfg, N=2, H=5, W=6, dtype=torch.float64, requires_grad=False):
    inp, oup, stride, t = cfg
    hidden = inp * t

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(requires_grad)
    expand = (r(hidden, inp, scale=0.3), r(hidden)) if t != 1 else (None, None)
    return (r(N, inp, H, W), *expand, r(hidden, 3, 3, scale=0.3), r(hidden),
            r(oup, hidden, scale=0.3), r(oup), stride, stride == 1 and inp == oup)


@pytest.mark.parametrize("cfg", [(4, 4, 1, 3), (3, 5, 2, 2), (6, 4, 1, 1)], ids=block_id)
def test_op_gradcheck(cfg):
    args = _op_args(cfg, N=2, H=4, W=3, requires_grad=True)
    torch.autograd.gradcheck(torch.ops.normops.inverted_residual, args)
    torch.autograd.gradgradcheck(torch.ops.normops.inverted_residual, args)


@pytest.mark.parametrize("cfg", SMALL, ids=block_id)
def test_op_opcheck(cfg):
    for layout_cl in (False, True):
        args = list(_op_args(cfg, dtype=torch.float32, requires_grad=True))
        if layout_cl:
            args[0] = args[0].detach().contiguous(memory_format=torch.channels_last) \
                .requires_grad_()
        torch.library.opcheck(torch.ops.normops.inverted_residual, tuple(args))


def test_op_matches_reference_in_reduced_precision():
    args = list(_op_args((16, 16, 1, 6), dtype=torch.float32))
    x16 = args[0].to(torch.bfloat16)
    y = torch.ops.normops.inverted_residual(x16, *args[1:])
    assert y.dtype == torch.bfloat16
    expected = op_reference(x16.float(), *args[1:])
    assert_close(y, expected, dtype=torch.bfloat16, rtol=3e-2, atol=3e-2)


def test_op_repacks_weights_changed_in_place():
    """The kernel caches its packed weights; a change must be seen."""
    args = list(_op_args((8, 8, 1, 6)))
    op = torch.ops.normops.inverted_residual
    assert_close(op(*args), op_reference(*args))
    with torch.no_grad():
        args[1].mul_(1.5)  # expand weight
        args[6].add_(1.0)  # project bias
    assert_close(op(*args), op_reference(*args))
    args[3] = args[3] * 2  # a new depthwise weight tensor
    assert_close(op(*args), op_reference(*args))
    with torch.inference_mode():
        frozen = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        assert_close(op(*frozen), op_reference(*frozen))


def test_op_rejects_bad_arguments():
    args = list(_op_args((8, 8, 1, 6)))
    op = torch.ops.normops.inverted_residual
    bad = {
        0: (torch.randn(2, 8, 5), "expected a 4-D"),
        1: (torch.randn(48, 7, dtype=torch.float64), "expand_weight of shape"),
        3: (torch.randn(48, 9, dtype=torch.float64), "depthwise_weight of shape"),
        6: (torch.randn(9, dtype=torch.float64), "project_bias of shape"),
        7: (3, "stride must be 1 or 2"),
    }
    for i, (value, msg) in bad.items():
        call = list(args)
        call[i] = value
        with pytest.raises(RuntimeError, match=msg):
            op(*call)
    with pytest.raises(RuntimeError, match="both be given or both be None"):
        op(args[0], args[1], None, *args[3:])
    call = list(args)
    call[8] = True
    call[5] = torch.randn(4, 48, dtype=torch.float64)
    call[6] = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="the residual needs"):
        op(*call)
    empty = op(torch.randn(0, 8, 5, 5, dtype=torch.float64), *args[1:])
    assert empty.shape == (0, 8, 5, 5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph(training):
    torch._dynamo.reset()
    ours, ref = make_pair((16, 16, 1, 6), torch.float32)
    ours.train(training), ref.train(training)
    compiled = torch.compile(ours, fullgraph=True)
    x = make_input((2, 16, 7, 7), torch.float32, layout="channels_last")
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = compiled(xo), ref(xr)
    assert_close(yo, yr, rtol=1e-4, atol=1e-4)
    yo.sum().backward()
    yr.sum().backward()
    assert_close(xo.grad, xr.grad, rtol=1e-3, atol=1e-3)
    for bo, br in zip(ours.buffers(), ref.buffers()):
        assert_close(bo.double(), br.double(), rtol=1e-4, atol=1e-4)


def test_convert_recognises_torchvision_blocks_by_structure():
    torch.manual_seed(0)
    model = ref_models.randomize_norms(ref_models.MobileNetV2(num_classes=10))
    ref = copy.deepcopy(model)
    normops.convert(model)
    blocks = [m for m in model.modules() if isinstance(m, normops.nn.InvertedResidual)]
    assert len(blocks) == 17
    assert type(model.features[0][1]) is normops.nn.BatchNormAct2d
    assert model.state_dict().keys() == ref.state_dict().keys()
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    # Converting again, or converting normops' own network, keeps every block fused.
    for net in (normops.convert(model), normops.convert(normops.models.mobilenet_v2())):
        blocks = [m for m in net.modules() if isinstance(m, normops.nn.InvertedResidual)]
        assert len(blocks) == 17 and all(block_stages(b.conv) is not None for b in blocks)
    # A block whose structure differs (here a ReLU instead of ReLU6) is left alone.
    odd = ref_models.InvertedResidual(8, 8, 1, 6)
    odd.conv[0][2] = torch.nn.ReLU()
    normops.convert(odd)
    assert type(odd) is ref_models.InvertedResidual


def test_mobilenet_v2_norm_layer_reaches_every_layer():
    import functools
    net = normops.models.mobilenet_v2(norm_layer=functools.partial(torch.nn.BatchNorm2d, eps=1e-3))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)
    assert list(net.state_dict()) == list(ref_models.MobileNetV2().state_dict())


def test_mobilenet_v2_signature_and_attributes_of_torchvision():
    net = normops.models.mobilenet_v2(weights=None, progress=False, num_classes=10)
    assert [type(m).__name__ for m in (net.features[0], net.features[-1])] == [
        "Conv2dNormActivation"] * 2
    assert net.features[0].out_channels == 32 and net.features[-1].out_channels == 1280
    assert net.features[1].conv[0].out_channels == 32
    with pytest.raises(ValueError, match="downloads no weights"):
        normops.models.mobilenet_v2(weights="IMAGENET1K_V1")
    norm_layers = []

    def block(inp, oup, stride, expand_ratio, norm_layer):  # torchvision always passes it
        norm_layers.append(norm_layer)
        return normops.nn.InvertedResidual(inp, oup, stride, expand_ratio, norm_layer)
    normops.models.mobilenet_v2(block=block)
    assert len(norm_layers) == 17 and set(norm_layers) == {torch.nn.BatchNorm2d}


def test_mobilenet_v2_matches_torchvision_network():
    torch.manual_seed(0)
    ref = ref_models.randomize_norms(ref_models.MobileNetV2(num_classes=10))
    ours = normops.models.mobilenet_v2(num_classes=10)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    assert sum(p.numel() for p in normops.models.mobilenet_v2().parameters()) == 3504872
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    # One training step in float64: float32 rounding grows through 17
    # training-mode blocks (~1e-3 of the stem's gradient, for torch.nn too).
    ours.double().train(), ref.double().train()
    x = x.double()
    ours.classifier[0].p = ref.classifier[0].p = 0.0  # no dropout: deterministic
    yo, yr = ours(x), ref(x)
    assert_close(yo, yr)
    yo.square().sum().backward()
    yr.square().sum().backward()
    # Some gradients are zero up to rounding (a bias before a training-mode
    # batch norm): tolerances relative to the largest gradient of the model.
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, po), pr in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(po.grad, pr.grad, rtol=1e-7, atol=1e-9 * scale, msg=name)
    for (name, bo), br in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(bo, br, rtol=1e-9, atol=1e-9, msg=name)


def test_convert_leaves_blocks_with_their_own_forward():
    """Only torchvision's block itself is recognised: a subclass, or another
    class with the same structure plus something of its own, keeps its
    forward."""
    class Scaled(ref_models.InvertedResidual):
        def forward(self, x):
            return x + 0.5 * self.conv(x)

    class LayerScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ref_models.InvertedResidual(8, 8, 1, 6).conv
            self.use_res_connect = True
            self.gamma = torch.nn.Parameter(torch.full((8, 1, 1), 0.1))

        def forward(self, x):
            return x + self.gamma * self.conv(x)

    x = torch.randn(2, 8, 5, 5)
    for block in (Scaled(8, 8, 1, 6), LayerScale()):
        block.eval()
        with torch.no_grad():
            ref = block(x)
            cls = type(block)
            normops.convert(block)
            assert type(block) is cls
            assert_close(block(x), ref)


@pytest.mark.parametrize("training", [True, False])
def test_hooks_on_submodules_run_pruned_weights_included(training):
    """Pruning (a forward-pre hook that rewrites conv weights) and forward hooks
    on the block's submodules run as in the unfused block."""
    import torch.nn.utils.prune as prune
    ours, ref = make_pair((8, 8, 1, 6))
    seen = {"ours": 0, "ref": 0}
    for name, block in (("ours", ours), ("ref", ref)):
        for m in block.modules():
            if isinstance(m, torch.nn.Conv2d):
                prune.l1_unstructured(m, "weight", 0.5)
        block.conv[1][1].register_forward_hook(
            lambda *args, name=name: seen.__setitem__(name, seen[name] + 1))
        block.train(training)
    x = make_input((2, 8, 5, 6), torch.float64)
    step_and_compare(ours, ref, x, steps=2)
    assert seen["ours"] == seen["ref"] > 0


def test_train_double_backward_memory_efficient():
    """create_graph through the recomputing backward (gradient penalties):
    the gradient of a gradient matches torchvision's block."""
    for cfg in ((8, 8, 1, 6), (8, 12, 2, 1)):
        ours, ref = make_pair(cfg)
        x = make_input((2, cfg[0], 5, 6), torch.float64)
        results = []
        for block in (ours, ref):
            xi = x.clone().requires_grad_()
            g, = torch.autograd.grad(block(xi).pow(2).sum(), xi, create_graph=True)
            penalty = g.pow(2).sum()
            results.append(torch.autograd.grad(penalty, [xi, *block.parameters()]))
        for a, b in zip(*results):
            assert_close(a, b)


def test_convert_and_fusion_follow_the_forwards_that_run():
    """A class named InvertedResidual whose forward is not torchvision's is
    not converted; a BatchNorm2d subclass with its own forward inside the
    block keeps the block unfused."""
    class InvertedResidual(torch.nn.Module):  # same name and structure, own forward
        def __init__(self):
            super().__init__()
            self.conv = ref_models.InvertedResidual(4, 4, 1, 2).conv
            self.use_res_connect = True

        def forward(self, x):
            if self.use_res_connect:
                return x + 0.2 * self.conv(x)
            return self.conv(x)

    class ShiftedBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 100.0

    x = torch.randn(2, 4, 5, 5)
    own = InvertedResidual().eval()
    with torch.no_grad():
        ref = own(x)
        normops.convert(own)
        assert type(own) is InvertedResidual
        assert_close(own(x), ref)
    for training in (True, False):
        block = normops.nn.InvertedResidual(4, 4, 1, 2, norm_layer=ShiftedBN).train(training)
        unfused = copy.deepcopy(block)
        with torch.no_grad():
            assert_close(block(x), x + unfused.conv(x))


def test_modules_accept_their_argument_by_keyword():
    x = torch.randn(2, 4, 5, 5)
    assert normops.nn.InvertedResidual(4, 4, 1, 2)(x=x).shape == x.shape
    for m in (normops.nn.BatchNorm2d(4), normops.nn.GroupNorm(2, 4), normops.nn.LayerNorm(5),
              normops.nn.InstanceNorm2d(4)):
        assert m(input=x).shape == x.shape


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_and_torch_func_match_torchvision(training):
    """jvp (torch.autograd.forward_ad, and torch.func in eval: torch's own
    batch norm refuses it in training, as it updates buffers) gives
    torchvision's tangents: the fused ops have no forward-mode rule, so the
    submodules run."""
    import torch.autograd.forward_ad as fwAD
    ours, ref = make_pair((8, 8, 1, 6))
    ours.train(training), ref.train(training)
    x, t = make_input((2, 8, 5, 6), torch.float64), make_input((2, 8, 5, 6), torch.float64)
    results = []
    for block in (ours, ref):
        with fwAD.dual_level():
            tangents = [fwAD.unpack_dual(block(fwAD.make_dual(x, t))).tangent]
        if not training:
            tangents.append(torch.func.jvp(block, (x,), (t,))[1])
        results.append(tangents)
    for a, b in zip(*results):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_fused_paths_run(monkeypatch, dtype, layout):
    """The parity tests pass on the unfused children too: here the block
    must take the recomputing training path and the fused eval op."""
    import normops.inverted_residual as ir
    ours, _ = make_pair((8, 16, 2, 6), dtype)
    taken = []
    train_apply, call = ir._RecomputedTrainBlock.apply, ir.call
    monkeypatch.setattr(ir._RecomputedTrainBlock, "apply",
                        lambda *args: taken.append("train") or train_apply(*args))
    monkeypatch.setattr(ir, "call", lambda op, *args: taken.append(op) or call(op, *args))
    x = make_input((2, 8, 6, 5), dtype, layout=layout)
    ours.train()(x)
    with torch.no_grad():
        ours.eval()(x)
    assert taken.count("train") == 1 and taken.count(torch.ops.normops.inverted_residual) == 1


def test_fold_cached_under_inference_mode_serves_a_later_gradient():
    # A frozen model validated under inference_mode, then asked for input
    # gradients (saliency): the cached fold must not be inference tensors.
    ours, ref = make_pair((8, 8, 1, 6))
    for m in (ours, ref):
        m.eval().requires_grad_(False)
    x = make_input((2, 8, 7, 9), torch.float64)
    with torch.inference_mode():
        assert_close(ours(x), ref(x))
    grads = [torch.autograd.grad(m(xg).square().sum(), xg)[0]
             for m, xg in ((ours, x.clone().requires_grad_()), (ref, x.clone().requires_grad_()))]
    assert_close(*grads)


def test_jit_trace_reads_the_weights_it_is_given():
    ours, ref = make_pair((8, 8, 1, 6))
    ours.eval(), ref.eval()
    x = make_input((2, 8, 7, 9), torch.float64)
    with torch.no_grad():
        ours(x)  # a warm fold cache must not become the trace's constants
        traced = torch.jit.trace(ours, x)
        for m in (ours, ref):
            m.conv[1][1].running_mean.add_(0.7)
        assert_close(traced(x), ref(x))


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_jit_trace_in_training(memory_efficient):
    # Traced at batch 1, run at batch 3: the running statistics count the
    # batch at run time, as torch's traced block does.
    ours, ref = make_pair((8, 8, 1, 6), memory_efficient=memory_efficient)
    for m in (ours, ref):
        for bn in (m.conv[0][1], m.conv[1][1], m.conv[3]):
            bn.momentum = 1.0
    ours.train(), ref.train()
    traced = torch.jit.trace(ours, make_input((1, 8, 7, 9), torch.float64), check_trace=False)
    x = make_input((3, 8, 7, 9), torch.float64)
    assert_close(traced(x), ref(x))
    for name, buffer in ref.named_buffers():
        if name.endswith("running_var") or name.endswith("running_mean"):
            assert_close(ours.get_buffer(name), buffer)


def test_eval_with_a_stage_of_another_dtype_is_refused_as_torch_does():
    ours, ref = make_pair((8, 8, 1, 6), torch.float32)
    ours.eval(), ref.eval()
    x = torch.randn(2, 8, 7, 9)
    for stage in ("conv.0.0", "conv.0.1", "conv.1.1", "conv.2", "conv.3"):
        o, r = copy.deepcopy(ours), copy.deepcopy(ref)
        o.get_submodule(stage).double(), r.get_submodule(stage).double()
        with pytest.raises(RuntimeError):
            r(x)
        with pytest.raises(RuntimeError):
            o(x)


def test_eval_bfloat16_block_with_float32_batch_norms(monkeypatch):
    # Mixed precision as torch allows it: the fused path runs and matches.
    import normops.inverted_residual as ir
    taken, call = [], ir.call
    monkeypatch.setattr(ir, "call", lambda op, *args: taken.append(op) or call(op, *args))
    ours, ref = make_pair((8, 8, 1, 6), torch.float32)
    for m in (ours, ref):
        m.eval().bfloat16()
        for stage in ("conv.0.1", "conv.1.1", "conv.3"):
            m.get_submodule(stage).float()
    x = torch.randn(2, 8, 7, 7, dtype=torch.bfloat16)
    with torch.no_grad():
        y, want = ours(x), ref(x)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=0.05, atol=0.05 * want.abs().max().item())
    assert taken == [torch.ops.normops.inverted_residual]


def test_traced_eval_block_backpropagates_every_call():
    ours, ref = make_pair((4, 4, 1, 2))
    ours.eval(), ref.eval()
    x = make_input((2, 4, 5, 5), torch.float64)
    traced = torch.jit.trace(ours, x, check_trace=False)
    for _ in range(3):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        grads = [torch.autograd.grad(m(xi).square().sum(), [xi, w])
                 for m, xi, w in ((traced, xs[0], ours.conv[1][0].weight),
                                  (ref, xs[1], ref.conv[1][0].weight))]
        for got, want in zip(*grads):
            assert_close(got, want)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", [(8, 8, 1, 6), (8, 16, 2, 6), (8, 8, 1, 1)])
def test_sliced_channels_last_input_keeps_torchs_layout(cfg, training):
    ours, ref = make_pair(cfg)
    ours.train(training), ref.train(training)
    x = torch.randn(2, 8, 9, 14, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)[..., ::2]
    with torch.no_grad():
        y, want = ours(x), ref(x)
    assert y.stride() == want.stride()
    assert_close(y, want)
    if not training:
        torch.library.opcheck(torch.ops.normops.inverted_residual,
                              (x, *ours._folded(block_stages(ours.conv)[0], x.dtype), cfg[2],
                               ours.use_res_connect))
