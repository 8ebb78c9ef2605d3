"""The benchmark's CPU smoke run (benchmarks/bench_multi_lora.py without a GPU).

Runs the script in a subprocess with CUDA hidden, so that it takes its CPU path on any machine,
and checks the JSON it writes: every implementation has a finite time at every shape of every
table, and every row that computes the multi-LoRA function matched the reference backend's
output and gradients.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "bench_multi_lora.py")

# Our rows per --cpu-backend: the reference backend, plus, under the Triton interpreter, the
# Triton backend forced onto each of its paths (the rows the GPU run reports); the decode table
# also has the one-kernel decode path.
OURS = {"reference": {"ours-reference"}, "triton": {"ours-reference", "ours-fused", "ours-cublas"}}
OURS_DECODE = {"reference": OURS["reference"], "triton": OURS["triton"] | {"ours-decode"}}
DROPOUT_IMPLS = {"dropout0.1-ours", "dropout0.1-unfused"}  # training with LoRA dropout: other masks
TRAINING_IMPLS = {"base_only", "loop", "bmm", "bmm_compiled", "group_conv"} | DROPOUT_IMPLS
SHARED_IMPLS = {"base_once", "shared_repeat", "shared_once"}
DECODE_IMPLS = {"base_only", "bmm", "loop"}
BASELINES = {
    "multilora_fwd": TRAINING_IMPLS,
    "multilora_bwd": TRAINING_IMPLS,
    "multilora_fwdbwd": TRAINING_IMPLS,
    "multilora_shared_fwdbwd": SHARED_IMPLS,
    "multilora_decode_fwd": DECODE_IMPLS,
}
# Rows that compute something else than the multi-LoRA function carry no check.
UNCHECKED = {"base_only", "base_once"} | DROPOUT_IMPLS
SKIPPABLE_ON_CPU = {"bmm_compiled"}  # torch.compile is left out of the CPU smoke run


@pytest.fixture(scope="module", params=["reference", "triton"])
def smoke_run(request, tmp_path_factory):
    """(stdout, JSON, cpu backend) of one smoke run; about 3 s (reference) and 10 s (triton)."""
    out = tmp_path_factory.mktemp("bench") / "multi_lora.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    cmd = [sys.executable, SCRIPT, "--quick", "--cpu-backend", request.param, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with open(out) as f:
        result = json.load(f)
    return proc.stdout, result, request.param


def test_says_no_gpu_and_labels_the_smoke_run(smoke_run):
    stdout, result, backend = smoke_run
    assert "No GPU present" in stdout
    assert result["meta"]["smoke_run"] is True
    assert "CPU" in result["meta"]["device"] and "smoke run" in result["meta"]["device"]
    assert result["meta"]["dtype"] == "float32"
    assert result["meta"]["ours_mode"] == backend
    for title in ("Multi-LoRA linear", "Shared input", "Decode"):
        assert f"## {title}" in stdout


def test_every_implementation_has_a_finite_time_at_every_shape(smoke_run):
    _, result, backend = smoke_run
    rows = result["rows"]
    shapes = {(r["K"], r["B"], r["T"], r["r"]) for r in rows if r["what"] == "multilora_fwdbwd"}
    assert len(shapes) == 2
    for what, baselines in BASELINES.items():
        impls = baselines | (OURS_DECODE if what == "multilora_decode_fwd" else OURS)[backend]
        for shape in shapes:
            found = {r["impl"]: r for r in rows if r["what"] == what and (r["K"], r["r"]) == (shape[0], shape[3])}
            assert set(found) == impls, f"{what} {shape}: implementations {sorted(found)}"
            for impl, row in found.items():
                assert "error" not in row, f"{what} {impl} {shape}: {row['error']}"
                if "skipped" in row:
                    assert impl in SKIPPABLE_ON_CPU, f"{what} {impl} {shape} skipped: {row['skipped']}"
                    continue
                t = row["us"] if what == "multilora_decode_fwd" else row["ms"]
                assert t is not None and math.isfinite(t) and t > 0, f"{what} {impl} {shape}: time {t}"


def test_every_row_computes_the_reference_function(smoke_run):
    _, result, backend = smoke_run
    tol = result["meta"]["rel_tol"]
    checked = 0
    for row in result["rows"]:
        if "skipped" in row or row["impl"] in UNCHECKED:
            continue
        assert row.get("matched") is True, f"{row['what']} {row['impl']} K={row['K']} r={row['r']}: {row}"
        assert row["max_rel_err"] <= tol
        checked += 1
    ours = [r for r in result["rows"] if r["impl"].startswith("ours")]
    assert {r["impl"] for r in ours} == OURS_DECODE[backend]
    assert all(r.get("matched") is True for r in ours)
    n_ours, n_decode = len(OURS[backend]), len(OURS_DECODE[backend])
    # per shape: fwd, bwd, fwd+bwd of loop, bmm, group_conv and ours; shared 2 + ours; decode 2 + ours
    assert checked == 2 * (3 * (3 + n_ours) + (2 + n_ours) + (2 + n_decode))


def test_backward_rows_say_how_they_were_timed(smoke_run):
    _, result, backend = smoke_run
    bwd = [r for r in result["rows"] if r["what"] == "multilora_bwd" and "skipped" not in r]
    assert bwd and all(r["bwd_method"] in ("retain_graph", "fwdbwd_minus_fwd") for r in bwd)


def test_ratios_and_targets(smoke_run):
    _, result, backend = smoke_run
    rows = result["rows"]
    for row in rows:
        if row["impl"] == "base_only" and row["what"] in ("multilora_fwdbwd", "multilora_decode_fwd"):
            assert row["ratio_to_base"] == pytest.approx(1.0)
        if row["impl"] == "shared_repeat":
            assert row["ratio_to_repeat"] == pytest.approx(1.0)
    for row in rows:
        if row["impl"].startswith("ours") and row["what"] in (
                "multilora_fwdbwd", "multilora_shared_fwdbwd", "multilora_decode_fwd"):
            assert row["target"]
            assert row["status"] is None  # CPU times are not judged against the GPU targets
            ratio = row.get("ratio_to_base", row.get("ratio_to_repeat"))
            assert ratio is not None and math.isfinite(ratio) and ratio > 0


@pytest.mark.parametrize("script, says", [
    ("profile_multi_lora.py", "no GPU: nothing to profile"),
    ("profile_mcl_loss.py", "no GPU: nothing to profile"),
    ("sweep_decode.py", "no GPU: nothing to sweep"),
    ("sweep_mcl_loss.py", "no GPU: nothing to sweep"),
    ("sweep_shrink.py", "no GPU: nothing to sweep"),
])
def test_gpu_only_scripts_say_so_and_exit_0_without_a_gpu(script, says):
    """The profiling and sweep scripts (GPU only) import, say there is nothing to do and exit 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", script)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == says


