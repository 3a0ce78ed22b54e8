"""Helpers shared by the op registrations: output layouts and dtypes of the
kernels (for the fake kernels), device checks, the double-backward path.

They mirror csrc/channel_view.h: an (N, C, *) input that is contiguous or
channels_last-dense is used as it is and its output has its strides; any other
input is copied first into the layout torch suggests for it (channels_last for
a sliced channels_last tensor, else contiguous).
"""
import contextlib

import torch
from torch._prims_common import suggest_memory_format


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the statistics: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last_dense(x: torch.Tensor) -> bool:
    """channels_last / channels_last_3d, also for size-1 dims' strides."""
    if x.dim() < 4:
        return False
    C = x.size(1)
    if C != 1 and x.stride(1) != 1:
        return False
    expected = C
    for d in range(x.dim() - 1, 1, -1):
        if x.size(d) != 1 and x.stride(d) != expected:
            return False
        expected *= x.size(d)
    return x.size(0) == 1 or x.stride(0) == expected


def channels_last_output(x: torch.Tensor) -> bool:
    """Whether a 4-D input's kernels (depthwise convolution, inverted
    residual) write a channels_last output: a channels_last input, or one
    whose strides torch reads as channels_last (a sliced one); contiguous
    otherwise."""
    return not x.is_contiguous() and (
        is_channels_last_dense(x) or suggest_memory_format(x) == torch.channels_last)


def empty_like_channels(x: torch.Tensor) -> torch.Tensor:
    """The output the kernels allocate for an (N, C, *) input."""
    if x.is_contiguous() or is_channels_last_dense(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


def empty_stats(x: torch.Tensor, *shape) -> torch.Tensor:
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


def empty_param_grad(x, param, wanted, shape):
    """A parameter gradient: `shape` when wanted, else 0 elements; the
    parameter's dtype, or the input's when it is absent."""
    dtype = param.dtype if param is not None else x.dtype
    return x.new_empty(shape if wanted else (0,), dtype=dtype)


def records_graph(*tensors) -> bool:
    """True when autograd records a graph through an op on these arguments:
    grad enabled and one of them a tensor requiring grad (other arguments,
    None included, are passed over)."""
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors)


def needs_double_backward(*tensors) -> bool:
    """In a backward: True when the backward itself is being differentiated
    (create_graph)."""
    return records_graph(*tensors)


def check_devices(op: str, input: torch.Tensor, **tensors) -> None:
    """The kernels' device check, in the fake kernels too (a meta tensor
    beside a real one dispatches to the fake)."""
    for name, t in tensors.items():
        torch._check(
            t is None or t.device == input.device,
            lambda: f"{op}: expected {name} to be on the same device as input "
                    f"({input.device}), but got {t.device}")


def torch_grads(forward, inputs, needs, grad_out, create_graph=True):
    """Gradients of forward(*inputs) for the inputs marked in `needs`, through
    torch's differentiable ops, by default with create_graph=True: the
    double-backward path (gradient penalties)."""
    wanted = [t for t, n in zip(inputs, needs) if n]
    with torch.enable_grad():
        found = iter(torch.autograd.grad(forward(*inputs), wanted, grad_out,
                                         create_graph=create_graph))
    return [next(found) if n else None for n in needs]


def affine_norm_backward(ctx, grad_out, reference, kernel):
    """The backward of an op (input, arg, weight, bias, eps) -> (out, mean,
    rstd), as layer and group norm are: the normops kernel
    kernel(grad_out, input, mean, rstd, weight, bias, needs), or the torch
    reference forward when the backward itself is differentiated."""
    input, weight, bias, mean, rstd = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 2, 3)]
    if needs_double_backward(grad_out, input, weight, bias):
        grads = torch_grads(reference, (input, weight, bias), needs, grad_out)
    else:
        grads = kernel(grad_out, input, mean, rstd, weight, bias, needs)
        grads = [g if n else None for g, n in zip(grads, needs)]
    return grads[0], None, grads[1], grads[2], None


def below_autograd(*tensors):
    """The context for op calls that record no graph (grad disabled, or no
    tensor requiring grad), in eager mode: the ops then dispatch straight to
    their kernels instead of through torch.library's Python autograd wrapper,
    which costs about 10 us a call. Elsewhere (a graph to record, or
    torch.compile tracing) a no-op."""
    if torch.compiler.is_compiling() or records_graph(*tensors):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


# Each op's registered backward and setup_context again as an
# autograd.Function, for `call`.
_EAGER_FUNCTIONS = {}


def register_autograd(op, backward, setup_context) -> None:
    """torch.library.register_autograd for `op` (an OpOverloadPacket of
    torch.ops.normops), and the same two functions as an autograd.Function
    that `call` applies in eager mode."""
    torch.library.register_autograd(op._qualified_op_name, backward,
                                    setup_context=setup_context)
    overload = op.default

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = overload(*args)
        setup_context(ctx, args, output)
        return output

    _EAGER_FUNCTIONS[op] = type(f"{op._qualified_op_name.replace('::', '_')}_eager",
                                (torch.autograd.Function,),
                                {"forward": staticmethod(forward),
                                 "backward": staticmethod(backward)})


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_rule_applies(op, device_type: str) -> bool:
    """Whether autocast is on for device_type and casts for `op` there: it
    has an autocast kernel for the device (an unknown device counts as
    having one)."""
    if not (torch.amp.is_autocast_available(device_type)  # meta has none (and raises)
            and torch.is_autocast_enabled(device_type)):
        return False
    key = _AUTOCAST_KEYS.get(device_type)
    return key is None or torch._C._dispatch_has_kernel_for_dispatch_key(
        op._qualified_op_name, key)


def call(op, *args):
    """op(*args), every schema argument given positionally, the input tensor
    first, the way the Python layer calls the ops. In eager mode with a graph
    to record, through the op's autograd.Function from `register_autograd`:
    torch.library's wrapper re-fills the schema defaults and redispatches in
    Python on every call (a batch-norm forward+backward of a tiny tensor: 116
    us through the wrapper, 80 us through the Function). With no graph to
    record, straight to the kernel. While tracing (torch.compile,
    torch.export, torch.jit.trace: a graph records the op, not a Python
    Function) and where autocast casts the op's inputs (the wrapper saves
    the cast ones), the op as it is."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (torch._C._is_any_autocast_enabled()
                and autocast_rule_applies(op, args[0].device.type))):
        return op.default(*args)
    if records_graph(*args):
        return _EAGER_FUNCTIONS[op].apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op.default(*args)
