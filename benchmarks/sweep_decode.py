"""Decode forward under a CUDA graph for several (BN columns, d_in splits) of the decode kernels (GPU).

python benchmarks/sweep_decode.py  -> a markdown table; _decode_config in ops/multi_lora_linear.py
should take its tiles from such a run. "auto" is the configuration _decode_config picks. Each
graph runs LAYERS copies of the layer one after the other (us per call = graph time / LAYERS):
their W outgrow the L2 cache, so each call reads W from HBM, as the layers of a decoding step do.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from loramcl_kernels import multi_lora_linear  # noqa: E402
from loramcl_kernels.ops import multi_lora_linear as mll  # noqa: E402

if not torch.cuda.is_available():
    print("no GPU: nothing to sweep")
    sys.exit(0)
os.environ["LORAMCL_MULTI_LORA_PATH"] = "decode"
d = 4096
LAYERS = 4  # 4 x 32 MiB of W: more than the H200's 50 MB of L2
print(f"decode forward, us under a CUDA graph, d={d}, bf16, 8 rows per hypothesis, {torch.cuda.get_device_name()}")
print("| K | r | rows | BN | splits | us | max abs err vs cublas path |")
auto_config = mll._decode_config
for K, r in [(5, 8), (4, 16), (8, 8), (4, 64)]:
    torch.manual_seed(0)
    x = torch.randn(8 * K, d, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(d, d, device="cuda") / d**0.5).to(torch.bfloat16)
    a = (torch.randn(K, r, d, device="cuda") / d**0.5).to(torch.bfloat16)
    b = (torch.randn(K, d, r, device="cuda") / r**0.5).to(torch.bfloat16)
    with common.env_var("LORAMCL_MULTI_LORA_PATH", "cublas"):
        ref = multi_lora_linear(x, w, None, a, b, 2.0, num_hypotheses=K, backend="triton")
    layers = [(w, a, b)] + [(w.clone(), a.clone(), b.clone()) for _ in range(LAYERS - 1)]
    base_us = common.time_graph_us(lambda: [x @ w_.t() for w_, _, _ in layers]) / LAYERS
    print(f"| {K} | {r} | {8 * K} | base | - | {base_us:.1f} | - |")
    configs = [("auto", "auto")] + [(bn, splits) for bn in (32, 64, 128) for splits in (1, 2, 4, 8)]
    for bn, splits in configs:
        if bn == "auto":
            mll._decode_config = auto_config
        else:
            def config(m, d_in, columns, element_size, on_cpu, bn=bn, splits=splits):
                bm, _, bk, _ = auto_config(m, d_in, columns, element_size, on_cpu)
                return bm, bn, bk, mll.cdiv(mll.cdiv(d_in, splits), bk) * bk
            mll._decode_config = config
        try:
            f = lambda: multi_lora_linear(x, w, None, a, b, 2.0, num_hypotheses=K, backend="triton")  # noqa: E731
            err = (f().float() - ref.float()).abs().max().item()
            us = common.time_graph_us(lambda: [multi_lora_linear(x, w_, None, a_, b_, 2.0, num_hypotheses=K,
                                                                 backend="triton") for w_, a_, b_ in layers]) / LAYERS
            print(f"| {K} | {r} | {8 * K} | {bn} | {splits} | {us:.1f} | {err:.2e} |")
        except Exception as exc:  # noqa: BLE001
            print(f"| {K} | {r} | {8 * K} | {bn} | {splits} | error: {str(exc)[:120]} | |")
        finally:
            mll._decode_config = auto_config