def _table_rows(stdout):
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| K |") and not line.startswith("| BM |")]


def test_the_mcl_sweep_runs_its_configurations_on_the_cpu():
    """sweep_mcl_loss.py --smoke (interpreter): for both fused passes, the automatic configuration
    and each swept one run and give the same lse / d hidden as it, to rounding (another BK: another
    order); pass 2's table (first) also has the chunked pass 2, auto in buffer-wide vocab chunks,
    and both ways of storing the gradient tiles."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "sweep_mcl_loss.py"), "--smoke"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _table_rows(proc.stdout)
    assert len(rows) == 5 + 3, proc.stdout
    pass2, pass1 = rows[:5], rows[5:]
    assert pass2[0][0] == "chunked pass 2" and pass2[1][0].startswith("auto:")
    # the smoke run cuts auto's vocab chunks to one wave: the buffer-wide ones sum d hidden in another order
    assert pass2[2][0].startswith("auto, buffer-wide chunks:") and float(pass2[2][9]) > 0
    assert [row[6] for row in pass2[3:]] == ["True", "False"]  # the TMA store column
    assert pass1[0][0].startswith("auto:")
    for row in pass2:
        ms, diff = float(row[7]), float(row[9])
        assert math.isfinite(ms) and ms > 0 and diff <= 1e-5, row
    for row in pass1:
        ms, diff = float(row[6]), float(row[8])
        assert math.isfinite(ms) and ms > 0 and diff <= 1e-5, row


def test_the_decode_sweep_runs_its_configurations_on_the_cpu():
    """sweep_decode.py --smoke (interpreter): every (BN, splits) runs the decode path and matches
    the cublas path's output."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "sweep_decode.py"), "--smoke"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [row for row in _table_rows(proc.stdout) if row[3] != "base"]
    assert len(rows) == 22, proc.stdout
    # auto with and without the finish kernel's dependent launch, which the CPU never takes (Hopper only)
    assert [row[7] for row in rows[:2]] == ["False", "False"]
    assert [row[8] for row in rows[:4]] == ["auto", "auto", "32", "128"]  # outputs per finish program
    for row in rows:
        us, err = float(row[9]), float(row[10])
        assert math.isfinite(us) and us > 0 and err <= 1e-4, row


def test_the_decode_profile_runs_the_decode_kernels_on_the_cpu():
    """profile_multi_lora.py --decode --smoke (interpreter): one table for the decode path, whose
    Triton launches show as their workspace allocations, and one for x W^T."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "profile_multi_lora.py"),
                           "--decode", "--smoke", "--K", "3", "--r", "5"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, base = proc.stdout.split("## ours-decode decode")[1].split("## base_only decode")
    assert ours.startswith("  K=3 rows=24 r=5 d=64 float32, forward x 4, CPU")
    assert "aten::mm" not in ours and "aten::mm" in base, proc.stdout


def test_the_shrink_sweep_runs_on_the_cpu():
    """sweep_shrink.py --smoke (interpreter): each row runs the shrink and matches auto's S (on the
    CPU the launcher keeps the interpreter's tiles: this checks the script, not the configurations);
    the backward's shrink with B^T read in place and copied first gives the same dS."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "sweep_shrink.py"), "--smoke"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [row for row in _table_rows(proc.stdout) if row[0] != "K"]
    configs, backward = rows[:2], rows[2:]
    assert configs[0][3].startswith("auto:"), proc.stdout
    for row in configs:
        us, diff = float(row[7]), float(row[9])
        assert math.isfinite(us) and us > 0 and diff == 0, row
    assert [row[3] for row in backward] == ["in place", "copied first"], proc.stdout
    for row in backward:
        us, diff = float(row[4]), float(row[5])
        assert math.isfinite(us) and us > 0 and diff == 0, row


