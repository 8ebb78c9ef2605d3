"""Every Triton kernel compiles for an H100/H200 (sm_90) at the configurations its GPU launches
use, and fits in its shared memory: tests/sm90_compile.py compiles them on the CPU (no GPU needed),
so a kernel that would not build or launch on the GPU machine fails here first."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from loramcl_kernels.ops._triton_utils import H100_SHARED_MEMORY as H100_SHARED_BYTES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "tests", "sm90_compile.py")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
KERNELS = {
    "_shrink_kernel", "_gemm_expand_kernel", "_decode_partial_kernel", "_decode_finish_kernel",  # multi_lora_linear
    "_dropout_rows_kernel",
    "_row_counts_kernel", "_compact_positions_kernel",  # mcl_loss, the supervised positions
    "_lse_chunk_kernel", "_sequence_weights_kernel", "_grad_logits_chunk_kernel",  # mcl_loss, chunked
    "_scatter_rows_kernel",  # mcl_loss, d hidden rows to their positions (scaled: the one-pass gradient)
    "_logits_lse_tiles_kernel", "_combine_lse_tiles_kernel",  # mcl_loss, fused pass 1
    "_grad_logits_tiles_kernel",  # mcl_loss, fused pass 2
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the GPU tests build and run the kernels")
@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this triton install has no ptxas for the NVIDIA backend")
def test_every_kernel_compiles_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # LORAMCL_SM90_PYTHON: another interpreter (say a venv with the GPU machine's triton version) to compile with
    python = os.environ.get("LORAMCL_SM90_PYTHON", sys.executable)
    proc = subprocess.run([python, SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary, variants = records[-1], records[:-1]
    assert summary["over_shared_memory"] == []
    assert {v["kernel"] for v in variants} == KERNELS
    assert {v["dtype"] for v in variants} == {"bfloat16", "float32", "int64"}  # int64: the label kernels
    assert summary["variants"] == len(variants) >= 40
    # Spills: the 16-bit variants keep at most 1 KB a thread in local memory (128 x 256 tiles with a
    # reducing epilogue use all 255 registers and spill a few hundred bytes; the pass-2 GEMM's
    # 768 bytes at that width made it take 128 x 128 tiles). The fp32 variants of the fused GEMMs
    # and the decode finish spill 10-19 KB (exact fp32 dots are FMA loops over whole tiles): `auto`
    # sends fp32 to the cublas path and the chunked loss instead.
    heavy = [v for v in variants if v["dtype"] == "bfloat16" and v["stack"] > 1024]
    assert not heavy, heavy
    # Vectorised 16-bit tiles: scalar 2-byte stores in the cublas-path epilogue once made it 4.6x
    # slower than its byte floor on an H200; the decode kernels' loads (x, W, A; B) vectorise.
    # (S_bd rows of K*r elements vectorise only when K*r is a multiple of 16, which is not checked.)
    epilogues = [v for v in variants if v["kernel"] == "_gemm_expand_kernel" and not v["constexprs"]["HAS_BASE"]]
    partials = [v for v in variants if v["kernel"] == "_decode_partial_kernel"]
    finishes = [v for v in variants if v["kernel"] == "_decode_finish_kernel"]  # recorded as fp32: the workspace
    assert epilogues and partials and finishes
    assert all(v["scalar_b16_stores"] == 0 for v in epilogues if v["dtype"] == "bfloat16"), epilogues
    assert all(v["scalar_b16_loads"] == 0 for v in partials + finishes), partials + finishes
    # the compute-bound 16-bit GEMMs run on Hopper's warpgroup MMA (wgmma), not per-warp mma.sync
    gemms = [v for v in variants if v["dtype"] == "bfloat16" and (
        (v["kernel"] == "_gemm_expand_kernel" and v["constexprs"]["HAS_BASE"])
        or v["kernel"] in ("_logits_lse_tiles_kernel", "_decode_partial_kernel"))]
    assert len(gemms) >= 8 and all(v["wgmma"] > 0 and v["mma_sync"] == 0 for v in gemms), gemms
    # Persistent GEMMs whose tile loop Triton flattens with the K-loop into one software pipeline (it
    # does so only when a tile's body holds one inner loop): MCL's pass 1 and the multi-LoRA GEMM
    # whose expand of 16-bit operands is one step (K*r <= BK). Not flattened, the fused GEMM measured
    # 1.08-1.09x cuBLAS on an H200, against 1.00-1.05x for the flattened probe of DESIGN.md.
    flattened = [v for v in variants if v["kernel"] == "_logits_lse_tiles_kernel" or (
        v["kernel"] == "_gemm_expand_kernel" and v["constexprs"]["HAS_BASE"] and v["constexprs"]["EXPAND_TMA"]
        and v["constexprs"]["NUM_HYP"] * v["constexprs"]["R"] <= v["constexprs"]["BK"] and v["dtype"] != "float32")]
    assert len(flattened) >= 8 and all(v["loop_depth"] == 1 for v in flattened), flattened
    # fp32 keeps the expand's loop: a one-step expand's own fp32 tiles left no autotuned configuration
    # within shared memory (checked above: at least one configuration of every autotuned launch fits)
    fp32_one_step = [v for v in variants if v["kernel"] == "_gemm_expand_kernel" and v["dtype"] == "float32"
                     and v["constexprs"]["HAS_BASE"] and v["constexprs"]["EXPAND_TMA"]
                     and v["constexprs"]["NUM_HYP"] * v["constexprs"]["R"] <= v["constexprs"]["BK"]]
    assert fp32_one_step and all(v["loop_depth"] == 2 for v in fp32_one_step), fp32_one_step
    # two decode programs per SM: three stages of (64 + 64) x 128 bf16 tiles
    assert all(v["shared"] <= H100_SHARED_BYTES // 2 for v in partials if v["dtype"] == "bfloat16"), partials
    # the one-pass gradient writes a bf16 P per vocab chunk and scales bf16 rows: vector stores
    # LoRA dropout variants (the shrink, with all blocks and per run; the dx epilogue; dropout(x)
    # for dA) compile as well
    assert sum(1 for v in variants if v["constexprs"].get("DROPOUT")) == 3
    # the shrink's per-run tiles (block-diagonal runs of a sequence's rows), bf16 loads vectorised
    runs = [v for v in variants if v["kernel"] == "_shrink_kernel" and v["constexprs"].get("RUNS")]
    assert len(runs) >= 4 and all(v["scalar_b16_loads"] == 0 for v in runs), runs
    one_pass = [v for v in variants if v["constexprs"].get("KEEP_P") or v["constexprs"].get("SCALE")]
    assert len(one_pass) == 3 and all(v["scalar_b16_stores"] == 0 for v in one_pass), one_pass
    # P is written over the logits it is computed from: a CTA barrier in each block of that sweep
    # (3 more than without P: p_sum's reduction takes 2, the sweep's barrier the third)
    lse = [v for v in variants if v["kernel"] == "_lse_chunk_kernel"]
    plain = max(v["barriers"] for v in lse if not v["constexprs"]["KEEP_P"])
    assert all(v["barriers"] >= plain + 3 for v in lse if v["constexprs"]["KEEP_P"]), lse
    # d hidden's rows reach their positions as 16-byte vectors in pass 2 too
    scatters = [v for v in variants if v["kernel"] == "_scatter_rows_kernel"]
    assert len(scatters) == 2 and all(v["scalar_b16_stores"] == 0 for v in scatters), scatters


PRE_HOPPER_KERNELS = {
    "_shrink_kernel", "_gemm_expand_kernel", "_dropout_rows_kernel",  # multi_lora_linear's cublas path
    "_decode_partial_kernel", "_decode_finish_kernel",  # the decode path, asked for by name
    "_row_counts_kernel", "_compact_positions_kernel", "_lse_chunk_kernel", "_sequence_weights_kernel",
    "_grad_logits_chunk_kernel", "_scatter_rows_kernel",  # mcl_loss, chunked
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the GPU tests build and run the kernels")
@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this triton install has no ptxas for the NVIDIA backend")
def test_kernels_before_hopper_fit_a_99_kb_card():
    """The kernels that run before Hopper compile for sm_86 and fit the 99 KB of shared memory per
    block of consumer Ampere/Ada cards (the tightest limit among the GPUs the package runs on): the
    launchers size their pipelines by the device's limit (the shrink's bf16 tiles took 152 KB with
    the H100's). The TMA paths (the fused GEMM, the fused MCL pass 1) do not compile there: asked
    for, the multi-LoRA fused path falls back to cublas, and the decode path where its expand
    operands would not fit (fp32, K*r > 128)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    python = os.environ.get("LORAMCL_SM90_PYTHON", sys.executable)
    proc = subprocess.run([python, SCRIPT, "--arch", "86"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary, variants = records[-1], records[:-1]
    assert summary["arch"] == 86 and summary["over_shared_memory"] == []
    assert {v["kernel"] for v in variants} == PRE_HOPPER_KERNELS
    assert all(v["shared"] <= 101376 and v["wgmma"] == 0 for v in variants)
    gemms = [v for v in variants if v["kernel"] == "_gemm_expand_kernel"]
    assert gemms and not any(v["constexprs"]["HAS_BASE"] for v in gemms)  # no fused GEMM: cuBLAS does the base
    # the heaviest shrink (K*r = 256 columns of bf16 per tile) keeps one tile in flight, not two
    assert max(v["shared"] for v in variants if v["kernel"] == "_shrink_kernel") > 64 * 1024
