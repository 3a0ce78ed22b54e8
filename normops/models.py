"""Whole networks built from normops modules, with torchvision's exact
module layout and state_dict keys (torchvision is not a dependency): a
torchvision checkpoint loads unchanged."""
from typing import Callable, List, Optional

import torch
from torch import nn

from .convert import fuse_norm_activations
from .inverted_residual import Conv2dNormActivation, InvertedResidual
from .nn import BatchNorm2d

__all__ = ["MobileNetV2", "mobilenet_v2"]


def _make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """torchvision's rounding of channel counts (never more than 10% down)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int,
                   norm_layer: Optional[Callable[..., nn.Module]]) -> Conv2dNormActivation:
    """torchvision's Conv2dNormActivation; with the default norm layer the
    ReLU6 is fused into the batch norm (its slot keeps a FusedActivation)."""
    layer = Conv2dNormActivation(inp, oup, kernel, stride, 1,
                                 BatchNorm2d if norm_layer is None else norm_layer)
    if norm_layer is None:
        fuse_norm_activations(layer, shared=set())
    return layer


class MobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2 with fused inverted residual blocks and
    batch norm + ReLU6 elsewhere."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Optional[List[List[int]]] = None,
                 round_nearest: int = 8, block: Optional[Callable[..., nn.Module]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 dropout: float = 0.2) -> None:
        super().__init__()
        block = InvertedResidual if block is None else block
        input_channel, last_channel = 32, 1280
        if inverted_residual_setting is None:
            inverted_residual_setting = [
                [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                [6, 160, 3, 2], [6, 320, 1, 1],
            ]
        if len(inverted_residual_setting) == 0 or any(
                len(s) != 4 for s in inverted_residual_setting):
            raise ValueError("inverted_residual_setting should be non-empty or a 4-element "
                             f"list, got {inverted_residual_setting}")
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [_conv_bn_relu6(3, input_channel, 3, 2, norm_layer)]
        # torchvision passes the blocks its default norm layer too.
        block_norm = nn.BatchNorm2d if norm_layer is None else norm_layer
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(input_channel, output_channel, s if i == 0 else 1,
                                      expand_ratio=t, norm_layer=block_norm))
                input_channel = output_channel
        features.append(_conv_bn_relu6(input_channel, self.last_channel, 1, 1, norm_layer))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, *, weights=None,
                 progress: bool = True, **kwargs) -> MobileNetV2:
    """MobileNetV2 (Sandler et al., 2018) from normops modules. No weights
    are downloaded (`weights` must be None, `progress` is accepted for
    torchvision's signature): load torchvision's state_dict into it."""
    if weights is not None:
        raise ValueError(
            "normops.models.mobilenet_v2 downloads no weights: build it with weights=None and "
            "load a torchvision mobilenet_v2 state_dict (same keys) with load_state_dict")
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, **kwargs)
