"""How a public op reaches its implementation, and argument checks shared by every op.

Eagerly each op runs through a plain torch.autograd.Function (less host time than the custom-op
dispatcher). While a graph is traced, by torch.compile or on fake tensors (FakeTensorMode, make_fx's
fake and symbolic modes, torch.export), it goes through its registered custom op instead, whose fake
implementation serves the tracer: the eager path would read values on the host, or cache tensors
made by the tracer. Other dispatch modes (FlopCounterMode, memory trackers) see the eager path's
torch ops, as they would see PyTorch's own.
"""
from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def tracing() -> bool:
    """True inside torch.compile or under a FakeTensorMode."""
    return torch.compiler.is_compiling() or (is_in_torch_dispatch_mode() and detect_fake_mode() is not None)


def refuse_functorch_transforms(op: str) -> None:
    """torch.func transforms (vmap, grad, jacrev, functionalize) cannot see through the Triton
    kernels or the eager autograd.Function: a clear error instead of one from inside PyTorch."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise NotImplementedError(f"{op}: torch.func transforms (vmap, grad, jacrev, functionalize) are not "
                                  f"supported; call it on plain tensors (torch.compile is supported)")


def refuse_double_backward(op: str) -> None:
    """Called first in an eager backward: grad mode is on there only under create_graph=True,
    and the backward formulas are not differentiable, so a gradient with a graph would lack the
    op's part of it (silently zero in a gradient penalty)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported: the backward "
                           f"is not differentiable")


def check_flag(value, name: str) -> bool:
    """A bool (True / False, 1 / 0, a numpy bool): a string such as "no" or "False" is refused, not
    taken as True."""
    if isinstance(value, (str, bytes)) or value not in (True, False):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)
