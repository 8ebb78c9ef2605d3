"""Compile every Triton kernel of the package for an H100/H200 (sm_90) without a GPU.

`--arch 80` / `--arch 86` compile instead the kernels that run before Hopper (the paths `auto` takes
there: cublas, the chunked loss; a forced fused path falls back to cublas) for an A100 (163 KB of
shared memory per block) or a consumer Ampere/Ada card (99 KB: RTX 3090/4090, A10, L4, L40S), with
the launchers told that device's limit, and check each variant against it.

Run as a script in a process without TRITON_INTERPRET (tests/test_sm90_compile.py does): a stand-in
Triton driver reports an sm_90 target, launches become compile-only (`warmup=True`), and the
launchers run on meta tensors, so each kernel is compiled with the block sizes, specialisations
and constexprs its GPU launches use. Prints one JSON line per compiled kernel variant: name,
shared memory, warps, stages, the number of scalar 2-byte global loads and stores in the PTX
(16-bit tiles that did not vectorise), how deep its loops nest after Triton's passes (TTGIR), and
the registers and local-memory stack (spills) per thread that ptxas gave it (cuobjdump).
A compile error fails the script.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from loramcl_kernels.ops._triton_utils import H100_SHARED_MEMORY as H100_SHARED_BYTES  # noqa: E402
# per target: (SMs, shared memory one block may use) of a GPU of that kind
ARCHS = {90: (132, H100_SHARED_BYTES), 80: (108, 166912), 86: (84, 101376)}
ARCH = int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90
SHARED_LIMIT = ARCHS[ARCH][1]


class Sm90Driver:
    """The part of Triton's driver the JIT uses before launching: device, stream, target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)


def loop_depth(ttgir: str) -> int:
    """Deepest nesting of scf.for loops in a TTGIR listing: 1 when no loop holds another, e.g. a
    persistent GEMM whose tile and K loops Triton flattened into one software pipeline."""
    open_regions, deepest = [], 0  # (indentation, opened by scf.for) of each region still open
    for line in ttgir.splitlines():
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if text.startswith("}"):
            while open_regions and open_regions[-1][0] >= indent:
                open_regions.pop()
        if text.endswith("{"):
            is_for = text.startswith("scf.for") or " = scf.for " in text
            if is_for:
                deepest = max(deepest, 1 + sum(opened_by_for for _, opened_by_for in open_regions))
            open_regions.append((indent, is_for))
    return deepest


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def registers_and_stack(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a compiled kernel: a stack is local memory, spills."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(registers), int(stack)


COMPILED = []
NO_CONFIG_FITS = []  # autotuned launches none of whose configs fits in shared memory


def _compile_only(kernel, grid, args, kwargs, autotuned=False):
    compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
    dtype = next((str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)), None)
    ptx = compiled.asm["ptx"]
    registers, stack = registers_and_stack(compiled.asm["cubin"])
    record = dict(kernel=kernel.__name__, dtype=dtype, shared=compiled.metadata.shared,
                  registers=registers, stack=stack,
                  # element-wise 2-byte global loads / stores: 16-bit tiles that did not vectorise
                  scalar_b16_loads=ptx.count("ld.global.b16"), scalar_b16_stores=ptx.count("st.global.b16"),
                  # Hopper's warpgroup MMA (wgmma) against the older per-warp mma.sync
                  wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                  # CTA-wide barriers (bar.sync / barrier.sync)
                  barriers=ptx.count("bar.sync") + ptx.count("barrier.sync"),
                  loop_depth=loop_depth(compiled.asm["ttgir"]),
                  num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                  autotuned=autotuned, constexprs={k: v for k, v in kwargs.items() if k.isupper()})
    if record not in COMPILED:
        COMPILED.append(record)
        print(json.dumps(record), flush=True)
    return record


def mcl_on_meta_tensors(supervised_rows: int) -> None:
    """Let mcl_loss's Triton launchers run on meta tensors: the forward's host read of its counts
    returns (supervised_rows, 0 bad labels), the fp32-output GEMMs count as available, and the
    pass-1 path follows LORAMCL_MCL_PASS1 (no TMA alignment check on meta tensors)."""
    from loramcl_kernels.ops import mcl_loss as mcl

    real_tolist = torch.Tensor.tolist
    torch.Tensor.tolist = lambda self: [supervised_rows, 0] if self.is_meta else real_tolist(self)
    mcl._mm_out_dtype_supported = lambda device: True
    mcl._addmm_out_dtype_supported = lambda device: True
    mcl._pass1_path = lambda hidden, weight: os.environ["LORAMCL_MCL_PASS1"]


