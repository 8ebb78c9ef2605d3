"""Helpers shared by the benchmark scripts: timing, peak memory, the card's name, JSON output.

On a GPU, times are medians of CUDA-event timings (triton.testing.do_bench). Without a GPU the
scripts run a small, labelled CPU smoke run of the same tables with wall-clock medians.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time

import torch

HAS_CUDA = torch.cuda.is_available()


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}), smoke run, no GPU"


def time_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 3) -> float:
    """Median milliseconds per call of fn()."""
    if HAS_CUDA:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def wall_ms(fn, *, warmup: int, reps: int):
    """(median wall milliseconds of fn(), fn's last result), the device synchronised around each
    call: for whole steps (a training step, a generate call) that do_bench's repetitions would not fit."""
    times, result = [], None
    for i in range(warmup + reps):
        if HAS_CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def peak_extra_gib(fn) -> float:
    """Peak memory fn() allocates above what was allocated before it (GPU only; NaN on CPU)."""
    if not HAS_CUDA:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def _json_safe(value):
    """NaN and infinities as null (strict JSON has neither), through dicts and lists."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(rows: list[dict], path: str, meta: dict) -> None:
    """Written again after each table or regime, so that a run cut short keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe({"meta": meta, "rows": rows}), f, indent=1)


def error_chain(exc: BaseException) -> str:
    """An exception and what it was raised during or from: a failed CUDA-graph capture reports
    "operation failed due to a previous error during capture", and the first error is its context."""
    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def run_meta() -> dict:
    meta = {"device": device_name(), "torch": torch.__version__, "cuda": HAS_CUDA}
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        pass
    return meta


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row) + " |")


_CAPTURE_STREAM = None


def time_interpreter_us(fn) -> float:
    """Microseconds of one call on the CPU (a sweep's smoke run under the Triton interpreter)."""
    return 1e3 * time_ms(fn, cpu_reps=1)


def time_graph_us(fn, *, replays: int = 200) -> float:
    """Mean microseconds per replay of fn() captured in a CUDA graph: GPU time without the host's
    launch overhead (NaN on CPU). fn must already be warmed up (compiled, autotuned)."""
    global _CAPTURE_STREAM
    if not HAS_CUDA:
        return float("nan")
    # one side stream, warmed up by fn() and then captured on: what fn's libraries set up lazily per
    # stream (cuBLAS workspaces) exists before the capture instead of being made inside it
    if _CAPTURE_STREAM is None:
        _CAPTURE_STREAM = torch.cuda.Stream()
    stream = _CAPTURE_STREAM
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    generator_state = generator.clone_state()
    caller_stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, stream=stream):
            fn()
    except BaseException:
        # a capture that fails midway leaves the CUDA generator in capture mode, and every later
        # random draw on the device raises: put back its state from before the capture; torch's
        # graph context also skips restoring the caller's stream when the capture fails
        generator.graphsafe_set_state(generator_state)
        torch.cuda.set_stream(caller_stream)
        torch.cuda.synchronize()
        raise
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def fmt_gib(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


def host_us(fn, *, calls: int = 20) -> float:
    """Microseconds the host spends per call of fn() to enqueue its GPU work (NaN on CPU).

    The GPU is drained first, then `calls` calls are enqueued back to back and the wall time is
    read before synchronizing: when that exceeds the GPU time per call, the host is the bottleneck.
    fn must not sync with the host and must be warmed up.
    """
    if not HAS_CUDA:
        return float("nan")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e6 / calls


@contextlib.contextmanager
def module_attrs(module, **values):
    """Set attributes of a module (a launcher's tile constants or config function) for the block,
    then put back the values they had: how the sweeps try configurations other than auto's."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def sweep_row(first_cells: str, measured_cells, empty_cells: int) -> None:
    """Print one markdown row of a sweep: first_cells, then measured_cells() (a string of cells).
    A configuration that raises (does not fit, does not compile) is a row too: its error takes the
    measured cells' place, followed by empty_cells empty cells."""
    try:
        print(f"| {first_cells} | {measured_cells()} |", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"| {first_cells} | error: {str(exc)[:120]} |" + " |" * empty_cells, flush=True)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Set (or, with None, unset) an environment variable for the duration of the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

