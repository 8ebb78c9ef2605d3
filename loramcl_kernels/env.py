"""`python -m loramcl_kernels.env`: versions, devices, and which backends can run where."""
from __future__ import annotations

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
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
