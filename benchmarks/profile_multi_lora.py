"""Where the time of one multi_lora_linear forward+backward goes, kernel by kernel (GPU).

python benchmarks/profile_multi_lora.py [--paths fused,cublas] [--K 4 --T 2048 --r 16] [--shared]
Prints the CUDA kernel time table of torch.profiler for each path next to cuBLAS base-only.
"""
import argparse
import os

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", default="fused,cublas")
    parser.add_argument("--shared", action="store_true", help="shared input: x holds T rows for all K")
    parser.add_argument("--K", type=int, default=4)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--d", type=int, default=4096)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to profile")
        return
    from loramcl_kernels import multi_lora_linear

    K, T, r, d = args.K, args.T, args.r, args.d
    x = torch.randn(1 if args.shared else K, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(d, d, device="cuda", dtype=torch.bfloat16) / d**0.5
    a = (torch.randn(K, r, d, device="cuda", dtype=torch.bfloat16) / d**0.5).requires_grad_()
    b = (torch.randn(K, d, r, device="cuda", dtype=torch.bfloat16) / r**0.5).requires_grad_()
    g = torch.randn(K, T, d, device="cuda", dtype=torch.bfloat16)

    def ours():
        y = multi_lora_linear(x, w, None, a, b, 2.0, backend="triton", shared_input=args.shared)
        torch.autograd.grad(y, (x, a, b), g)

    def base():
        y = x @ w.t()
        torch.autograd.grad(y, (x,), g[: x.shape[0]])

    runs = [("ours-" + p, p, ours) for p in args.paths.split(",")] + [("base_only", None, base)]
    for name, path, fn in runs:
        if path:
            os.environ["LORAMCL_MULTI_LORA_PATH"] = path
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        shared = " shared input" if args.shared else ""
        print(f"\n## {name}{shared}  K={K} T={T} r={r} d={d} bf16, fwd+bwd x 10, {torch.cuda.get_device_name()}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
