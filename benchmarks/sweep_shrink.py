"""The multi-LoRA shrink kernel at several tile configurations, under a CUDA graph (GPU).

python benchmarks/sweep_shrink.py  -> a markdown table; the SHRINK_GPU_* constants of
ops/multi_lora_linear.py should take their values from such a run. "auto" is the package's.

The shrink S_bd = x A_h^T (forward; the backward's dS = s dy B_h is the same kernel on dy) of a
training shape, with runs of T rows per hypothesis (the per-run tiles): memory-bound, it reads x
once (M x d_in x 2 bytes) and writes S (M x K*r). Each row: microseconds per call, the fraction of
the HBM floor (bytes moved at 4.3 TB/s: 64 MiB in 15.6 us), and the largest difference of S from
auto's (another K-step sums in another order: ulp-level differences). A second table times the
backward's shrink with B^T read in place against a copy of it made first.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from loramcl_kernels.ops import multi_lora_linear as mll  # noqa: E402

HBM_BYTES_PER_US = 4.3e6  # H200: 64 MiB read in 15.6 us (benchmarks/NOTES.md)
# (rows per program, bytes of x per row and K-step, most stages, warps); None: auto's
CONFIGS = [None, (16, 256, 3, 4), (64, 256, 3, 4), (32, 512, 3, 4), (32, 128, 5, 4), (32, 256, 5, 4),
           (16, 256, 6, 4), (64, 512, 3, 8), (32, 256, 3, 8)]
SMOKE_CONFIGS = [None, (16, 256, 3, 4)]  # on the CPU the launcher keeps its interpreter tiles: checks the script


KNOBS = ("SHRINK_GPU_BM", "SHRINK_GPU_BD_BYTES", "SHRINK_GPU_MAX_STAGES", "SHRINK_GPU_WARPS")


def sweep(shapes, d, device, dtype, configs, time_us):
    print("| K | tokens/hyp | r | BM | BD bytes | stages | warps | us | x HBM floor | max abs S diff vs auto |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    auto = tuple(getattr(mll, name) for name in KNOBS)
    for K, T, r in shapes:
        torch.manual_seed(0)
        x = torch.randn(K * T, d, device=device).to(dtype)
        a = (torch.randn(K, r, d, device=device) / d**0.5).to(dtype)
        shrink = lambda: mll._launch_shrink(x, a, None, None, T, block_diag=True)  # noqa: E731, B023
        reference = shrink()
        floor_us = (x.numel() + K * T * K * r) * x.element_size() / HBM_BYTES_PER_US

        def measured():
            diff = (shrink().float() - reference.float()).abs().max().item()  # noqa: B023
            us = time_us(shrink)  # noqa: B023
            return f"{us:.1f} | {us / floor_us:.2f} | {diff:.2e}"  # noqa: B023

        for config in configs:
            label = " | ".join(map(str, config)) if config else "auto: " + " | ".join(map(str, auto))
            with common.module_attrs(mll, **dict(zip(KNOBS, config or auto))):
                common.sweep_row(f"{K} | {T} | {r} | {label}", measured, 2)

def backward_shrink(shapes, d, device, dtype, time_us):
    """The backward's dS = s dy B_h at auto's tiles: B^T (K, r, d_out) read in place from lora_B
    (K, d_out, r), as the backward does, against a contiguous copy of B^T made first (timed with it)."""
    print("| K | tokens/hyp | r | B^T | us | max abs dS diff vs in place |")
    print("|---|---|---|---|---|---|")
    for K, T, r in shapes:
        torch.manual_seed(0)
        dy = torch.randn(K * T, d, device=device).to(dtype)
        b = (torch.randn(K, d, r, device=device) / r**0.5).to(dtype)
        s = torch.full((K,), 2.0, device=device)
        variants = {
            "in place": lambda: mll._launch_shrink(dy, b.transpose(1, 2), s, None, T, block_diag=True),  # noqa: B023
            "copied first": lambda: mll._launch_shrink(dy, b.transpose(1, 2).contiguous(), s, None, T,  # noqa: B023
                                                       block_diag=True),
        }
        reference = variants["in place"]()
        for name, run in variants.items():
            def measured(run=run):
                diff = (run().float() - reference.float()).abs().max().item()  # noqa: B023
                return f"{time_us(run):.1f} | {diff:.2e}"
            common.sweep_row(f"{K} | {T} | {r} | {name}", measured, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script under TRITON_INTERPRET=1")
    cli = parser.parse_args()
    if cli.smoke:
        print("shrink, us per call, d=64, fp32, CPU smoke run (Triton interpreter): times mean nothing")
        sweep([(3, 20, 5)], 64, "cpu", torch.float32, SMOKE_CONFIGS, common.time_interpreter_us)
        backward_shrink([(3, 20, 5)], 64, "cpu", torch.float32, common.time_interpreter_us)
    elif not torch.cuda.is_available():
        print("no GPU: nothing to sweep")
    else:
        d = 4096
        print(f"shrink (per-run tiles), us under a CUDA graph, d={d}, bf16, {torch.cuda.get_device_name()}")
        shapes = [(4, 2048, 16), (4, 2048, 64), (8, 1024, 8)]
        sweep(shapes, d, "cuda", torch.bfloat16, CONFIGS, common.time_graph_us)
        print(f"backward's shrink dS = s dy B_h, us under a CUDA graph, d={d}, bf16")
        backward_shrink(shapes, d, "cuda", torch.bfloat16, common.time_graph_us)
