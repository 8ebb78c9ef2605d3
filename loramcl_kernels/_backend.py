"""Backend selection shared by every op.

Backends:
  reference  pure PyTorch with fp32 accumulation; any device; the oracle and the CPU path.
  triton     Triton kernels; CUDA devices, or CPU tensors when TRITON_INTERPRET=1 (tests).
  cuda       CUDA C++ kernels from csrc/ built as a torch extension (not built in this release).

Selection order: the op's `backend=` argument, else the environment variable LORAMCL_BACKEND,
else "auto". "auto" picks the fastest backend that can run on the tensors' device and falls back
silently; an explicitly requested backend that cannot run raises a RuntimeError saying why.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_triton_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton does not import: {type(exc).__name__}: {exc}"
    return None


_TRITON_IMPORT_ERROR = _import_triton_error()


# Triton's NVIDIA backend supports compute capability 8.0 and newer (A100, RTX 30xx and later):
# on older GPUs (V100, T4) auto keeps the PyTorch reference.
MIN_TRITON_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple[int, int] | None:
    """(major, minor) of CUDA device `index` (None: the current one); None where torch cannot tell
    (no CUDA in this process): then the device type alone decides."""
    try:
        return tuple(torch.cuda.get_device_capability(index))
    except Exception:
        return None


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when Triton kernels can run on `device` (on `dtype` tensors, where given), else a
    sentence saying why not. Triton's CPU interpreter multiplies bf16 tiles wrongly (numpy has no
    bfloat16; with triton 3.9 a 16 x 16 bf16 tl.dot is off by ~1e10), so bf16 runs on GPUs only."""
    err = _TRITON_IMPORT_ERROR
    if err is not None:
        return err
    if device.type == "cuda":
        capability = _cuda_capability(device.index)
        if capability is not None and capability < MIN_TRITON_CAPABILITY:
            return (f"Triton supports NVIDIA GPUs of compute capability {MIN_TRITON_CAPABILITY[0]}."
                    f"{MIN_TRITON_CAPABILITY[1]} and newer; {device} has {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu":
        if not triton_interpreting():
            return "Triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing"
        if dtype == torch.bfloat16:
            return ("Triton's CPU interpreter computes bf16 matrix products wrongly (numpy has no bfloat16): "
                    "run bf16 on a GPU, fp16 or fp32 under the interpreter, or backend='reference'")
        return None
    return f"Triton kernels do not run on device type '{device.type}'"


def cuda_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA C++ backend needs CUDA tensors, got device '{device}'"
    return "the CUDA C++ extension (csrc/) is not built in this release of loramcl_kernels"


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    if backend == "reference":
        return None
    if backend == "triton":
        return triton_unavailable_reason(device, dtype)
    if backend == "cuda":
        return cuda_unavailable_reason(device)
    raise ValueError(f"unknown backend '{backend}'; expected one of {BACKENDS}")


def requested_backend(backend: str | None) -> str:
    """The backend asked for, lower case: the argument, else env LORAMCL_BACKEND, else 'auto'."""
    if backend is None:
        backend = os.environ.get("LORAMCL_BACKEND", "auto") or "auto"
    return backend.lower()


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend ('triton', 'cuda' or 'reference') an op runs with on `device` (on
    `dtype` tensors, where given)."""
    backend = requested_backend(backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got '{backend}'")
    if backend == "auto":
        # On CPU the interpreter is far slower than PyTorch: auto keeps CPU users on the reference.
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if unavailable_reason(candidate, device, dtype) is None:
                    return candidate
        return "reference"
    reason = unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend '{backend}' was requested but cannot run: {reason}")
    return backend
