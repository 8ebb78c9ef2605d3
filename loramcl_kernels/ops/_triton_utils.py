"""Launch helpers shared by the Triton kernels of every op."""
from __future__ import annotations

import functools
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
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


# ---------------------------------------------------------------------------------------------
# launch(kernel, grid, *args, **kwargs): kernel[grid](*args, **kwargs) with less host time.
#
# Through Triton's JIT every launch binds and specialises each argument and builds the cache key,
# and an autotuned kernel builds the autotuner's key too: on the dev CPU about 16 us of host time
# per launch, about 55 us through the autotuner, more than several of these kernels take on the
# GPU. `launch` does that once per key of its own and then calls the compiled kernel's launcher.
# Its key: each tensor's dtype and address modulo 16, each int's (== 1, % 16 == 0, int32 range,
# below 2^63), floats as floats, other values (None, bools) themselves, the keyword arguments,
# the current device and, for an autotuned kernel, the exact values of the autotuner's key
# arguments. Everything Triton's specialisation key sees (tensors: dtype, 16-byte alignment; ints:
# == 1, % 16, i32 / i64 / u64; floats: fp32) and everything the autotuner's key sees is a function
# of it, so a hit launches the very compiled kernel (and config) Triton would, with the same
# arguments; a miss launches through Triton and records what it launched.
# Assumed fixed for the process, as Triton's own cache assumes: its runtime knobs (debug,
# instrumentation) and the kernels' global constants. A callable grid sees only the keyword
# arguments and the autotuned config (meta["BM"], ...), not the positional arguments.
# LORAMCL_TRITON_LAUNCH=triton launches every time through Triton.
# ---------------------------------------------------------------------------------------------

LAUNCH_MODES = ("auto", "direct", "triton")
_LAUNCHES: dict = {}  # key -> (compiled kernel, values of the parameters after args, meta for a callable grid)
_MAX_LAUNCHES = 4096  # distinct keys kept; past it the cache starts over
_I32 = range(-2**31, 2**31)


class _IntKeys(dict):
    """int -> what Triton's specialisation sees of it (refined), computed once per value."""

    def __missing__(self, value: int):
        key = (int, 1) if value == 1 else (int, value & 15 == 0, value in _I32, value < 2**63)
        if len(self) < _MAX_LAUNCHES:
            self[value] = key
        return key


_INT_KEYS = _IntKeys()
# a miss reads the autotuner's best_config after launching: no other thread may tune in between
# (autograd runs the backward on its own thread)
_RECORD_LOCK = threading.Lock()
_TUNED_POSITIONS: dict = {}  # autotuned kernel -> positions of its key arguments


def _direct_launch_on() -> bool:
    mode = os.environ.get("LORAMCL_TRITON_LAUNCH", "auto").lower()
    if mode not in LAUNCH_MODES:
        raise ValueError(f"LORAMCL_TRITON_LAUNCH must be one of {LAUNCH_MODES}, got '{mode}'")
    return mode != "triton"


def _jit_function(kernel) -> "JITFunction":
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _compiled_kernel(kernel) -> bool:
    """False under the interpreter: its kernels (InterpretedFunction) run through Triton only."""
    while isinstance(kernel, Autotuner):
        kernel = kernel.fn
    return isinstance(kernel, JITFunction)


def _tuned_positions(kernel) -> tuple:
    positions = _TUNED_POSITIONS.get(kernel)
    if positions is None:
        names = _jit_function(kernel).arg_names
        positions = _TUNED_POSITIONS[kernel] = tuple(names.index(name) for name in kernel.keys)
    return positions


def _record_launch(kernel, grid, args, kwargs):
    """Launch through Triton; -> (compiled kernel, values of the parameters after args, grid meta)."""
    compiled = kernel[grid](*args, **kwargs)
    config = {}
    if isinstance(kernel, Autotuner):
        assert kernel.best_config.pre_hook is None, "launch() does not run autotuner pre-hooks"
        config = kernel.best_config.all_kwargs()
    named = {**config, **kwargs}
    tail = tuple(named[p.name] if p.name in named else p.default for p in _jit_function(kernel).params[len(args):])
    return compiled, tail, named


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) for a @triton.jit or triton.autotune kernel (see above)."""
    if not (_direct_launch_on() and _compiled_kernel(kernel)):
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    arg_keys = tuple([_INT_KEYS[a] if a.__class__ is int else (a.dtype, a.data_ptr() & 15)
                      if isinstance(a, torch.Tensor) else float if a.__class__ is float else a for a in args])
    key = (id(kernel), device, arg_keys, tuple(kwargs.items()))  # the kernels are module globals
    if isinstance(kernel, Autotuner):
        key += tuple(args[i] for i in _tuned_positions(kernel) if i < len(args))  # the others are in kwargs
    entry = _LAUNCHES.get(key)
    if entry is None:
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        with _RECORD_LOCK:
            entry = _record_launch(kernel, grid, args, kwargs)
        if entry[0] is not None:
            _LAUNCHES[key] = entry
        return
    compiled, tail, meta = entry
    if callable(grid):
        grid = grid(meta)
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    stream = driver.active.get_current_stream(device)
    values = (*args, *tail)
    enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    # Triton builds the launch metadata for its enter hooks (profilers); none are registered by default
    hooked = enter_hook is not None and getattr(enter_hook, "calls", True)
    launch_metadata = compiled.launch_metadata(grid, stream, *values) if hooked else None
    compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *values)


def on_input_device(fn):
    """Run fn(first, ...) with first's CUDA device current: Triton launches on the current device,
    while a model spread over several GPUs in one process (HF device_map="auto") calls layers
    whose tensors live on another one."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        device = first.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return run


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


