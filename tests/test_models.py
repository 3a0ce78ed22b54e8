"""Whole models, converted with normops.convert and compiled with
torch.compile(fullgraph=True) through inductor: no graph break, and the same
training steps (outputs, gradients, running statistics) as the eager torch.nn
model."""
import copy

import torch
from torch import nn

import normops
from helpers import assert_close, step_and_compare

TOL = dict(rtol=1e-4, atol=1e-4)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (attribute names included)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """torchvision's ResNet layout at toy widths."""

    def __init__(self, widths=(8, 16), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0]))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TransformerBlock(nn.Module):
    """A pre-norm transformer encoder block."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _train_and_compare(ref, make_input, steps=2):
    torch._dynamo.reset()
    ours = normops.convert(copy.deepcopy(ref))
    assert not any(type(m) in (nn.BatchNorm2d, nn.LayerNorm) for m in ours.modules())
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(steps):
        step_and_compare(compiled, ref, make_input(), steps=1, **TOL)
    ref.eval(), ours.eval()
    x = make_input()
    with torch.no_grad():
        assert_close(compiled(x), ref(x), **TOL)


def test_resnet_converted_and_compiled_trains_as_eager():
    torch.manual_seed(0)
    _train_and_compare(
        TinyResNet(),
        lambda: torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last))


def test_transformer_block_converted_and_compiled_trains_as_eager():
    torch.manual_seed(0)
    _train_and_compare(TransformerBlock(), lambda: torch.randn(2, 7, 32))