def _jit_getitem(self, grid):
    return lambda *args, **kwargs: _compile_only(self, grid, args, kwargs)


def _autotuner_getitem(self, grid):
    def launch(*args, **kwargs):
        # every config the autotuner could pick; it skips those that do not fit, so one must fit
        records = [_compile_only(self.fn, grid, args, {**kwargs, **config.all_kwargs()}, autotuned=True)
                   for config in self.configs]
        if all(r["shared"] > SHARED_LIMIT for r in records):
            NO_CONFIG_FITS.append(records[0])
    return launch


def main():
    os.environ["LORAMCL_TRITON_LAUNCH"] = "triton"  # compile-only launches return no kernel to keep
    driver.set_active(Sm90Driver())
    JITFunction.__getitem__ = _jit_getitem
    Autotuner.__getitem__ = _autotuner_getitem
    triton.set_allocator(lambda size, alignment, stream: None)

    from loramcl_kernels.ops import _triton_utils
    from loramcl_kernels.ops import mcl_loss as mcl
    from loramcl_kernels.ops import multi_lora_linear as mll

    facts = lambda device: (ARCHS[ARCH][0], ARCH // 10)  # noqa: E731
    mll._device_facts = facts
    mcl.device_facts = facts
    _triton_utils.shared_memory_per_block = lambda device: SHARED_LIMIT  # what the launchers size for
    meta = torch.device("meta")

    # multi_lora_linear: (dtype, path, K, r, rows, explicit ids); every kernel and each family of
    # constexprs once; r = 64 and fp32 are the shared-memory-heavy variants.
    cases = [
        (torch.bfloat16, "fused", 5, 8, 3900, False), (torch.bfloat16, "cublas", 5, 8, 3900, True),
        (torch.bfloat16, "fused", 4, 64, 256, True), (torch.bfloat16, "decode", 5, 8, 40, False),
        (torch.bfloat16, "decode", 4, 64, 40, True), (torch.float32, "fused", 4, 64, 256, False),
        (torch.float32, "fused", 4, 16, 256, False),  # K*r = BK: 16-bit operands' one-step expand, not fp32's
        (torch.float32, "decode", 4, 64, 40, False),
        # shared input's per-hypothesis expand at the widest r_pad the fused GEMM takes (bf16 r = 128;
        # fp32 r = 64 above), and past it (PER_K_EXPAND_MAX_BYTES), where the cublas path runs
        (torch.bfloat16, "fused", 2, 128, 256, False),
        (torch.bfloat16, "fused", 2, 256, 256, False), (torch.float32, "fused", 2, 96, 256, False),
    ]
    for dtype, path, num_hyp, r, m, ids in cases:
        os.environ["LORAMCL_MULTI_LORA_PATH"] = path
        x = torch.empty(m, 4096, dtype=dtype, device=meta)
        w = torch.empty(4096, 4096, dtype=dtype, device=meta)
        a = torch.empty(num_hyp, r, 4096, dtype=dtype, device=meta)
        b = torch.empty(num_hyp, 4096, r, dtype=dtype, device=meta)
        s = torch.empty(num_hyp, dtype=torch.float32, device=meta)
        hyp = torch.empty(m, dtype=torch.int64, device=meta) if ids else None
        # without ids: runs of m / K rows (the per-run shrink tiles); with ids: one row per id
        row_div = 1 if ids or path == "decode" else m // num_hyp
        y, shrink = mll.multi_lora_linear_triton(x, w, None, a, b, s, hyp, row_div)
        if path == "decode":
            continue
        mll.multi_lora_linear_triton_backward(y, x, w, a, b, s, hyp, row_div, shrink)
        if path == "cublas" and dtype == torch.bfloat16:  # LoRA dropout: the shrink, the dx epilogue, dropout(x)
            seed = torch.empty(1, dtype=torch.int64, device=meta)
            y, shrink = mll.multi_lora_linear_triton(x, w, None, a, b, s, hyp, 1, seed, 0.1)
            mll.multi_lora_linear_triton_backward(y, x, w, a, b, s, hyp, 1, shrink, seed, 0.1)
            mll.multi_lora_linear_triton(x, w, None, a, b, s, None, m // num_hyp, seed, 0.1)  # per-run shrink
        if path == "cublas":
            mll.multi_lora_linear_triton(x, None, None, a, b, s, hyp, 1)  # LoRA delta only
        if not ids:
            y, shrink = mll.multi_lora_linear_shared_triton(x, w, None, a, b, s, 1)
            mll.multi_lora_linear_shared_triton_backward(y, x, w, a, b, s, shrink, 1)

    # the shrink where its tiles are widest (r_pad = 128, 256): per-run and all-block tiles, of
    # lora_A (and the backward's copy of B^T at r = 96), and B^T read in place (r = 256)
    for dtype in (torch.bfloat16, torch.float32):
        for r in (96, 256):
            x = torch.empty(8192, 4096, dtype=dtype, device=meta)
            ids = torch.empty(8192, dtype=torch.int64, device=meta)
            ps = [torch.empty(2, r, 4096, dtype=dtype, device=meta)]
            if r == mll._r_pad(r):
                ps.append(torch.empty(2, 4096, r, dtype=dtype, device=meta).transpose(1, 2))
            for p in ps:
                mll._launch_shrink(x, p, None, None, 4096, block_diag=True)
                mll._launch_shrink(x, p, None, ids, 1, block_diag=True)

    # mcl_loss: both pass-1 paths, both pass-2 paths (with and without lm_head gradients), the per-sequence kernel
    mcl_on_meta_tensors(supervised_rows=640)
    pass1_cases = ((torch.bfloat16, "chunked"), (torch.bfloat16, "fused"), (torch.float32, "fused"))
    for dtype, path in pass1_cases if ARCH >= 90 else ((torch.bfloat16, "chunked"), (torch.float32, "chunked")):
        os.environ["LORAMCL_MCL_PASS1"] = path
        hidden = torch.empty(20, 780, 4096, dtype=dtype, device=meta)
        weight = torch.empty(32000, 4096, dtype=dtype, device=meta)
        bias = torch.empty(32000, dtype=dtype, device=meta)
        labels = torch.empty(4, 780, dtype=torch.int64, device=meta)
        out = mcl._mcl_loss_forward_triton(hidden, weight, bias, labels, 5, "batch_major", "wta", 0.0, 1.0,
                                           "mean", -100, True)
        loss, nll, winners, weights, position_lse, row_count, pass1_rows, nll_grad = out
        if path == "fused":  # pass 2 follows: fused for a frozen lm_head (both stores of g), chunked for its gradients
            for lm_head_grads, tma_store in ((False, True), (False, False), (True, True)):
                mcl.PASS2_TMA_STORE = tma_store
                mcl._mcl_loss_backward_triton(loss, hidden, weight, bias, labels, weights, position_lse,
                                              row_count, pass1_rows, nll_grad, 5, "batch_major", "mean", -100,
                                              True, True, lm_head_grads, lm_head_grads)
            if dtype == torch.bfloat16:  # no bias and 1280 winner rows: pass 2's 128 x 256 tiles
                mcl_on_meta_tensors(supervised_rows=6400)
                out = mcl._mcl_loss_forward_triton(hidden, weight, None, labels, 5, "batch_major", "wta", 0.0, 1.0,
                                                   "mean", -100, True)
                mcl._mcl_loss_backward_triton(out[0], hidden, weight, None, labels, *out[3:8], 5, "batch_major",
                                              "mean", -100, True, True, False, False)
                mcl_on_meta_tensors(supervised_rows=640)
        if path == "chunked":
            for lm_head_grads in (True, False):
                mcl._mcl_loss_backward_triton(loss, hidden, weight, bias, labels, weights, position_lse,
                                              row_count, pass1_rows, nll_grad, 5, "batch_major", "mean", -100,
                                              True, True, lm_head_grads, lm_head_grads)
            # the one-pass gradient of soft weights: the P-writing lse kernel, then the row scaling
            out = mcl._mcl_loss_forward_triton(hidden, weight, bias, labels, 5, "batch_major", "annealed", 0.0,
                                               1.0, "mean", -100, True, keep_nll_grad=True)
            mcl._mcl_loss_backward_triton(out[0], hidden, weight, bias, labels, *out[3:8], 5, "batch_major", "mean",
                                          -100, True, False, False, False)
    too_big = [c for c in COMPILED if c["shared"] > SHARED_LIMIT and not c["autotuned"]] + NO_CONFIG_FITS
    print(json.dumps(dict(arch=ARCH, variants=len(COMPILED), over_shared_memory=too_big)))
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
