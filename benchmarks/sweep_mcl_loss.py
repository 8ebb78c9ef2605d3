"""The fused GEMMs of mcl_loss, pass 1 and pass 2, at several tile configurations (GPU).

python benchmarks/sweep_mcl_loss.py  -> markdown tables per regime (DESIGN.md section 3, bf16).

Pass 1 (the logits + log-sum-exp GEMM): milliseconds, TFLOP/s over the 2 n H V FLOPs of every
hypothesis' supervised rows, and the largest difference of lse from the default configuration's.
Configurations with the default's vocab tile (BN) and k-step (BK) should give the same lse bit for
bit (each row still combines the same tiles in the same order; the last column shows whether they
do); another BN or BK changes the rounding at the ulp level. _fused_config in ops/mcl_loss.py
takes its tiles from such a run.

Pass 2 (hard WTA, lm_head frozen: the backward, whose work is the winners' rows): milliseconds of
the whole backward, TFLOP/s over its two GEMMs (4 n_w H V), and the largest difference of d hidden
from the default configuration's; the chunked pass 2 (fp32 logits chunks and a row kernel) is a
row of its own, and so is auto's configuration in vocab chunks of the buffer's width instead of
one wave of tiles (the chunks' memory against their launches: _pass2_chunk_sizes).
_pass2_fused_config takes its tiles from such a run. "auto" is the configuration the package picks.
"""
import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_mcl_loss import CPU_REGIMES, GPU_REGIMES, IGNORE, make_inputs  # noqa: E402
from benchmarks.common import env_var, module_attrs, sweep_row, time_ms  # noqa: E402
from loramcl_kernels.ops import mcl_loss as mcl  # noqa: E402

# (BM, BN, BK, GM, num_warps, num_stages); shared memory per stage (BM + BN) * BK * 2 bytes
CONFIGS = [
    (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 5), (128, 128, 64, 4, 8, 4),
    (128, 128, 64, 16, 8, 4), (256, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 5),
    (128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3),
]
# pass 2: the same and whether g leaves through a TMA descriptor store (else a masked pointer store);
# compiled for sm_90 without a bias, 128 x 256 spills 184 bytes a thread with pointer stores, none
# with the TMA store (tests/sm90_compile.py records registers and spills)
PASS2_CONFIGS = [
    (128, 128, 64, 8, 8, 4, False), (128, 128, 64, 8, 8, 3, True), (128, 256, 64, 8, 8, 3, True),
    (128, 256, 64, 8, 8, 3, False), (256, 128, 64, 8, 8, 3, True), (64, 128, 64, 8, 4, 4, True),
    (128, 64, 64, 8, 4, 4, True), (128, 128, 64, 16, 8, 4, True),
]
# --smoke (CPU, TRITON_INTERPRET=1): the interpreter's tiles, fp32, the CPU regimes: checks the script
SMOKE_CONFIGS = [(16, 32, 32, 4, 4, 1), (32, 32, 16, 2, 4, 1)]
SMOKE_PASS2_CONFIGS = [(16, 32, 32, 4, 4, 1, True), (32, 32, 16, 2, 4, 1, False)]
PASS1_COLUMNS = ("BM", "BN", "BK", "GM", "num_warps", "num_stages")
PASS2_COLUMNS = (*PASS1_COLUMNS, "TMA_STORE")


def _config_label(c, columns=PASS1_COLUMNS):
    return " | ".join(str(c[k]) for k in columns)


def _as_config(config):
    """(BM, BN, BK, GM, num_warps, num_stages[, TMA_STORE]) -> the launchers' config dict."""
    return dict(zip(PASS2_COLUMNS, config))


def _hard_wta_backward(hidden, weight, labels, forward_outputs, K):
    """d hidden of the hard-WTA loss, lm_head frozen: pass 2 over the winners' rows."""
    loss, _, _, weights, position_lse, row_count, pass1_rows, nll_grad = forward_outputs
    return mcl._mcl_loss_backward_triton(
        torch.ones_like(loss), hidden, weight, None, labels, weights, position_lse, row_count, pass1_rows,
        nll_grad, K, "batch_major", "mean", IGNORE, True, True, False, False)[0]


