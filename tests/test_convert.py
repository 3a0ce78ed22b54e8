"""normops.convert on models built from torch.nn."""
import copy
import gc
import io
import weakref

import torch

import normops
from helpers import assert_close, step_and_compare


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU6(inplace=True),
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()),
        torch.nn.GroupNorm(2, 8),
        torch.nn.InstanceNorm2d(8, affine=True),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(1),
        torch.nn.LayerNorm(8 * 4 * 4),
        torch.nn.Unflatten(1, (8, 16)),
        torch.nn.BatchNorm1d(8),
    )


def test_convert_swaps_in_place_and_keeps_numbers():
    torch.manual_seed(0)
    ref = make_model()
    model = make_model()
    model.load_state_dict(ref.state_dict())
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    out = normops.convert(model)
    assert out is model
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == keys_before
    assert type(model[1]) is normops.nn.BatchNormAct2d and model[1].activation == "relu6"
    assert type(model[2]) is normops.nn.FusedActivation
    assert type(model[3][1]) is normops.nn.BatchNormAct2d and model[3][1].activation == "relu"
    assert type(model[4]) is normops.nn.GroupNorm
    assert type(model[5]) is normops.nn.InstanceNorm2d
    assert type(model[6]) is normops.nn.BatchNorm2d
    assert type(model[8]) is normops.nn.LayerNorm
    assert type(model[10]) is normops.nn.BatchNorm1d
    x = torch.randn(4, 3, 4, 4)
    for training in (True, False):
        model.train(training), ref.train(training)
        step_and_compare(model, ref, x, steps=1)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert_close(a.double(), b.double(), torch.float32), k
    ref.load_state_dict(model.state_dict())


def test_convert_leaves_subclasses_and_single_modules():
    class MyBN(torch.nn.BatchNorm2d):
        pass

    m = torch.nn.Sequential(MyBN(3), torch.nn.ReLU())
    normops.convert(m)
    assert type(m[0]) is MyBN and type(m[1]) is torch.nn.ReLU
    single = normops.convert(torch.nn.LayerNorm(4))
    assert type(single) is normops.nn.LayerNorm


def test_convert_does_not_fuse_where_the_fusion_would_show():
    """A batch norm shared with another place, or one whose output (or whose
    activation) is hooked, keeps its activation separate."""
    x = torch.randn(2, 4, 3, 3)
    bn = torch.nn.BatchNorm2d(4).eval()

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(bn, torch.nn.ReLU())
            self.bn = bn

        def forward(self, x):
            return self.seq(x), self.bn(x)

    m = Shared()
    ref = [t.clone() for t in m(x)]
    normops.convert(m)
    assert type(m.seq[1]) is torch.nn.ReLU
    for a, b in zip(m(x), ref):
        assert_close(a, b)

    seen = []
    hooked_bn = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    hooked_bn[0].register_forward_hook(lambda mod, i, o: seen.append(o.min().item()))
    hooked_act = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU6()).eval()
    hooked_act[1].register_forward_hook(lambda mod, i, o: seen.append(o.max().item()))
    for seq in (hooked_bn, hooked_act):
        normops.convert(seq)
        assert type(seq[0]) is normops.nn.BatchNorm2d and type(seq[1]) is not torch.nn.Identity
        seq(x)
    assert len(seen) == 2 and seen[0] < 0  # the BN hook saw the pre-activation output
    # A forward-pre hook on the batch norm sees its input either way: still fused.
    pre = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    pre[0].register_forward_pre_hook(lambda mod, i: None)
    normops.convert(pre)
    assert type(pre[0]) is normops.nn.BatchNormAct2d


def test_convert_fuses_only_where_sequential_runs_its_children_in_order():
    """A Sequential subclass with its own forward may skip the activation;
    fuse_activations=False keeps every pair apart (for code that slices or
    indexes the Sequential between a batch norm and its activation)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)

    class Taps(torch.nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))  # conv and batch norm only

    class Plain(torch.nn.Sequential):  # Sequential's forward: fused
        pass

    taps = Taps(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    plain = Plain(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    ref = taps(x)
    assert ref.min() < 0
    normops.convert(taps)
    normops.convert(plain)
    assert type(taps[1]) is normops.nn.BatchNorm2d and type(taps[2]) is torch.nn.ReLU
    assert_close(taps(x), ref)
    assert type(plain[1]) is normops.nn.BatchNormAct2d and type(plain[2]) is normops.nn.FusedActivation

    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU()).eval()
    ref = seq[:2](x)
    normops.convert(seq, fuse_activations=False)
    assert type(seq[1]) is normops.nn.BatchNorm2d and type(seq[2]) is torch.nn.ReLU
    assert_close(seq[:2](x), ref)


def test_fx_symbolic_trace_records_modules_as_leaves():
    """torch.fx traces torch.nn's norm modules as leaves; normops' modules
    are recorded as one call each, so FX tools (feature extraction, graph
    passes) work on converted models, and the graph runs normops."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    modules = [normops.nn.BatchNorm2d(8), normops.nn.BatchNormAct2d(8, activation="relu6"),
               normops.nn.LayerNorm([5, 5]), normops.nn.GroupNorm(2, 8),
               normops.nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
               normops.nn.SyncBatchNorm(8), normops.nn.InvertedResidual(8, 8, 1, 6)]
    for module in modules:
        for training in (True, False):
            traced_model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), module).train(training)
            eager_model = copy.deepcopy(traced_model)
            graph = torch.fx.symbolic_trace(traced_model)
            assert "_leaf_forward" in graph.code, type(module).__name__
            assert_close(graph(x), eager_model(x))
            for a, b in zip(traced_model.buffers(), eager_model.buffers()):
                assert torch.equal(a, b)


