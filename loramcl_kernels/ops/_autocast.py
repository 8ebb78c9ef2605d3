"""Autocast for every op: as for F.linear, each floating operand but float64 ones runs in the
autocast dtype, and the op itself runs with autocast off, so that its fp32 accumulation and
statistics stay fp32."""
from __future__ import annotations

import contextlib

import torch


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


def _autocast_eligible(t) -> bool:
    """What autocast casts: floating tensors other than float64 (as F.linear does)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def autocast_operands(device: torch.device, *tensors):
    """The tensors cast to `device`'s autocast dtype (None, non-floating and float64 ones
    unchanged), or None when autocast is off there or nothing is eligible."""
    if not autocast_enabled(device.type) or not any(_autocast_eligible(t) for t in tensors):
        return None
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if _autocast_eligible(t) else t for t in tensors)


def autocast_off(device: torch.device):
    """A context without autocast on `device` (a no-op context when it is off already); backward
    passes called inside an autocast region run in it too."""
    if autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
