"""benchmarks/gpu_checks.sh: the GPU calls that benchmarks/NOTES.md plans write at most 8 files to
$OUT, the most the device tool returns from one call (a ninth file would be lost)."""
import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_TOOL_MAX_FILES = 8


def _read(*path):
    with open(os.path.join(REPO_ROOT, *path)) as f:
        return f.read()


def _files_per_step() -> dict:
    """step -> the $OUT files its case branch writes."""
    script = _read("benchmarks", "gpu_checks.sh")
    branches = re.findall(r"^    (\w+)\)\n(.*?);;", script, flags=re.MULTILINE | re.DOTALL)
    return {step: set(re.findall(r'"\$OUT/([\w.-]+)"', body)) for step, body in branches}


def _planned_calls() -> list:
    """The STEPS of each call that NOTES.md's opening (before its first section) plans for the next
    GPU session: its indented command lines."""
    opening = _read("benchmarks", "NOTES.md").split("\n## ")[0]
    commands = "\n".join(line for line in opening.splitlines() if line.startswith("    "))
    return [steps.split() for steps in re.findall(r'STEPS="([^"]+)"', commands)]


def test_every_step_writes_known_files():
    files = _files_per_step()
    assert {"env", "smoke", "tests", "bench", "sweep", "bench_loss", "decode", "profile"} <= set(files)
    assert files["sweep"] == {"sweep_multi_lora.log", "sweep_mcl_loss.log"}


def test_each_planned_gpu_call_returns_at_most_8_files():
    files = _files_per_step()
    calls = _planned_calls()
    assert len(calls) == 2, calls
    for steps in calls:
        written = set().union(*(files[step] for step in steps))
        assert len(written) <= DEVICE_TOOL_MAX_FILES, (steps, sorted(written))