H100_SHARED_MEMORY = 232448  # the most shared memory one block may use on sm_90 (227 KB)
# Kept free for a kernel's scratch beyond its pipelined tiles (layout conversions, reductions).
SHARED_MEMORY_SCRATCH = 27 * 1024


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device: torch.device) -> int:
    """The most shared memory one block may use on `device` (CUDA's opt-in limit): 227 KB on
    H100/H200, 163 KB on A100, 99 KB on consumer Ampere/Ada/Blackwell cards (sm_86/89/120).
    Other devices (the interpreter; the compile check on meta tensors): the H100's."""
    if device.type != "cuda":
        return H100_SHARED_MEMORY
    try:
        return int(driver.active.utils.get_device_properties(device.index if device.index is not None
                                                                   else torch.cuda.current_device())["max_shared_mem"])
    except Exception:  # pragma: no cover - a Triton without this query: per SM less the 1 KB CUDA reserves
        return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor - 1024


def hopper_shared_memory(device: torch.device) -> bool:
    """Does one block get the H100's 227 KB of shared memory on `device`? The persistent TMA GEMMs'
    tile configurations were chosen on sm_90 and take up to 192 KB (tests/sm90_compile.py);
    consumer Blackwell (sm_120, 99 KB) has TMA but not that room, so their callers take the
    cuBLAS paths there."""
    return shared_memory_per_block(device) >= H100_SHARED_MEMORY


def tma_gemm_capable(device: torch.device, capability: int) -> bool:
    """Can the persistent TMA-descriptor GEMMs of both ops run on `device` of compute capability
    `capability` (device_facts)? TMA needs Hopper or later, their tiles the H100's shared memory."""
    return capability >= 9 and hopper_shared_memory(device)


def shared_memory_budget(device: torch.device) -> int:
    """Bytes of pipelined tiles (tiles loaded ahead) a launcher may plan for on `device`: the
    per-block limit less room for the kernel's scratch (200 KB on sm_90, 72 KB on 99 KB cards)."""
    return shared_memory_per_block(device) - SHARED_MEMORY_SCRATCH


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


# fp32-output GEMMs of 16-bit operands (torch.mm / addmm with out_dtype): probed once per device
_PROBES: dict = {}


def _probe_once(name: str, device: torch.device, run) -> bool:
    """One cached try per (name, device) of run(device) -> bool; CUDA only, an error means no.
    During CUDA-graph capture it answers no without trying or caching: the try reads its result on
    the host, which would invalidate the capture; a later eager call probes."""
    key = (name, str(device))
    if key not in _PROBES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        ok = False
        if device.type == "cuda":
            try:
                ok = bool(run(device))
            except Exception:
                ok = False
        _PROBES[key] = ok
    return _PROBES[key]


def _probe_mm(device):
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    out = torch.empty(16, 16, dtype=torch.float32, device=device)
    torch.mm(a, a, out_dtype=torch.float32, out=out)
    return out[0, 0] == 16.0


def _probe_addmm(device):
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    c = torch.ones(16, 16, dtype=torch.float32, device=device)
    torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    return (c == 17.0).all()


def mm_out_dtype_supported(device: torch.device) -> bool:
    """Does torch.mm(a, b, out_dtype=float32) run for 16-bit operands on this device (CUDA)?"""
    return _probe_once("mm", device, _probe_mm)


def addmm_out_dtype_supported(device: torch.device) -> bool:
    """Does torch.addmm(c, a, b, out_dtype=float32, out=c) add 16-bit a @ b into fp32 c in place (CUDA)?"""
    return _probe_once("addmm", device, _probe_addmm)
