"""ops/_triton_utils.py: launch() launches what Triton's own launch would (tests/launch_check.py,
in a process without the interpreter), and its switch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from loramcl_kernels.ops import _triton_utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_launch_matches_tritons_own_launch_on_every_launcher():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORAMCL_TRITON_LAUNCH")}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "launch_check.py")], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["mismatch_count"] == 0
    launches = summary["launches"]
    assert len(set(launches.values())) == 1 and launches["triton"] >= 130
    # the second run through launch() never went through Triton: every launch was a cache hit
    assert summary["recorded_through_triton"]["direct, misses"] == summary["compiled_variants"]
    assert summary["recorded_through_triton"]["direct, hits"] == 0
    assert summary["cache_entries_at_end"] <= 7
    # every kernel of both ops, and autotuned launches whose config (grid) changes with M
    assert len(summary["kernels"]) == 14 and len(summary["autotuned_grids"]) >= 4
    # the fused GEMM tunes once per power of two of rows: M = 3900 and 3901 share one tuning
    assert summary["autotuner_m_buckets"] == [1, 64, 4096]


def test_launch_switch(monkeypatch):
    monkeypatch.setenv("LORAMCL_TRITON_LAUNCH", "sometimes")
    with pytest.raises(ValueError, match="LORAMCL_TRITON_LAUNCH"):
        _triton_utils._direct_launch_on()
    monkeypatch.setenv("LORAMCL_TRITON_LAUNCH", "direct")
    assert _triton_utils._direct_launch_on()
    monkeypatch.setenv("LORAMCL_TRITON_LAUNCH", "triton")
    assert not _triton_utils._direct_launch_on()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's kernels")
def test_interpreted_kernels_launch_through_triton():
    from loramcl_kernels.ops import mcl_loss, multi_lora_linear

    for kernel in (multi_lora_linear._shrink_kernel, multi_lora_linear._gemm_kernel, mcl_loss._lse_chunk_kernel):
        assert not _triton_utils._compiled_kernel(kernel)


def test_on_input_device_makes_the_first_arguments_gpu_current(monkeypatch):
    """Triton launches on the current device: the ops' Triton implementations switch to their
    input's GPU when it is another one (a model spread over GPUs), and only then."""
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class OnGpu:
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    seen = []
    run = _triton_utils.on_input_device(lambda first, second, key=None: seen.append((first, second, key)) or "out")
    gpu1 = OnGpu(1)
    assert run(gpu1, 2, key=3) == "out" and seen[-1] == (gpu1, 2, 3)
    assert entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert run(OnGpu(0), 2) == "out" and run(torch.zeros(1), 2) == "out"
    assert entered == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_ops_on_a_second_gpu_while_the_first_is_current():
    from loramcl_kernels import mcl_loss, multi_lora_linear

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 8, 64, generator=g), torch.randn(32, 64, generator=g) / 8
    a, b = torch.randn(3, 4, 64, generator=g) / 8, torch.randn(3, 32, 4, generator=g)
    expected = multi_lora_linear(x, w, None, a, b, 2.0, backend="reference")
    got = multi_lora_linear(*(t.to(dev) for t in (x, w)), None, *(t.to(dev) for t in (a, b)), 2.0, backend="triton")
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    labels = torch.randint(0, 32, (2, 8), generator=g)
    expected = mcl_loss(x, w, labels, num_hypotheses=3, backend="reference").nll
    got = mcl_loss(x.to(dev), w.to(dev), labels.to(dev), num_hypotheses=3, backend="triton").nll
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_probes_answer_no_during_cuda_graph_capture_without_caching(monkeypatch):
    """A probe reads its result on the host, which would invalidate a CUDA-graph capture: during
    capture the answer is no, not cached, and the first eager call probes for real."""
    tries = []
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(_triton_utils, "_PROBES", {})
    device = torch.device("cuda", 0)
    assert _triton_utils._probe_once("test", device, lambda d: tries.append(d) or True) is False
    assert tries == [] and _triton_utils._PROBES == {}
    capturing[0] = False
    assert _triton_utils._probe_once("test", device, lambda d: tries.append(d) or True) is True
    assert _triton_utils._probe_once("test", device, lambda d: tries.append(d) or False) is True  # cached
    assert tries == [device]


def test_the_fused_gemms_tuning_key_holds_every_variant_flag():
    """Triton launches a tuning key's best config without checking that it fits: every constexpr
    that changes the kernel (its shared memory) is in the key, only the tuned tile sizes are not."""
    from loramcl_kernels.ops import multi_lora_linear as mll

    import inspect

    fn = mll._gemm_kernel.fn
    while not inspect.isfunction(fn):  # through the JIT (or the interpreter's) wrapper
        fn = fn.fn
    constexprs = {name for name, p in inspect.signature(fn).parameters.items()
                  if p.annotation in ("tl.constexpr", triton.language.constexpr)}
    assert {"BM", "SHARED_OUT", "TMA_STORE", "E_KN"} <= constexprs
    tuned = {"BM", "BN", "BK", "GM"}
    derived = {"R_PAD", "DOT_PRECISION"}  # a function of R; a module constant
    assert constexprs - tuned - derived <= set(mll._gemm_kernel.keys)
    assert not (set(mll._gemm_kernel.keys) & tuned)
