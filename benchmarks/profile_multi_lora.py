"""Where the time of one multi_lora_linear forward+backward goes, kernel by kernel (GPU).

python benchmarks/profile_multi_lora.py [--paths fused,cublas] [--K 4 --T 2048 --r 16] [--shared] [--host] [--decode]
Prints the CUDA kernel time table of torch.profiler for each path next to cuBLAS base-only.
--decode: the decode forward instead (T = 8 rows per hypothesis, no grad): the partial and finish
kernels' times next to cuBLAS's x W^T, over 4 copies of the layer so that W comes from HBM. The
path "fused-unflattened" is the fused path with the persistent GEMM's loops left unflattened
(FLATTEN_16_BIT_GEMM off): the fused GEMM's time per call with and without one software pipeline;
"fused-pointer-store" stores the GEMM's output tiles through masked pointers instead of TMA
descriptors (GEMM_TMA_STORE off).
--host prints instead the host time per call (microseconds to enqueue, GPU drained first) of each
launch and of the public calls: where the eager time goes when the host is the bottleneck.
"""
import argparse
import os
import sys

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", default="fused,cublas")
    parser.add_argument("--shared", action="store_true", help="shared input: x holds T rows for all K")
    parser.add_argument("--K", type=int, default=4)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--host", action="store_true", help="host microseconds per call instead of kernel times")
    parser.add_argument("--decode", action="store_true", help="the decode forward (8 rows per hypothesis)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --decode: a CPU check of the script under TRITON_INTERPRET=1 (d = 64)")
    args = parser.parse_args()
    if args.decode and args.smoke:
        print("decode profile, CPU smoke run (Triton interpreter, CPU op times): times mean nothing")
        decode_table(args.K, args.r, 64, device="cpu", calls=1)
        return
    if not torch.cuda.is_available():
        print("no GPU: nothing to profile")
        return
    from loramcl_kernels import multi_lora_linear

    K, T, r, d = args.K, args.T, args.r, args.d
    if args.decode:
        decode_table(K, r, d)
        return
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

    if args.host:
        host_table(args, x, w, a, b, g, ours, base)
        return
    runs = [("ours-" + p, p, ours) for p in args.paths.split(",")] + [("base_only", None, base)]
    from loramcl_kernels.ops import multi_lora_linear as mll

    for name, path, fn in runs:
        if path:
            os.environ["LORAMCL_MULTI_LORA_PATH"] = path.split("-")[0]
            mll.FLATTEN_16_BIT_GEMM = not path.endswith("-unflattened")
            mll.GEMM_TMA_STORE = not path.endswith("-pointer-store")
        table = kernel_table(fn, warmup=5, calls=10, rows=12)
        shared = " shared input" if args.shared else ""
        print(f"\n## {name}{shared}  K={K} T={T} r={r} d={d} bf16, fwd+bwd x 10, {torch.cuda.get_device_name()}")
        print(table)


def kernel_table(fn, warmup, calls, rows, device="cuda"):
    """torch.profiler's table of `calls` calls of fn after `warmup` ones: CUDA kernel times, or on
    the CPU (smoke runs) CPU op times."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        sync()
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                                     max_name_column_width=60)


def decode_table(K, r, d, layers=4, calls=20, device="cuda"):
    """Kernel times of the decode forward (8 rows per hypothesis) against cuBLAS's x W^T. Eager:
    each kernel's time is its own (on Hopper the finish kernel, a dependent launch, may start
    before the partial kernel ends; its time then includes that wait)."""
    from loramcl_kernels import multi_lora_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(8 * K, d, device=device, dtype=dtype)
    copies = [(torch.randn(d, d, device=device, dtype=dtype) / d**0.5,
               torch.randn(K, r, d, device=device, dtype=dtype) / d**0.5,
               torch.randn(K, d, r, device=device, dtype=dtype) / r**0.5) for _ in range(layers)]
    os.environ["LORAMCL_MULTI_LORA_PATH"] = "decode"

    def ours():
        for w, a, b in copies:
            multi_lora_linear(x, w, None, a, b, 2.0, num_hypotheses=K, backend="triton")

    def base():
        for w, _, _ in copies:
            torch.mm(x, w.t())

    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    for name, fn in (("ours-decode", ours), ("base_only", base)):
        table = kernel_table(fn, warmup=3, calls=calls, rows=6, device=device)
        print(f"\n## {name} decode  K={K} rows={8 * K} r={r} d={d} {str(dtype)[6:]}, "
              f"forward x {calls * layers}, {card}")
        print(table)


def host_table(args, x, w, a, b, g, ours, base):
    """Host us per call: each Triton launch on its own, then the public calls."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common  # benchmarks/common.py
    from loramcl_kernels.ops import multi_lora_linear as mll

    x2 = x.detach().reshape(-1, x.shape[-1])
    s = torch.full((args.K,), 2.0, device="cuda")
    shrink = mll._launch_shrink(x2, a.detach(), None, None, args.T, block_diag=True)
    out = torch.empty(x2.shape[0], w.shape[0], device="cuda", dtype=x.dtype)
    e, e_strides = mll._b_as_expand(b.detach())
    calls = {
        "torch.mm (x W^T)": lambda: torch.mm(x2, w.t()),
        "torch.empty": lambda: torch.empty_like(out),
        "shrink kernel": lambda: mll._launch_shrink(x2, a.detach(), None, None, args.T, block_diag=True),
        "epilogue kernel": lambda: mll._launch_gemm_expand(None, None, False, out, shrink, e, e_strides, s, None,
                                                           out, False, args.K, args.r),
        "fused GEMM kernel": lambda: mll._launch_gemm_expand(x2, w, False, None, shrink, e, e_strides, s, None,
                                                             out, False, args.K, args.r),
        "public forward, no grad": lambda: torch.no_grad()(ours_forward)(x, w, a, b),
        "public fwd+bwd": ours,
        "base fwd+bwd": base,
    }
    print(f"\n## host us per call, K={args.K} T={args.T} r={args.r} d={args.d}, {torch.cuda.get_device_name()}")
    print("| call | path | host us |\n|---|---|---|")
    for path in args.paths.split(","):
        os.environ["LORAMCL_MULTI_LORA_PATH"] = path
        for name, fn in calls.items():
            for _ in range(3):
                fn()
            print(f"| {name} | {path} | {common.host_us(fn, calls=50):.1f} |")


def ours_forward(x, w, a, b):
    from loramcl_kernels import multi_lora_linear

    return multi_lora_linear(x, w, None, a, b, 2.0, backend="triton")


if __name__ == "__main__":
    main()
