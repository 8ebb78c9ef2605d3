"""ops/_triton_utils.py: launch() launches what Triton's own launch would (tests/launch_check.py,
in a process without the interpreter), and its switch."""
import json
import os
import subprocess
import sys

import pytest
import torch

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
    assert len(set(launches.values())) == 1 and launches["triton"] >= 150
    # the second run through launch() never went through Triton: every launch was a cache hit
    assert summary["recorded_through_triton"]["direct, misses"] == summary["compiled_variants"]
    assert summary["recorded_through_triton"]["direct, hits"] == 0
    assert summary["cache_entries_at_end"] <= 7
    # every kernel of both ops, and autotuned launches whose config (grid) changes with M
    assert len(summary["kernels"]) == 10 and len(summary["autotuned_grids"]) >= 4
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
