"""Autocast for every op: as for F.linear, each floating operand runs in the autocast dtype, and
the op itself runs with autocast off, so that its fp32 accumulation and statistics stay fp32."""
from __future__ import annotations

import contextlib

import torch


def autocast_operands(device: torch.device, *tensors):
    """The tensors cast to `device`'s autocast dtype (None and non-floating ones unchanged), or
    None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def autocast_off(device: torch.device):
    """A context without autocast on `device` (a no-op context when it is off already); backward
    passes called inside an autocast region run in it too."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
