"""Helpers shared by the tests: device markers and the error-budget comparison.

The quality bar: a kernel's error against an fp64 oracle may be at most 2x the error of plain
PyTorch computing the same thing in the same dtype, plus a small absolute tolerance.
"""
import weakref

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# Triton kernels: on GPU natively, on CPU through the interpreter (set in conftest.py).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def max_abs_err(value: torch.Tensor, oracle: torch.Tensor) -> float:
    return (value.double() - oracle.double()).abs().max().item()


def assert_within_budget(value, oracle, plain, *, factor=2.0, atol=1e-5, name="value"):
    """|value - oracle| <= factor * |plain - oracle| + atol, measured as max abs errors.

    `oracle` is the fp64 result; `plain` is plain PyTorch in the dtype under test.
    """
    assert torch.isfinite(value).all(), f"{name}: non-finite values"
    err = max_abs_err(value, oracle)
    budget = factor * max_abs_err(plain, oracle) + atol
    assert err <= budget, f"{name}: error {err:.3e} exceeds budget {budget:.3e}"


class CountingKernel:
    """A Triton kernel whose launches (kernel[grid](...)) are recorded by name in `launches`;
    `launch` sends such a stand-in through kernel[grid] rather than its direct path."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


class ZerosRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every zero-filled tensor made while it is active (aten.zeros, zero_)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("zeros", "zero_", "zeros_like", "new_zeros"):
            self.shapes.append(tuple(out.shape))
        return out


class AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (numel, dtype) of every tensor an allocating op makes while it is active."""

    ALLOCATING = ("empty", "empty_strided", "zeros", "full", "empty_like", "zeros_like", "new_empty", "new_zeros")

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.ALLOCATING:
            self.made.append((out.numel(), out.dtype))
        return out


class PeakBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages made while it is active and still alive (a model of a device's
    allocator on meta tensors: views and out= results share their input's storage and count
    nothing; a storage counts until it is freed). Storages made before it count nothing, even
    when freed inside."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked = set()

    def _track(self, storage):
        key = id(storage)
        if key in self._tracked:
            return
        nbytes = storage.nbytes()
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(key=key, nbytes=nbytes):
            self.live -= nbytes
            self._tracked.discard(key)

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self._track(t.untyped_storage())
        return out


# Tensor methods that read a tensor's values on the host (a device sync on a GPU)
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def emulate_fp32_output_gemms(monkeypatch, *modules):
    """torch.mm / torch.addmm with out_dtype=float32 on the CPU (CUDA has them; the CPU does not),
    emulated by fp32 products, and each module told it has them (its _mm_out_dtype_supported and,
    where it has one, _addmm_out_dtype_supported): the paths that need them run on the CPU."""
    real_mm, real_addmm = torch.mm, torch.addmm

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        return real_mm(a.to(out_dtype), b.to(out_dtype), out=out)

    def addmm(c, a, b, *, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return real_addmm(c, a, b, out=out, **kw) if out is not None else real_addmm(c, a, b, **kw)
        return real_addmm(c.to(out_dtype), a.to(out_dtype), b.to(out_dtype), out=out, **kw)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    for module in modules:
        for name in ("_mm_out_dtype_supported", "_addmm_out_dtype_supported"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda device: True)