def test_module_subclass_calling_super_forward():
    """A user subclass that overrides forward and calls super().forward runs
    normops' forward, eagerly and in an FX trace."""
    class Scaled(normops.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    x = torch.randn(2, 4, 3, 3)
    ours, ref = Scaled(4), torch.nn.BatchNorm2d(4)
    assert_close(ours(x), ref(x) * 2)
    graph = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity(), Scaled(4)))
    assert_close(graph(x), ref(x) * 2)


def fused_pair_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU6())


def test_fused_activation_returns_when_its_batch_norm_is_swapped_out():
    """Tools that rebuild batch norms by isinstance (torch's
    convert_sync_batchnorm, conv-bn fusion, a hand swap) replace a
    BatchNormAct2d with a plain batch norm: the activation's slot then
    applies the activation again, so the model computes what it did."""
    torch.manual_seed(0)
    ref = fused_pair_model().eval()
    for bn in (ref[1], ref[4]):
        bn.running_mean.normal_()
    x = torch.randn(2, 3, 5, 5)
    expected = ref(x)
    model = normops.convert(copy.deepcopy(ref))
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "BatchNormAct2d", "FusedActivation", "Conv2d", "BatchNormAct2d",
        "FusedActivation"]
    assert not any(m.training for m in model.modules())
    assert_close(model(x), expected)

    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert type(synced[1]) is torch.nn.SyncBatchNorm
    assert_close(synced(x), expected)
    ours_synced = normops.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert ours_synced[1].activation == "relu" and ours_synced[4].activation == "relu6"
    assert_close(ours_synced(x), expected)

    folded = copy.deepcopy(model)
    folded[0] = torch.nn.utils.fusion.fuse_conv_bn_eval(folded[0], folded[1])
    folded[1] = torch.nn.Identity()
    assert_close(folded(x), expected)
    assert_close(model(x), expected)  # the copies' swaps left the original alone
    compiled = torch.compile(synced, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), expected)


def test_lazy_norms_become_normops_modules():
    def make():
        return torch.nn.Sequential(torch.nn.LazyBatchNorm2d(),
                                   torch.nn.LazyInstanceNorm2d(affine=True))
    ref, model = make(), normops.convert(make())
    x = torch.randn(2, 3, 4, 5)
    assert_close(model(x), ref(x))
    assert [type(m) for m in model] == [normops.nn.BatchNorm2d, normops.nn.InstanceNorm2d]
    assert_close(model(x), ref(x))


def test_fused_activation_slots_follow_copies_and_are_freed():
    torch.manual_seed(0)
    ref = fused_pair_model().eval()
    x = torch.randn(2, 3, 5, 5)
    expected = ref(x)
    model = normops.convert(copy.deepcopy(ref))

    def swap_first_norm(m):  # a plain batch norm where the fused one was
        plain = torch.nn.BatchNorm2d(4).eval()
        plain.load_state_dict(m[1].state_dict())
        m[1] = plain
        return m

    # A whole copy links its slots to itself: a swap there shows there only.
    whole = copy.deepcopy(model)
    assert_close(swap_first_norm(whole)(x), expected)
    loaded = torch.load(io.BytesIO(_saved(model)), weights_only=False)
    assert_close(swap_first_norm(loaded)(x), expected)
    assert type(model[1]) is normops.nn.BatchNormAct2d
    assert_close(model(x), expected)
    # A slice copied alone applies the activation again: still right.
    assert_close(copy.deepcopy(model[1:3])(model[0](x)), ref[:3](x))
    # No reference cycle keeps a converted model alive.
    gc.disable()
    try:
        tmp = normops.convert(fused_pair_model())
        alive = weakref.ref(tmp[1])
        del tmp
        assert alive() is None
    finally:
        gc.enable()


def _saved(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()
