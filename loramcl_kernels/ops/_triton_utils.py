"""Launch helpers shared by the Triton kernels of every op."""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - the reference backend still works without triton
    triton = None


@functools.lru_cache(maxsize=None)
def device_facts(device: torch.device) -> tuple[int, int]:
    """(number of SMs, major compute capability); CPU (interpreter): (4, 0)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, props.major
    return 4, 0


def set_tma_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need scratch memory from a Triton allocator. Triton keeps it in
    a context variable, so it is set on every launch: the autograd engine runs backward on its own thread."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(alloc)


def cdiv(a: int, b: int) -> int:
    """Plain Python: triton.cdiv called from Python goes through the JIT machinery."""
    return -(-a // b)


def contiguous_or_none(t):
    """t made contiguous (itself when it already is), or None: kernels index vectors such as a bias flat."""
    return None if t is None else t.contiguous()


def next_pow2(n: int) -> int:
    """Plain Python: triton.next_power_of_2 called from Python goes through the JIT machinery."""
    return 1 << max(0, (n - 1).bit_length())


def tma_rows_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need contiguous rows, 16-byte aligned base pointers and row strides."""
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() % 16 or (t.shape[-1] * t.element_size()) % 16:
            return False
    return True


# sm_90 allows 227 KB of shared memory per block; the rest of this budget is room for the
# epilogue's scratch. Launchers size their pipelines (tiles loaded ahead) to fit it.
SHARED_MEMORY_BUDGET = 200 * 1024


if triton is not None:

    @triton.jit
    def grouped_tile(tile, num_pm, num_pn, GM: tl.constexpr):
        """(pm, pn) of tile `tile` of a num_pm x num_pn grid visited in grouped order: GM row tiles
        walk the column tiles together, so each column panel of the right operand stays in L2."""
        group = tile // (GM * num_pn)
        first_m = group * GM
        group_size = min(num_pm - first_m, GM)
        pm = first_m + (tile % (GM * num_pn)) % group_size
        pn = (tile % (GM * num_pn)) // group_size
        return pm, pn