def sweep_pass2(regimes, configs, device, dtype):
    auto_config = mcl._pass2_fused_config
    for name, K, B, T, n_sup, H, V in regimes:
        hidden, weight, labels = make_inputs(K, B, T, n_sup, H, V, device, dtype)
        hidden = hidden.detach()
        out = mcl._mcl_loss_forward_triton(hidden, weight, None, labels, K, "batch_major", "wta", 0.0, 1.0, "mean",
                                           IGNORE, True)
        backward = functools.partial(_hard_wta_backward, hidden, weight, labels, out, K)

        with env_var("LORAMCL_MCL_PASS2", "fused"):
            auto_grad = backward()
        n_w = mcl.KERNEL_STATS.pass2_rows
        flop = 4 * n_w * H * V
        print(f"\n{name}, pass 2: n_w = {n_w} winner rows, H = {H}, V = {V}")
        print("| BM | BN | BK | GM | warps | stages | TMA store | ms | TFLOP/s | max abs d hidden diff vs auto |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        auto_pass2 = auto_config(hidden.device, hidden.dtype, n_w, False)
        auto_label = _config_label(auto_pass2, PASS2_COLUMNS)
        for config in ["chunked", None, "wide", *configs]:
            knobs = {}
            if config == "chunked":
                label, path = "chunked pass 2 | | | | | |", "chunked"
            elif config is None:
                label, path = "auto: " + auto_label, "fused"
            elif config == "wide":  # auto's tiles in vocab chunks of the buffer's width, not one wave of tiles
                knobs["PASS2_MIN_COLS"] = 1 << 40
                knobs["_pass2_fused_config"] = lambda *args, c=auto_pass2: c  # noqa: E731
                label, path = "auto, buffer-wide chunks: " + auto_label, "fused"
            else:
                knobs["_pass2_fused_config"] = lambda *args, c=_as_config(config): c  # noqa: E731
                label, path = _config_label(_as_config(config), PASS2_COLUMNS), "fused"

            def measured(path=path):
                with env_var("LORAMCL_MCL_PASS2", path):
                    ms = time_ms(backward)  # noqa: B023
                    diff = (backward().float() - auto_grad.float()).abs().max().item()  # noqa: B023
                return f"{ms:.3f} | {flop / ms / 1e9:.0f} | {diff:.2e}"  # noqa: B023

            with module_attrs(mcl, **knobs):
                sweep_row(label, measured, 2)

def sweep(regimes, configs, device, dtype):
    auto_config = mcl._fused_config
    for name, K, B, T, n_sup, H, V in regimes:
        hidden, weight, labels = make_inputs(K, B, T, n_sup, H, V, device, dtype)
        R = B * K
        row_count = torch.empty(R, dtype=torch.int32, device=device)
        lse = torch.empty(2, R * T, device=device)  # (max, log-sum) per position
        nll = torch.empty(R * T, device=device)
        positions, targets, counts = mcl._supervised_positions(
            labels, R, T, K, "batch_major", True, IGNORE, row_count, V=V, position_lse=lse, position_nll=nll)
        n = int(counts[0])
        args = (hidden.detach().reshape(R * T, H), positions[:n], targets[:n], weight, None, lse, nll)
        flop = 2 * n * H * V
        print(f"\n{name}: n = {n} supervised rows (all K), H = {H}, V = {V}")
        print("| BM | BN | BK | GM | warps | stages | ms | TFLOP/s | max abs lse diff vs auto |")
        print("|---|---|---|---|---|---|---|---|---|")
        mcl._pass1_fused(*args)
        auto_lse = lse[:, positions[:n]].sum(0)  # lse = max + log-sum
        for config in [None, *configs]:
            knobs = {}
            if config is None:
                label = "auto: " + _config_label(auto_config(hidden.device, hidden.dtype))
            else:
                knobs["_fused_config"] = lambda device, dtype, c=_as_config(config): c  # noqa: E731
                label = " | ".join(map(str, config))

            def measured():
                ms = time_ms(lambda: mcl._pass1_fused(*args))  # noqa: B023
                diff = (lse[:, positions[:n]].sum(0) - auto_lse).abs().max().item()  # noqa: B023
                return f"{ms:.3f} | {flop / ms / 1e9:.0f} | {diff:.2e}"  # noqa: B023

            with module_attrs(mcl, **knobs):
                sweep_row(label, measured, 2)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script under TRITON_INTERPRET=1")
    cli = parser.parse_args()
    if cli.smoke:
        print("mcl_loss passes 1 and 2, fused, fp32, CPU smoke run (Triton interpreter): times mean nothing")
        mcl.PASS2_MIN_COLS = 16  # one-wave vocab chunks at the CPU regime's size: "buffer-wide" differs
        sweep_pass2(CPU_REGIMES[:1], SMOKE_PASS2_CONFIGS, "cpu", torch.float32)
        sweep(CPU_REGIMES[:1], SMOKE_CONFIGS, "cpu", torch.float32)
    elif not torch.cuda.is_available():
        print("no GPU: nothing to sweep")
    else:
        print(f"mcl_loss passes 1 and 2, fused, bf16, {torch.cuda.get_device_name()}")
        # pass 2 first: a run that its time limit cuts short keeps pass 2's table
        sweep_pass2(GPU_REGIMES, PASS2_CONFIGS, "cuda", torch.bfloat16)
        sweep(GPU_REGIMES, CONFIGS, "cuda", torch.bfloat16)
