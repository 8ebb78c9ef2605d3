"""`python -m loramcl_kernels.env`: versions, devices, and which backends can run where."""
from __future__ import annotations

import os
import platform

import torch

from loramcl_kernels import __version__
from loramcl_kernels._backend import BACKENDS, resolve_backend, triton_interpreting, unavailable_reason


def describe() -> str:
    lines = [f"loramcl_kernels {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if triton_interpreting() else ""))
    except Exception as exc:  # pragma: no cover - depends on the install
        lines.append(f"triton: not importable ({type(exc).__name__})")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                         f"{props.total_memory / 2**30:.1f} GiB")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("CUDA: no device visible")
    for device in devices:
        lines.append(f"[{device}] auto -> {resolve_backend('auto', device)}")
        for backend in BACKENDS[1:]:
            reason = unavailable_reason(backend, device)
            lines.append(f"[{device}]   {backend:<9} " + ("available" if reason is None else f"unavailable: {reason}"))
    lines.append("switches (environment, 'auto' when unset): " + ", ".join(
        f"{name}={os.environ.get(name, 'auto')}" for name in SWITCHES))
    return "\n".join(lines)


# The environment variables that choose a backend or a kernel path (README, "Environment switches").
SWITCHES = ("LORAMCL_BACKEND", "LORAMCL_MULTI_LORA_PATH", "LORAMCL_MCL_PASS1", "LORAMCL_MCL_PASS2",
            "LORAMCL_MCL_SOFT_BACKWARD", "LORAMCL_TRITON_LAUNCH")


if __name__ == "__main__":
    print(describe())
