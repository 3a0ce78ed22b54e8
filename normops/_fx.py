"""torch.fx symbolic tracing treats torch.nn's norm modules as leaves (one
call_module node): their forwards branch on input sizes and buffer values,
which tracing cannot follow. normops' modules live outside torch.nn, so they
get the same treatment through a wrapped function: tracing records one call
to it and never enters the forward (torchvision's feature extraction, FX
graph passes)."""
from typing import Callable, Dict

import torch

# Decorated forwards by name: the name, a string, is what the traced call
# carries to find its forward (a subclass may override forward and call
# super().forward, so the module's type does not tell which one).
_FORWARDS: Dict[str, Callable] = {}


def _leaf_forward(module: torch.nn.Module, input: torch.Tensor, forward: str) -> torch.Tensor:
    return _FORWARDS[forward](module, input)


torch.fx.wrap("_leaf_forward")


def fx_leaf(forward: Callable) -> Callable:
    """Decorates a module's forward(self, input) so that FX records it as one
    call."""
    name = f"{forward.__module__}.{forward.__qualname__}"
    _FORWARDS[name] = forward

    def leaf(self, input: torch.Tensor) -> torch.Tensor:
        return _leaf_forward(self, input, name)

    leaf.__doc__, leaf.__name__, leaf.__qualname__ = (
        forward.__doc__, forward.__name__, forward.__qualname__)
    return leaf
