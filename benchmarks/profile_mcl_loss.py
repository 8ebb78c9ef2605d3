"""Where the time of one mcl_loss forward+backward goes, kernel by kernel (GPU).

python benchmarks/profile_mcl_loss.py [--regimes captioning,"small vocab"] [--modes wta,relaxed] [--pass1 auto]
For each regime of bench_mcl_loss.py (lm_head frozen, bf16): the forward alone and forward+backward
(median ms, as the benchmark times them), the GEMM floors of each (forward 2*K*n*H*V, hard WTA's backward
4*n_win*H*V at 781 TFLOP/s), and torch.profiler's CUDA kernel table of 10 forward+backward calls:
what separates a regime from its floor.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_mcl_loss import GPU_REGIMES, MODES, PEAK_TFLOPS, make_inputs  # noqa: E402
from benchmarks.common import time_ms  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--regimes", default=",".join(r[0] for r in GPU_REGIMES))
    parser.add_argument("--modes", default="wta")
    parser.add_argument("--pass1", default="auto", help="LORAMCL_MCL_PASS1: auto, chunked or fused")
    parser.add_argument("--rows", type=int, default=14, help="rows of each kernel table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to profile")
        return
    from loramcl_kernels import mcl_loss

    os.environ["LORAMCL_MCL_PASS1"] = args.pass1
    modes = dict(MODES)
    for name, K, B, T, n_sup, H, V in GPU_REGIMES:
        if name not in args.regimes.split(","):
            continue
        hidden, weight, labels = make_inputs(K, B, T, n_sup, H, V, "cuda", torch.bfloat16)
        for mode in args.modes.split(","):
            kw = modes[mode]

            def forward():
                return mcl_loss(hidden, weight, labels, num_hypotheses=K, mode=mode, **kw).loss

            def fwd_bwd():
                hidden.grad = None
                forward().backward()

            for _ in range(3):
                fwd_bwd()
            with torch.no_grad():
                fwd_ms = time_ms(forward)
            total_ms = time_ms(fwd_bwd)
            rows = B * n_sup  # supervised positions per hypothesis
            floor_fwd = 2 * K * rows * H * V / PEAK_TFLOPS / 1e9
            floor_bwd = 4 * rows * H * V / PEAK_TFLOPS / 1e9 if mode == "wta" else 0.0
            print(f"\n## {name} (K={K} B={B} T={T} supervised/seq={n_sup} H={H} V={V}) {mode}, pass 1 {args.pass1}, "
                  f"bf16, {torch.cuda.get_device_name()}")
            print(f"forward (no grad) {fwd_ms:.3f} ms, floor {floor_fwd:.3f}; forward+backward {total_ms:.3f} ms, "
                  f"backward ~{total_ms - fwd_ms:.3f} (hard WTA floor {floor_bwd:.3f})")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fwd_bwd()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        del hidden, weight, labels
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
