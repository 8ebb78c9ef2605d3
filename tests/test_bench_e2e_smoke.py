"""The end-to-end benchmark's CPU smoke run (benchmarks/bench_e2e.py without a GPU).

Runs the script with CUDA hidden and checks its JSON: both variants at both layer counts, finite
step times, and first-step losses of ours (patch_model + MCLModel) equal to the official layer +
full-logits loss on the same weights: the two compute the same function.
"""
import json
import math
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_smoke_run_matches_official(tmp_path):
    out = tmp_path / "e2e.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "bench_e2e.py"), "--out", str(out),
                           "--layers", "1,2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU smoke run" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["impl"], r["layers"]) for r in rows) == [("official", 1), ("official", 2), ("ours", 1), ("ours", 2)]
    for row in rows:
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["loss_rel_diff_vs_official"] < 1e-4
        assert math.isfinite(row["first_loss"]) and row["first_loss"] > 0
    by_layers = {}
    for row in rows:
        by_layers.setdefault(row["layers"], {})[row["impl"]] = row["first_loss"]
    assert by_layers[1]["ours"] != by_layers[2]["ours"]  # different models: the check is not vacuous


def test_e2e_smoke_run_with_the_decoder_compiled(tmp_path):
    """--graphs adds ours with the decoder compiled (on a GPU mode="reduce-overhead", CUDA graphs;
    on the CPU backend "aot_eager"): it starts from the same adapters and computes the same loss."""
    out = tmp_path / "e2e.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "bench_e2e.py"), "--out", str(out),
                           "--layers", "1", "--graphs"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["official", "ours", "ours-compiled"]
    compiled = rows["ours-compiled"]
    assert math.isfinite(compiled["ms"]) and compiled["ms"] > 0
    assert compiled["loss_rel_diff_vs_official"] < 1e-4
    assert compiled["first_loss"] == rows["ours"]["first_loss"]  # the same adapters to start from
    assert compiled["cudagraph_skips"] == 0  # aot_eager makes no graphs to decline


def test_e2e_smoke_run_with_gradient_checkpointing(tmp_path):
    """--checkpointing adds ours with HF's gradient checkpointing: the same adapters to start from,
    the same loss; the model is back in eval mode without checkpointing for the official variant."""
    out = tmp_path / "e2e.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "bench_e2e.py"), "--out", str(out),
                           "--layers", "1,2", "--checkpointing"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["impl"], r["layers"]): r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == [("official", 1), ("official", 2), ("ours", 1), ("ours", 2), ("ours-checkpointed", 1),
                            ("ours-checkpointed", 2)]
    for layers in (1, 2):
        checkpointed = rows[("ours-checkpointed", layers)]
        assert math.isfinite(checkpointed["ms"]) and checkpointed["ms"] > 0
        assert checkpointed["first_loss"] == rows[("ours", layers)]["first_loss"]
        assert checkpointed["loss_rel_diff_vs_official"] < 1e-4
