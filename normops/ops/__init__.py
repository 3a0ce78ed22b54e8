"""Python registrations of the normops ops (fake kernels, autograd), one
module per op family. torch.ops.normops.* is the op namespace itself."""
from . import batch_norm, depthwise_conv, group_norm, inverted_residual, layer_norm  # noqa: F401
