"""normops: fused normalization kernels for PyTorch, registered as torch ops
(torch.ops.normops.*) and wrapped in drop-in torch.nn modules."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the op schemas and kernels)
from . import ops  # noqa: F401  (fake kernels, autograd)
from . import functional, models, nn  # noqa: F401
from .convert import convert

__all__ = ["functional", "nn", "models", "convert", "cpu_capability"]
__version__ = "0.1.0"


def cpu_capability() -> str:
    """The CPU kernel build in use: 'avx512', 'avx2' or 'default' (the
    portable fallback). NORMOPS_CPU_CAPABILITY caps it, read at first use."""
    return _C.cpu_capability()
