"""torch.fx symbolic tracing treats torch.nn's norm modules as leaves (one
call_module node): their forwards branch on input sizes and buffer values,
which tracing cannot follow. normops' modules live outside torch.nn, so they
get the same treatment through a wrapped function: tracing records one call
to it and never enters the forward (torchvision's feature extraction, FX
graph passes)."""
import torch


def _leaf_forward(module: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
    return type(module).forward.traced_as_leaf(module, input)


torch.fx.wrap("_leaf_forward")


def fx_leaf(forward):
    """Decorates a module's forward(self, input) so that FX records it as one
    call."""
    def leaf(self, input: torch.Tensor) -> torch.Tensor:
        return _leaf_forward(self, input)

    leaf.traced_as_leaf = forward
    leaf.__doc__, leaf.__name__, leaf.__qualname__ = (
        forward.__doc__, forward.__name__, forward.__qualname__)
    return leaf
