"""The decoding benchmark's CPU smoke run (benchmarks/bench_decode.py without a GPU).

Runs the script with CUDA hidden and checks its JSON: every variant timed, and every one decodes
the same tokens as the first (fp32): K single-adapter generate calls through PEFT (when installed),
K calls of the patched model, and one batched call over the B*K rows.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.mark.parametrize("beams", [1, 2])
def test_decode_smoke_run_variants_agree(tmp_path, beams):
    out = tmp_path / "decode.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "bench_decode.py"), "--out", str(out),
                           "--beams", str(beams)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU smoke run" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    expected = (["peft-sequential"] if HAS_PEFT else []) + ["ours-sequential", "ours-batched"]
    assert [r["impl"] for r in rows] == expected
    K, B, N = data["meta"]["shape"]["K"], data["meta"]["shape"]["B"], data["meta"]["shape"]["new_tokens"]
    for row in rows:
        assert row["beams"] == beams and row["new_tokens"] == N
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(B * K * N / (row["ms"] / 1e3))
        assert row["sequences_equal_to_first"] == 1.0 and row["first_tokens_equal_to_first"] == 1.0
        # greedy: the first variant's tokens fed back are each model's argmax (fp32, no near-ties here)
        assert row.get("teacher_forced_agreement") == (1.0 if beams == 1 else None)
        assert row["hypotheses_differ"]  # the K adapters decode differently: agreeing is not vacuous