def test_a_run_stopped_by_timeout_keeps_its_rows(tmp_path):
    """`timeout` sends SIGTERM: the run prints its tables and writes the rows measured so far,
    marked incomplete (stopped here once the first table's rows are in the JSON)."""
    import signal
    import time

    out = tmp_path / "multi_lora.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--quick", "--out", str(out)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    with open(out) as f:
        result = json.load(f)
    if proc.returncode == 0:  # it finished before the signal arrived
        assert result["meta"]["complete"] is True
        return
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert result["meta"]["complete"] is False and result["rows"]
    assert "## Multi-LoRA linear" in stdout and "rows written to" in stdout


def test_json_without_nan_and_errors_with_their_cause(tmp_path):
    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    import common

    common.write_json([{"ms": float("nan"), "gib": float("inf"), "nested": [float("nan"), 1.0]}],
                      str(tmp_path / "r.json"), {"x": float("nan")})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"meta": {"x": None}, "rows": [{"ms": None, "gib": None, "nested": [None, 1.0]}]}
    try:
        try:
            raise ValueError("the first error")
        except ValueError:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as exc:
        chain = common.error_chain(exc)
    assert chain == "RuntimeError: operation failed due to a previous error during capture <- ValueError: the first error"


def test_a_sweep_row_that_raises_prints_its_error_and_the_knobs_come_back(capsys):
    """The sweeps try each configuration inside common.module_attrs and print it with
    common.sweep_row: a configuration that raises is a row with its error, and the module's
    attributes are restored either way."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    import types

    import common

    module = types.SimpleNamespace(TILE=64, config=None)

    def too_big():
        assert module.TILE == 256 and module.config == "wide"
        raise RuntimeError("out of resources: shared memory")

    with common.module_attrs(module, TILE=256, config="wide"):
        common.sweep_row("4 | 256", too_big, 2)
    with common.module_attrs(module, TILE=32):
        common.sweep_row("4 | 32", lambda: f"{module.TILE * 0.5:.1f} | 1e-06", 2)
    assert (module.TILE, module.config) == (64, None)
    assert capsys.readouterr().out.splitlines() == [
        "| 4 | 256 | error: out of resources: shared memory | | |",
        "| 4 | 32 | 16.0 | 1e-06 |",
    ]


def test_the_loss_benchmark_runs_the_regimes_and_modes_asked_for(tmp_path):
    """bench_mcl_loss.py --regimes / --modes (CPU smoke run): exactly those rows, in table order;
    an unknown name is an error that lists the choices."""
    script = os.path.join(REPO_ROOT, "benchmarks", "bench_mcl_loss.py")
    out = tmp_path / "loss.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, script, "--out", str(out), "--regimes", "small vocab,captioning",
                           "--modes", "wta"], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["regime"] for row in rows][0] == "captioning (cpu smoke)"
    assert {(row["regime"], row["mode"]) for row in rows} == {
        ("captioning (cpu smoke)", "wta"), ("small vocab (cpu smoke)", "wta")}
    assert all(math.isfinite(row["ms"]) for row in rows)
    proc = subprocess.run([sys.executable, script, "--modes", "wta,greedy"], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "unknown mode(s) ['greedy']" in proc.stderr and "'annealed'" in proc.stderr


def test_the_loss_benchmark_sets_a_rows_switches_for_its_backward_too(monkeypatch):
    """A row's environment switches hold through the backward, which reads its own
    (LORAMCL_MCL_PASS2 chooses pass 2 there): a row set only around the forward would time `auto`."""
    monkeypatch.syspath_prepend(REPO_ROOT)
    from benchmarks import bench_mcl_loss

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", os.environ.get("LORAMCL_MCL_PASS2")))
            return x.sum()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", os.environ.get("LORAMCL_MCL_PASS2")))
            return grad.expand(3)

    hidden = torch.zeros(3, requires_grad=True)
    monkeypatch.delenv("LORAMCL_MCL_PASS2", raising=False)
    bench_mcl_loss.fwd_bwd(lambda: Probe.apply(hidden), hidden, {"LORAMCL_MCL_PASS2": "chunked"})()
    assert seen == [("forward", "chunked"), ("backward", "chunked")]
    assert "LORAMCL_MCL_PASS2" not in os.environ and torch.equal(hidden.grad, torch.ones(3))
