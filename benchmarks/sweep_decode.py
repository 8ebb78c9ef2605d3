"""Decode forward under a CUDA graph for several (BN columns, d_in splits) of the decode kernels (GPU).

python benchmarks/sweep_decode.py  -> a markdown table; _decode_config in ops/multi_lora_linear.py
should take its tiles from such a run. "auto" is the configuration _decode_config picks, with and
without the finish kernel's programmatic dependent launch (PDL, DECODE_PDL), and with other output
columns per finish program (DECODE_GPU_FINISH_BN). Each
graph runs LAYERS copies of the layer one after the other (us per call = graph time / LAYERS):
their W outgrow the L2 cache, so each call reads W from HBM, as the layers of a decoding step do.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from loramcl_kernels import multi_lora_linear  # noqa: E402
from loramcl_kernels.ops import multi_lora_linear as mll  # noqa: E402

LAYERS = 4  # 4 x 32 MiB of W at d = 4096: more than the H200's 50 MB of L2


def sweep(shapes, d, device, dtype, time_us):
    """One table row per (K, r) and (BN, splits); time_us(fn) -> us per call of fn."""
    print("| K | r | rows | BN | splits | BK | stages | PDL | finish BN | us | max abs err vs cublas path |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    auto_config = mll._decode_config
    for K, r in shapes:
        torch.manual_seed(0)
        x = torch.randn(8 * K, d, device=device).to(dtype)
        w = (torch.randn(d, d, device=device) / d**0.5).to(dtype)
        a = (torch.randn(K, r, d, device=device) / d**0.5).to(dtype)
        b = (torch.randn(K, d, r, device=device) / r**0.5).to(dtype)
        with common.env_var("LORAMCL_MULTI_LORA_PATH", "cublas"):
            ref = multi_lora_linear(x, w, None, a, b, 2.0, num_hypotheses=K, backend="triton")
        layers = [(w, a, b)] + [(w.clone(), a.clone(), b.clone()) for _ in range(LAYERS - 1)]
        base_us = time_us(lambda: [x @ w_.t() for w_, _, _ in layers]) / LAYERS  # noqa: B023
        print(f"| {K} | {r} | {8 * K} | base | - | - | - | - | - | {base_us:.1f} | - |")
        # (BN, splits, BK, stages, PDL, finish BN); None: auto's. auto without the programmatic
        # dependent launch of the finish kernel (DECODE_PDL), and with 32 or 128 outputs per finish
        # program (128 or 32 programs at d_out = 4096); the K-step and pipeline depth at 64 columns
        # and 4 splits, where each program streams only 1024 of d_in (8 steps of 128)
        configs = [("auto", "auto", None, None, True, None), ("auto", "auto", None, None, False, None),
                   ("auto", "auto", None, None, True, 32), ("auto", "auto", None, None, True, 128)]
        configs += [(bn, splits, None, None, True, None) for bn in (32, 64, 128) for splits in (1, 2, 4, 8)]
        configs += [(64, 4, bk, stages, True, None)
                    for bk, stages in ((64, 3), (64, 4), (64, 6), (128, 4), (256, 2), (256, 3))]
        for bn, splits, bk, stages, pdl, finish_bn in configs:
            knobs = dict(DECODE_GPU_MAX_STAGES=stages or mll.DECODE_GPU_MAX_STAGES, DECODE_PDL=pdl,
                         DECODE_GPU_FINISH_BN=finish_bn or mll.DECODE_GPU_FINISH_BN)
            if bn != "auto":
                def config(m, d_in, columns, element_size, on_cpu, bn=bn, splits=splits, bk=bk):
                    bm, _, auto_bk, _ = auto_config(m, d_in, columns, element_size, on_cpu)
                    bk = bk if bk is not None and not on_cpu else auto_bk
                    return bm, bn, bk, mll.cdiv(mll.cdiv(d_in, splits), bk) * bk
                knobs["_decode_config"] = config
            pdl_taken = pdl and device == "cuda" and torch.cuda.get_device_capability()[0] >= 9  # as _launch_decode

            def measured():
                with common.env_var("LORAMCL_MULTI_LORA_PATH", "decode"):
                    out = multi_lora_linear(x, w, None, a, b, 2.0, num_hypotheses=K, backend="triton")  # noqa: B023
                    err = (out.float() - ref.float()).abs().max().item()  # noqa: B023
                    us = time_us(lambda: [multi_lora_linear(x, w_, None, a_, b_, 2.0, num_hypotheses=K,  # noqa: B023
                                                            backend="triton") for w_, a_, b_ in layers]) / LAYERS
                return f"{us:.1f} | {err:.2e}"

            with common.module_attrs(mll, **knobs):
                common.sweep_row(f"{K} | {r} | {8 * K} | {bn} | {splits} | {bk or 'auto'} | {stages or 'auto'} | "
                                 f"{pdl_taken} | {finish_bn or 'auto'}", measured, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script under TRITON_INTERPRET=1")
    cli = parser.parse_args()
    if cli.smoke:
        print("decode forward, us per call, d=64, fp32, CPU smoke run (Triton interpreter): times mean nothing")
        sweep([(3, 5)], 64, "cpu", torch.float32, common.time_interpreter_us)
    elif not torch.cuda.is_available():
        print("no GPU: nothing to sweep")
    else:
        d = 4096
        print(f"decode forward, us under a CUDA graph, d={d}, bf16, 8 rows per hypothesis, "
              f"{torch.cuda.get_device_name()}")
        sweep([(5, 8), (4, 16), (8, 8), (4, 64)], d, "cuda", torch.bfloat16, common.time_graph_us)
