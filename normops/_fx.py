"""torch.fx symbolic tracing treats torch.nn's norm modules as leaves (one
call_module node): their forwards branch on input sizes and buffer values,
which tracing cannot follow. normops' modules live outside torch.nn, so they
get the same treatment through a wrapped function: tracing records one call
to it and never enters the forward (torchvision's feature extraction, FX
graph passes)."""
import functools
from typing import Callable, Dict

import torch

# Decorated forwards by name: the name, a string, is what the traced call
# carries to find its forward (a subclass may override forward and call
# super().forward, so the module's type does not tell which one).
_FORWARDS: Dict[str, Callable] = {}


def _leaf_forward(module: torch.nn.Module, forward: str, *args, **kwargs):
    return _FORWARDS[forward](module, *args, **kwargs)


torch.fx.wrap("_leaf_forward")


def fx_leaf(forward: Callable) -> Callable:
    """Decorates a module's forward so that FX records it as one call; the
    forward keeps its signature (argument names included)."""
    name = f"{forward.__module__}.{forward.__qualname__}"
    _FORWARDS[name] = forward

    @functools.wraps(forward)
    def leaf(self, *args, **kwargs):
        return _leaf_forward(self, name, *args, **kwargs)

    return leaf
