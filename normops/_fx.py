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


def refuse_script(module: torch.nn.Module):
    """__prepare_scriptable__ of the normops modules: torch.jit.script cannot
    compile their forwards (Python dispatch, custom autograd), and without
    this its error named a line of this file."""
    raise RuntimeError(
        f"{type(module).__name__} (normops) cannot be compiled by torch.jit.script: use "
        "torch.compile, torch.export or torch.jit.trace, or script the model before "
        "normops.convert")
