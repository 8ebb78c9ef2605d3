"""Multi-LoRA linear: K low-rank adapters applied to the rows of one frozen linear layer.

Math (DESIGN.md section 2.1). x: (N, ..., d_in), flattened to M = N * T rows of d_in (T = the
product of the dims between the batch dim and the last). W: (d_out, d_in), bias: (d_out,),
A: (K, r, d_in), B: (K, d_out, r), s: (K,) scaling. Every flattened row m has a hypothesis h(m):

    batch_major       h = (n // inner) % K      (the official LoRA-MCL order; inner = beams)
    hypothesis_major  h = n // (N / K)
    hypothesis_ids    h = ids[n], -1 meaning "base layer only"

    y[m] = x[m] W^T + bias + s[h] * (x[m] A_h^T) B_h^T

Block-diagonal form. Let S_bd (M, K*r) hold row m's shrink x[m] A_h^T in the columns of its
block h and zeros elsewhere (a zero row for h = -1). Then

    y = x W^T + bias + S_bd B_all^T,  B_all = [s_1 B_1 | ... | s_K B_K]  (d_out, K*r)

so the LoRA expand is one extra inner block of size K*r whatever the row-to-hypothesis map is:
no per-hypothesis tiles, so decoding a few rows per hypothesis wastes nothing. S_bd (M*K*r
values, in x's dtype) is kept for the backward pass:

    dS_bd = s[h] * dy[m] B_h in block h           the same shrink kernel on dy
    dx    = dy W + dS_bd A_all,  A_all = [A_1; ...; A_K]  (K*r, d_in): the same GEMM kernel
    dA_k  = sum_{m: h(m)=k} dS[m]^T x[m]  = (dS_bd^T x)  block k
    dB_k  = s_k sum_{m: h(m)=k} dy[m]^T S[m] = s_k (dy^T S_bd) block k
    dW    = dy^T x,  dbias = sum_m dy[m]         (only when they require grad)

LoRA dropout (lora_dropout = p > 0, training): y = x W^T + bias + s[h] (dropout(x) A_h^T) B_h^T, so
S_bd is the shrink of dropout(x); then dx = dy W + keep/(1-p) * (dS_bd A_all) and dA = dS_bd^T dropout(x).
The keep mask is a hash of (seed, m, d) (dropout_keep_mask), recomputed wherever it is needed.

Shared input (shared_input=True): x holds rows that every hypothesis sees; the output has K times
as many rows, grouped (G, K, L) with L rows per group: batch_major gives G = N / inner groups of
L = inner * T rows (output row ((g*K + k)*inner + j) reads input row g*inner + j), hypothesis_major
gives G = 1. The base GEMM runs once over the input rows and each output tile is written K times,
once per hypothesis, from the same accumulator. Backward: dx = (sum_k dy_k) W + dS_all A_all.

Backends: 'reference' is plain PyTorch with fp32 accumulation (fp64 stays fp64): the oracle and
the CPU path. 'triton' has two paths, chosen per call by _choose_path (env LORAMCL_MULTI_LORA_PATH
overrides):
  fused   one persistent Triton GEMM loading x and W through TMA tensor descriptors; the expand
          is ceil(K*r / BK) more K-steps over S_bd and B_all (also through TMA when their rows
          are 16-byte aligned, else a per-hypothesis epilogue), bias in the epilogue; with shared
          input the epilogue writes the K outputs of each tile;
  cublas  cuBLAS twice: out = S_bd B_all^T (+ bias), a small GEMM, then out += x W^T with
          beta = 1 (the base GEMM reads out in its epilogue); shared input (K outputs per row)
          and the dx of LoRA dropout take cuBLAS for x W^T and a Triton epilogue kernel instead;
  decode  (forward of at most DECODE_MAX_ROWS distinct rows) two kernels per forward: split-K
          partial products of x with the rows of [W; A_all] (the shrink is K*r more output
          columns, computed once; W is read once), then one kernel sums the splits, masks the
          shrink block-diagonally and adds bias and expand; no separate shrink launch.
Both use the Triton shrink kernel; dA and dB are deterministic cuBLAS GEMMs over the
block-diagonal matrices (no atomics). Neither path syncs with the host.

The four implementations are registered as torch.library custom ops (fake implementations,
autograd), which torch.compile traces. Eager calls reach the same implementations and autograd
formulas through a plain torch.autograd.Function, which costs far less host time than the
dispatcher (see the "Eager path" section).
"""
from __future__ import annotations

import numbers
import os
import weakref
from typing import Optional

import torch
from torch import Tensor

from loramcl_kernels._backend import requested_backend, resolve_backend
from loramcl_kernels.ops._autocast import autocast_off, autocast_operands
from loramcl_kernels.ops._tracing import (
    check_flag, refuse_double_backward, refuse_functorch_transforms, tracing,
)
from loramcl_kernels.ops._triton_utils import device_facts as _device_facts
from loramcl_kernels.ops._triton_utils import mm_out_dtype_supported as _mm_out_dtype_supported
from loramcl_kernels.ops._triton_utils import next_pow2 as _next_pow2
from loramcl_kernels.ops._triton_utils import cdiv, contiguous_or_none, launch, on_input_device
from loramcl_kernels.ops._triton_utils import shared_memory_budget as _shared_memory_budget
from loramcl_kernels.ops._triton_utils import set_tma_allocator as _set_tma_allocator
from loramcl_kernels.ops._triton_utils import tma_gemm_capable as _tma_gemm_capable
from loramcl_kernels.ops._triton_utils import tma_rows_ok as _tma_ok

LAYOUTS = ("batch_major", "hypothesis_major")
PATHS = ("auto", "fused", "cublas", "decode")
FUSED_MIN_ROWS = 2048  # auto: the fused GEMM from 16 row tiles of 128 on (see _choose_path)
DECODE_MAX_ROWS = 256  # the decode path runs one non-persistent tile grid: few rows only
DECODE_AUTO_MAX_ROWS = 64  # auto: the decode kernel up to this many rows (see _choose_path)
# The persistent GEMM's tile and K loops flattened into one software pipeline for 16-bit operands
# (see _gemm_expand_kernel); benchmarks/profile_multi_lora.py turns it off to time the difference.
FLATTEN_16_BIT_GEMM = True
# The persistent GEMM stores its output tiles through a TMA descriptor where out's rows are 16-byte
# aligned (see _gemm_expand_kernel's TMA_STORE); benchmarks/profile_multi_lora.py turns it off too.
GEMM_TMA_STORE = True
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# GPU tiles of the shrink: rows per program, bytes of x per row and K-step (both halved where two
# stages would not fit the shared memory, see _launch_shrink), most tiles in flight (stages - 1 of them loaded ahead, as shared
# memory allows), warps. benchmarks/sweep_shrink.py on an H200 (2026-11-27, bf16, d = 4096,
# measured/h200-2026-11-27-b/sweep_multi_lora.log): 64 rows x 512 bytes, 3 stages, 8 warps took
# 20.8 / 23.3 / 21.2 us at (K, T, r) = (4, 2048, 16) / (4, 2048, 64) / (8, 1024, 8), against
# 22.8 / 28.7 / 23.5 for the 32 x 256 bytes, 4 warps of before (1.31-1.40x the HBM floor).
SHRINK_GPU_BM, SHRINK_GPU_BD_BYTES, SHRINK_GPU_MAX_STAGES, SHRINK_GPU_WARPS = 64, 512, 3, 8


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch, fp32 accumulation). Works on any device; its block-diagonal algebra is
# also what the deterministic dA / dB reductions of every backend compute.
# ---------------------------------------------------------------------------------------------


def _row_hypotheses(m: int, num_hyp: int, hypothesis_ids: Optional[Tensor], row_div: int, device) -> Tensor:
    """h of every flattened row: ids[m // row_div] with ids given, else (m // row_div) % K."""
    rows = torch.arange(m, device=device) // row_div
    if hypothesis_ids is not None:
        return hypothesis_ids.to(device=device, dtype=torch.long)[rows]
    return rows % num_hyp


def _keep_own_block(full: Tensor, row_hyp: Tensor, num_hyp: int) -> Tensor:
    """(M, K*r) -> S_bd: row m keeps its block h(m) and exact zeros elsewhere (all zeros for h = -1),
    as the kernels write them: a non-finite value of another block does not leak in."""
    m, cols = full.shape  # explicit sizes: -1 is ambiguous for an empty batch
    keep = row_hyp[:, None] == torch.arange(num_hyp, device=full.device)[None, :]
    return torch.where(keep[:, :, None], full.view(m, num_hyp, cols // num_hyp), 0.0).view(m, cols)


def _stack_A(lora_A: Tensor, dtype) -> Tensor:
    """A_all (K*r, d_in): the A_k stacked."""
    num_hyp, r, d_in = lora_A.shape
    return lora_A.to(dtype).reshape(num_hyp * r, d_in)


def _stack_B(lora_B: Tensor, scaling: Tensor, dtype) -> Tensor:
    """B_all (d_out, K*r) contiguous: the s_k B_k side by side, each product rounded once to dtype.

    One elementwise kernel writes the (d_out, K, r) buffer whatever lora_B's strides (a (K, r,
    d_out) buffer seen transposed included)."""
    num_hyp, d_out, r = lora_B.shape
    stacked = torch.empty(d_out, num_hyp, r, device=lora_B.device, dtype=dtype)
    torch.mul(lora_B.permute(1, 0, 2), scaling[None, :, None], out=stacked)
    return stacked.view(d_out, num_hyp * r)


def _lora_weight_grads(grad_shrink_bd, shrink_bd, x, grad_y, scaling, lora_A, lora_B):
    """dA = (dS_bd^T x) as (K, r, d_in); dB_k = s_k (dy^T S_bd) block k, as (K, d_out, r).

    Two GEMMs reducing over rows in a fixed order (no atomics): deterministic.
    """
    num_hyp, r, d_in = lora_A.shape
    grad_A = (grad_shrink_bd.t() @ x).view(num_hyp, r, d_in)
    if grad_y.dtype in (torch.float16, torch.bfloat16) and _mm_out_dtype_supported(grad_y.device):
        grad_Bt = torch.mm(shrink_bd.t(), grad_y, out_dtype=torch.float32)  # rounded once, after the scaling
    else:
        grad_Bt = shrink_bd.t() @ grad_y
    grad_Bt = grad_Bt.view(num_hyp, r, grad_y.shape[-1])  # (K, r, d_out)
    # one elementwise kernel scales, transposes to (K, d_out, r) and casts (computed in fp32)
    grad_B = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
    torch.mul(grad_Bt.transpose(1, 2), scaling[:, None, None], out=grad_B)
    return grad_A.to(lora_A.dtype), grad_B


# LoRA dropout: only the shrink sees dropout(x) (the base GEMM sees x), with a keep mask that is a
# counter-based hash of (seed, row m, column d), so that nothing is stored for the backward and
# torch (the reference) and Triton (the shrink, the dx epilogue, the x_d kernel) draw the same bits:
#     row_key[m] = lowbias32(m ^ lowbias32(seed))            (once per row of a tile)
#     keep[m, d] = (lowbias32(d ^ row_key[m]) >> 8) >= round(p * 2^24)
# (lowbias32: a 32-bit integer hash, a bijection: two multiply-xorshift rounds, ~8 integer ops per
# element, all in 32 bits); kept values scale by 1 / (1 - p).
DROPOUT_BITS = 24


def _dropout_threshold(p: float) -> int:
    return int(round(p * (1 << DROPOUT_BITS)))


def _mul32(h: Tensor, k: int) -> Tensor:
    """(h * k) mod 2^32 for int64 h in [0, 2^32) and a 32-bit constant k, without int64 overflow."""
    return ((h & 0xFFFF) * k + ((((h >> 16) * k) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _lowbias32_torch(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def dropout_keep_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """(rows, cols) bool: the keep mask that multi_lora_linear's LoRA dropout draws for `seed`
    (an int64 (1,) tensor) on x (rows, cols) flattened to rows of d_in = cols."""
    seed_key = _lowbias32_torch(seed.to(torch.int64) & 0xFFFFFFFF)
    row_key = _lowbias32_torch(torch.arange(rows, device=seed.device, dtype=torch.int64) ^ seed_key)
    h = _lowbias32_torch(torch.arange(cols, device=seed.device, dtype=torch.int64)[None, :] ^ row_key[:, None])
    return (h >> 8) >= _dropout_threshold(p)


def _dropout_seed(device) -> Tensor:
    """One draw of torch's generator for this call's dropout mask (on the device: no host sync)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def _dropped_ref(xf: Tensor, dropout_seed: Optional[Tensor], lora_dropout: float) -> Tensor:
    if not lora_dropout:
        return xf
    keep = dropout_keep_mask(dropout_seed.to(xf.device), xf.shape[0], xf.shape[1], lora_dropout)
    return torch.where(keep, xf * (1.0 / (1.0 - lora_dropout)), 0.0)


def multi_lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed=None,
                          lora_dropout=0.0):
    """Reference forward on flattened rows x (M, d_in) -> (y (M, d_out), S_bd (M, K*r))."""
    acc = _acc_dtype(x.dtype)
    num_hyp = lora_A.shape[0]
    xf = x.to(acc)
    row_hyp = _row_hypotheses(x.shape[0], num_hyp, hypothesis_ids, row_div, x.device)
    x_lora = _dropped_ref(xf, dropout_seed, lora_dropout)
    shrink_bd = _keep_own_block(x_lora @ _stack_A(lora_A, acc).t(), row_hyp, num_hyp)
    y = shrink_bd @ _stack_B(lora_B, scaling, acc).t()
    if weight is not None:
        y = y + xf @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), shrink_bd.to(x.dtype)


def multi_lora_linear_ref_backward(grad_y, x, weight, lora_A, lora_B, scaling, hypothesis_ids, row_div, shrink_bd,
                                   dropout_seed=None, lora_dropout=0.0):
    acc = _acc_dtype(x.dtype)
    num_hyp = lora_A.shape[0]
    dyf = grad_y.to(acc)
    row_hyp = _row_hypotheses(x.shape[0], num_hyp, hypothesis_ids, row_div, x.device)
    grad_shrink_bd = _keep_own_block(dyf @ _stack_B(lora_B, scaling, acc), row_hyp, num_hyp)
    grad_x = _dropped_ref(grad_shrink_bd @ _stack_A(lora_A, acc), dropout_seed, lora_dropout)  # same mask and scale
    if weight is not None:
        grad_x = grad_x + dyf @ weight.to(acc)
    x_lora = _dropped_ref(x.to(acc), dropout_seed, lora_dropout)
    grad_A, grad_B = _lora_weight_grads(grad_shrink_bd, shrink_bd.to(acc), x_lora, dyf, scaling, lora_A, lora_B)
    return grad_x.to(x.dtype), grad_A, grad_B


def multi_lora_linear_shared_ref(x, weight, bias, lora_A, lora_B, scaling, num_groups):
    """Shared input. x (G*L, d_in) -> (y (G*K*L, d_out) grouped (G, K, L), S_all (G*L, K*r))."""
    acc = _acc_dtype(x.dtype)
    num_hyp, r, d_in = lora_A.shape
    xf = x.to(acc)
    shrink_all = xf @ _stack_A(lora_A, acc).t()  # (G*L, K*r)
    base = xf @ weight.to(acc).t() if weight is not None else xf.new_zeros(x.shape[0], lora_B.shape[1])
    if bias is not None:
        base = base + bias.to(acc)
    b_scaled = lora_B.to(acc) * scaling.to(acc)[:, None, None]  # (K, d_out, r)
    rows, d_out = x.shape[0], base.shape[-1]  # explicit sizes: -1 is ambiguous when d_out = 0
    delta = torch.einsum("mkr,kor->kmo", shrink_all.view(rows, num_hyp, r), b_scaled)  # (K, G*L, d_out)
    y = (base[None] + delta).view(num_hyp, num_groups, rows // num_groups, d_out).transpose(0, 1)  # (G, K, L, d_out)
    return y.reshape(rows * num_hyp, d_out).to(x.dtype), shrink_all.to(x.dtype)


def _group_rows(grad_y: Tensor, num_groups: int, num_hyp: int) -> Tensor:
    """Shared input's output rows (G*K*L, d_out) as (G, K, L, d_out)."""
    rows, d_out = grad_y.shape
    return grad_y.reshape(num_groups, num_hyp, rows // (num_groups * num_hyp), d_out)


def _shared_lora_grads(grad_y4, x, lora_A, lora_B, scaling, shrink_all):
    """Shared input, in the dtype of grad_y4 (G, K, L, d_out): dS_all (G*L, K*r), dA, dB.

    dS_all[m, block k] = s_k dy[(m, k)] B_k;  dA = dS_all^T x;  dB_k = s_k sum_m dy[(m, k)]^T S_all[m, block k].
    """
    num_hyp, r, d_in = lora_A.shape
    dtype = grad_y4.dtype
    rows = x.shape[0]  # G*L; explicit sizes: -1 is ambiguous when d_out = 0
    dy_k = grad_y4.transpose(0, 1).reshape(num_hyp, rows, grad_y4.shape[-1])  # (K, G*L, d_out)
    b_scaled = lora_B.to(dtype) * scaling.to(dtype)[:, None, None]  # (K, d_out, r)
    grad_shrink_all = torch.bmm(dy_k, b_scaled).transpose(0, 1).reshape(rows, num_hyp * r)  # (G*L, K*r)
    grad_A = (grad_shrink_all.t() @ x.to(dtype)).view(num_hyp, r, d_in)
    shrink_k = shrink_all.to(dtype).view(rows, num_hyp, r).transpose(0, 1)  # (K, G*L, r)
    grad_B = torch.bmm(dy_k.transpose(1, 2), shrink_k) * scaling.to(dtype)[:, None, None]
    return grad_shrink_all, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype).contiguous()


def multi_lora_linear_shared_ref_backward(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups):
    acc = _acc_dtype(x.dtype)
    num_hyp = lora_A.shape[0]
    grad_y4 = _group_rows(grad_y.to(acc), num_groups, num_hyp)
    grad_shrink_all, grad_A, grad_B = _shared_lora_grads(grad_y4, x, lora_A, lora_B, scaling, shrink_all)
    grad_x = grad_shrink_all @ _stack_A(lora_A, acc)
    if weight is not None:
        grad_x = grad_x + grad_y4.sum(1).reshape(x.shape[0], grad_y.shape[-1]) @ weight.to(acc)
    return grad_x.to(x.dtype), grad_A, grad_B


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - the reference backend still works without triton
    triton = None

if triton is not None:
    from loramcl_kernels.ops._triton_utils import grouped_tile

    @triton.jit
    def _lowbias32(h):
        h ^= h >> 16
        h *= 0x7FEB352D
        h ^= h >> 15
        h *= 0x846CA68B
        return h ^ (h >> 16)

    @triton.jit
    def _dropout_row_key(seed_ptr, rows):
        """(BM,) uint32 row keys of the LoRA dropout mask: see dropout_keep_mask."""
        seed_key = _lowbias32(tl.load(seed_ptr).to(tl.uint32))
        return _lowbias32(rows.to(tl.uint32) ^ seed_key)

    @triton.jit
    def _dropped(v, row_key, cols, threshold, keep_scale):
        """dropout of a (BM, BN) tile v in fp32: v * keep_scale where the LoRA dropout keeps
        (rows with (BM,) row_key, columns cols (BN,)), 0 elsewhere."""
        keep = (_lowbias32(cols.to(tl.uint32)[None, :] ^ row_key[:, None]) >> 8) >= threshold
        return tl.where(keep, v.to(tl.float32) * keep_scale, 0.0)

    @triton.jit
    def _dropout_rows_kernel(x_ptr, seed_ptr, out_ptr, M, D, stride_xm, threshold, keep_scale,
                             BM: tl.constexpr, BD: tl.constexpr):
        """out (M, D) contiguous = dropout(x): x where kept, scaled by 1 / (1 - p), else 0."""
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
        mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows * stride_xm + offs_d[None, :], mask=mask, other=0.0)
        x = _dropped(x, _dropout_row_key(seed_ptr, offs_m), offs_d, threshold, keep_scale)
        tl.store(out_ptr + rows * D + offs_d[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rows_times_p_t(x_rows, mask_m, p_rows, mask_p, stride_pd, d_end, D, seed_ptr, offs_m, dropout_threshold,
                        dropout_scale, acc, BD: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
        """acc + x[rows, :d_end] P[cols, :d_end]^T (fp32): x_rows (BM, 1) and p_rows (BC,) point at
        the start of each row; x's columns are contiguous, P's d stride is stride_pd; x is
        dropout(x) with DROPOUT."""
        if DROPOUT:
            row_key = _dropout_row_key(seed_ptr, offs_m)
        for d0 in range(0, d_end, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask_d = offs_d < D
            xt = tl.load(x_rows + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            if DROPOUT:
                xt = _dropped(xt, row_key, offs_d, dropout_threshold, dropout_scale).to(xt.dtype)
            pt = tl.load(p_rows[:, None] + offs_d[None, :] * stride_pd, mask=mask_p[:, None] & mask_d[None, :],
                         other=0.0)
            acc = tl.dot(xt, tl.trans(pt), acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _shrink_run_tile(x_ptr, p_ptr, scale_ptr, ids_ptr, out_ptr, seed_ptr, M, D, NUM_HYP, ROW_DIV,
                         stride_xm, stride_pk, stride_pj, stride_pd, stride_om, dropout_threshold, dropout_scale,
                         R: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, R_PAD: tl.constexpr,
                         HAS_IDS: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         DROPOUT: tl.constexpr):
        """The RUNS tile of _shrink_kernel: program (run, t) takes rows run * ROW_DIV + t * BM + i
        (i < BM, inside the run), whose hypothesis is h = ids[run] or run % K (-1: all zeros)."""
        run = tl.program_id(0)
        in_run = tl.program_id(1) * BM + tl.arange(0, BM)
        offs_m = run.to(tl.int64) * ROW_DIV + in_run
        mask_m = (in_run < ROW_DIV) & (offs_m < M)
        if HAS_IDS:
            hyp = tl.load(ids_ptr + run).to(tl.int32)
        else:
            hyp = run % NUM_HYP
        j = tl.arange(0, R_PAD)
        mask_j = j < tl.where(hyp >= 0, R, 0)  # no columns of P for base-only rows
        p_rows = tl.maximum(hyp, 0).to(tl.int64) * stride_pk + j * stride_pj
        d_end = tl.where(hyp >= 0, D, 0)  # base-only rows (h = -1) read nothing
        acc = _rows_times_p_t(x_ptr + offs_m[:, None] * stride_xm, mask_m, p_ptr + p_rows, mask_j, stride_pd, d_end,
                              D, seed_ptr, offs_m, dropout_threshold, dropout_scale, tl.zeros((BM, R_PAD), tl.float32),
                              BD, DOT_PRECISION, DROPOUT)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + tl.maximum(hyp, 0))
        out_rows = out_ptr + offs_m[:, None] * stride_om + j[None, :]
        mask_out = mask_m[:, None] & (j < R)[None, :]
        for k in range(NUM_HYP):  # block h gets the product, every other block its zeros
            tl.store(out_rows + k * R, tl.where(k == hyp, acc, 0.0).to(out_ptr.dtype.element_ty), mask=mask_out)

    @triton.jit
    def _shrink_kernel(
        x_ptr, p_ptr, scale_ptr, ids_ptr, out_ptr, seed_ptr,
        M, D, NUM_HYP, ROW_DIV,
        stride_xm, stride_pk, stride_pj, stride_pd, stride_om, dropout_threshold, dropout_scale,
        R: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_DIAG: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DROPOUT: tl.constexpr = False, RUNS: tl.constexpr = False,
    ):
        """out (M, K*r) = x P^T, P (K, r, D) addressed by strides, block k scaled by s_k.

        BLOCK_DIAG: row m keeps only block h(m) = ids[m // ROW_DIV] (HAS_IDS) or (m // ROW_DIV) % K,
        zeros elsewhere (S_bd); else every block is kept (shared input).
        DROPOUT: x is dropout(x) (_dropped with seed_ptr's seed, kept values times dropout_scale).
        One program: BM rows x BC columns of the padded (K * R_PAD) column space; or, RUNS (block
        diagonal): BM rows of one run of ROW_DIV rows, which all belong to one hypothesis h, so the
        program reads only P_h and computes only block h (BC = R_PAD), then writes zeros to the
        other blocks of its rows.
        """
        if RUNS:
            _shrink_run_tile(x_ptr, p_ptr, scale_ptr, ids_ptr, out_ptr, seed_ptr, M, D, NUM_HYP, ROW_DIV,
                             stride_xm, stride_pk, stride_pj, stride_pd, stride_om, dropout_threshold,
                             dropout_scale, R, BM, BD, R_PAD, HAS_IDS, HAS_SCALE, DOT_PRECISION, DROPOUT)
            return
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_c = tl.arange(0, BC)
        blk = pid_c * (BC // R_PAD) + offs_c // R_PAD
        j = offs_c % R_PAD
        mask_m = offs_m < M
        mask_c = (blk < NUM_HYP) & (j < R)
        p_rows = blk.to(tl.int64) * stride_pk + j * stride_pj
        acc = _rows_times_p_t(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm, mask_m, p_ptr + p_rows, mask_c,
                              stride_pd, D, D, seed_ptr, offs_m, dropout_threshold, dropout_scale,
                              tl.zeros((BM, BC), tl.float32), BD, DOT_PRECISION, DROPOUT)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + blk, mask=blk < NUM_HYP, other=0.0)[None, :]
        if BLOCK_DIAG:
            if HAS_IDS:
                hyp = tl.load(ids_ptr + offs_m // ROW_DIV, mask=mask_m, other=-1)
            else:
                hyp = (offs_m // ROW_DIV) % NUM_HYP
            acc = tl.where(blk[None, :] == hyp[:, None], acc, 0.0)
        cols = blk * R + j
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _gemm_expand_kernel(
        x_ptr, w_ptr, init_ptr, s_ptr, e_ptr, scale_ptr, bias_ptr, out_ptr, seed_ptr,
        M, N, KD, L, NUM_PROGRAMS, M_BUCKET,
        stride_init, stride_sm, stride_ek, stride_en, stride_ej, stride_om, dropout_threshold, dropout_scale,
        NUM_HYP: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GM: tl.constexpr, R_PAD: tl.constexpr,
        HAS_BASE: tl.constexpr, W_KN: tl.constexpr, HAS_INIT: tl.constexpr, SHARED_OUT: tl.constexpr,
        EXPAND_TMA: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        E_ROWS_OF_R: tl.constexpr = False, DROPOUT: tl.constexpr = False, FLATTEN: tl.constexpr = False,
        TMA_STORE: tl.constexpr = False, E_KN: tl.constexpr = False,
    ):
        """out = [x W^T] + [init] + [bias] + expand, tiles of (BM, BN) visited round-robin by NUM_PROGRAMS.

        M_BUCKET (unused in the body): M rounded up to a power of two, the autotuner's key in place of
        M, so that batches of varying length tune once per power of two rather than once per M.

        HAS_BASE: x (M, KD) and W ((N, KD), or (KD, N) when W_KN) through TMA tensor descriptors.
        Expand with S (M, K*r) (block-diagonal or dense, row stride stride_sm):
          EXPAND_TMA: E_all (N, K*r) with s_k folded in, row stride stride_en; the expand is
                      ceil(K*r / BK) more K-steps of the same GEMM: acc += S E_all^T. E_KN: E_all^T
                      (K*r, N) instead, row stride stride_en (dx's A_all is lora_A itself: no copy).
          else:       E_k (N, r) addressed by strides (k, n, j): acc += sum_k s_k S[m, block k] E_k^T
          SHARED_OUT: output row (m // L)*K*L + k*L + m % L gets acc + s_k S[m, block k] E_k^T, per k.
          DROPOUT (per-hypothesis expand, not SHARED_OUT): the expand is masked by the LoRA dropout
                      keep mask at (m, n) and scaled by dropout_scale (dx of dropout(x), N = d_in).
        TMA_STORE (HAS_BASE, not SHARED_OUT; out (M, N) with 16-byte aligned rows): each output tile
        leaves as two (BM, BN/2) halves through a tensor descriptor (staged in shared memory, stored
        by the copy engine while the next tile's loads run, rows and columns past (M, N) clipped),
        else through a masked store of a tile of pointers. Compiled for sm_90 (bf16, 128 x 256, K*r
        <= BK): 156 registers against 172, shared memory 229416 of the 232448 bytes a block may
        use (a whole (BM, BN) staging tile takes 262184: over it).

        Loop shape: Triton flattens the persistent loop (tiles x K-steps as one software pipeline, so
        the next tile's first loads are in flight while this tile's expand and stores run) only when
        each tile's body holds a single inner loop (its FuseNestedLoops pass); otherwise every tile
        fills and drains its own pipeline. FLATTEN (the persistent GEMM on 16-bit operands) asks for
        it, and an expand through TMA of K*r <= BK columns (r <= 16 at K <= 4, r = 8 at K <= 8) is
        then one straight-line step after the base K-loop. Its tiles take shared memory of their own
        (48 KB at 128 x 256 in bf16); with fp32 operands, flattened, no configuration stayed within
        the limit (even a one-step loop, folded once NUM_HYP is a constexpr), so fp32 is not
        flattened. Wider expands (K*r > BK) keep their loop, as does the per-hypothesis expand:
        unrolled, the former's steps each took shared memory of their own (sm_90 compile, triton
        3.6), the latter's wgmma instructions were serialised (ptxas C7515) and, with SHARED_OUT, its
        K extra accumulators spilled.
        """
        pid = tl.program_id(0)
        num_pm = tl.cdiv(M, BM)
        num_pn = tl.cdiv(N, BN)
        num_tiles = num_pm * num_pn
        if HAS_BASE:
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, KD], strides=[KD, 1], block_shape=[BM, BK])
            if W_KN:
                w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KD, N], strides=[N, 1], block_shape=[BK, BN])
            else:
                w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, KD], strides=[KD, 1], block_shape=[BN, BK])
        if EXPAND_TMA:
            s_desc = tl.make_tensor_descriptor(s_ptr, shape=[M, NUM_HYP * R], strides=[stride_sm, 1],
                                               block_shape=[BM, BK])
            if E_KN:
                e_desc = tl.make_tensor_descriptor(e_ptr, shape=[NUM_HYP * R, N], strides=[stride_en, 1],
                                                   block_shape=[BK, BN])
            else:
                e_desc = tl.make_tensor_descriptor(e_ptr, shape=[N, NUM_HYP * R], strides=[stride_en, 1],
                                                   block_shape=[BN, BK])
        tl.static_assert(not (TMA_STORE and SHARED_OUT), "shared input's K outputs are stored per hypothesis")
        if TMA_STORE:
            out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                                 block_shape=[BM, BN // 2])
        offs_j = tl.arange(0, R_PAD)
        mask_j = offs_j < R
        for tile in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=FLATTEN):  # see Loop shape
            pm, pn = grouped_tile(tile, num_pm, num_pn, GM)
            offs_m = pm * BM + tl.arange(0, BM)
            offs_n = pn * BN + tl.arange(0, BN)
            mask_m = offs_m < M
            mask_n = offs_n < N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            if HAS_BASE:
                for ki in range(tl.cdiv(KD, BK)):
                    a = x_desc.load([pm * BM, ki * BK])
                    if W_KN:
                        b = w_desc.load([ki * BK, pn * BN])
                        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                    else:
                        b = w_desc.load([pn * BN, ki * BK])
                        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
            if EXPAND_TMA:  # the LoRA expand: K*r more columns of the reduction (see Loop shape)
                if NUM_HYP * R <= BK and FLATTEN:  # one step
                    a = s_desc.load([pm * BM, 0])
                    if E_KN:
                        acc = tl.dot(a, e_desc.load([0, pn * BN]), acc, input_precision=DOT_PRECISION)
                    else:
                        acc = tl.dot(a, e_desc.load([pn * BN, 0]).T, acc, input_precision=DOT_PRECISION)
                else:
                    for kk in range(tl.cdiv(NUM_HYP * R, BK)):
                        a = s_desc.load([pm * BM, kk * BK])
                        if E_KN:
                            acc = tl.dot(a, e_desc.load([kk * BK, pn * BN]), acc, input_precision=DOT_PRECISION)
                        else:
                            acc = tl.dot(a, e_desc.load([pn * BN, kk * BK]).T, acc, input_precision=DOT_PRECISION)
            mask_mn = mask_m[:, None] & mask_n[None, :]
            if HAS_INIT:
                acc += tl.load(init_ptr + offs_m.to(tl.int64)[:, None] * stride_init + offs_n[None, :],
                               mask=mask_mn, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if not EXPAND_TMA:  # per-hypothesis expand from strided loads (epilogue / shared outputs)
                s_rows = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_j[None, :]
                if E_ROWS_OF_R:  # E_k rows are r contiguous elements (B_k): a row stride known when compiling
                    e_rows = e_ptr + offs_n[:, None] * R + offs_j[None, :]
                else:
                    e_rows = e_ptr + offs_n[:, None] * stride_en + offs_j[None, :] * stride_ej
                mask_s = mask_m[:, None] & mask_j[None, :]
                mask_e = mask_n[:, None] & mask_j[None, :]
                if DROPOUT:
                    lora = tl.zeros((BM, BN), dtype=tl.float32)
                else:
                    lora = acc
                for k in range(NUM_HYP):
                    s_k = tl.load(s_rows + k * R, mask=mask_s, other=0.0)
                    if HAS_SCALE:
                        s_k = s_k.to(tl.float32) * tl.load(scale_ptr + k)
                    e_k = tl.load(e_rows + k * stride_ek, mask=mask_e, other=0.0)
                    if SHARED_OUT:
                        out = tl.dot(s_k.to(e_k.dtype), tl.trans(e_k), acc, input_precision=DOT_PRECISION)
                        rows = (offs_m // L) * (NUM_HYP * L) + k * L + offs_m % L
                        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                                 out.to(out_ptr.dtype.element_ty), mask=mask_mn)
                    else:
                        lora = tl.dot(s_k.to(e_k.dtype), tl.trans(e_k), lora, input_precision=DOT_PRECISION)
                if DROPOUT:
                    acc += _dropped(lora, _dropout_row_key(seed_ptr, offs_m), offs_n, dropout_threshold,
                                    dropout_scale)
                else:
                    acc = lora
            if TMA_STORE:
                halves = tl.permute(tl.reshape(acc.to(out_ptr.dtype.element_ty), (BM, 2, BN // 2)), (0, 2, 1))
                left, right = tl.split(halves)
                out_desc.store([pm * BM, pn * BN], left)
                out_desc.store([pm * BM, pn * BN + BN // 2], right)
            elif not SHARED_OUT:
                tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                         acc.to(out_ptr.dtype.element_ty), mask=mask_mn)


    @triton.jit
    def _decode_partial_kernel(
        x_ptr, w_ptr, a_ptr, ws_ptr,
        M, N, D, KR, D_SPLIT, NT,
        stride_xm, stride_wn, stride_ar, stride_ws_split, stride_ws_m,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
        GDC: tl.constexpr = False,
    ):
        """Decode, step 1 of 2: split-K partial products of x with the rows of [W; A_all].

        The shrink x A_all^T is x times K*r more "output rows", so it is computed once, by its own
        column tiles, instead of once per output tile. Program (pid_m, pid_c, pid_s):
        ws[pid_s, rows, pid_c*BN : +BN] = x[rows, d-range] [W; A_all][cols, d-range]^T in fp32, over
        d in [pid_s * D_SPLIT, +D_SPLIT). Column tiles c < NT are rows of W (d_out), c >= NT rows
        (c - NT) * BN + i of A_all (K*r, d_in) (NT = 0 without W). Both are read along d with unit
        stride.
        GDC (programmatic dependent launch, Hopper): every program lets the finish kernel launch as
        it starts; the finish kernel waits for this grid's completion before reading ws.
        """
        if GDC:
            tl.extra.cuda.gdc_launch_dependents()
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < M
        # a scalar choice of (base, row stride, row count): the loads keep their known alignment
        is_w = pid_c < NT
        base = tl.where(is_w, w_ptr, a_ptr)
        row_stride = tl.where(is_w, stride_wn, stride_ar)
        offs_r = pid_c * BN + tl.arange(0, BN) - tl.where(is_w, 0, NT * BN)
        mask_r = offs_r < tl.where(is_w, N, KR)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        r_rows = base + offs_r.to(tl.int64)[:, None] * row_stride
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        d_lo = pid_s * D_SPLIT
        for d0 in range(d_lo, d_lo + D_SPLIT, BK):
            offs_d = d0 + tl.arange(0, BK)
            mask_d = offs_d < D
            xt = tl.load(x_rows + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            rt = tl.load(r_rows + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            acc = tl.dot(xt, tl.trans(rt), acc, input_precision=DOT_PRECISION)
        cols = pid_c * BN + tl.arange(0, BN)
        tl.store(ws_ptr + pid_s * stride_ws_split + offs_m.to(tl.int64)[:, None] * stride_ws_m + cols[None, :], acc,
                 mask=mask_m[:, None])

    @triton.jit
    def _decode_finish_kernel(
        ws_ptr, bias_ptr, b_ptr, scale_ptr, ids_ptr, out_ptr, shrink_ptr,
        M, N, NUM_HYP, ROW_DIV, NUM_SPLITS, A_COL0,
        stride_ws_split, stride_ws_m, stride_om, stride_sm,
        R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, HAS_BASE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr, GDC: tl.constexpr = False,
    ):
        """Decode, step 2 of 2: y = sum_s ws_s[:, outputs] + bias + s_h S_bd B_h^T.

        Program (pid_m, pid_n): BM rows x BN outputs. The shrink S_bd = sum_s ws_s[:, A_COL0 + c]
        (BC >= K*r columns, c = k*r + j) is read block-diagonally: row m loads only the r columns
        of its block h(m) (the load's mask; the other K-1 blocks stay zero and cost no reads, so
        each program reads K times fewer partials of S than the whole (BM, BC) tile). It is
        rounded to x's dtype like S_bd of the other paths, scaled and multiplied by its (BN, BC)
        slice of B; the programs of output tile 0 store S_bd for backward. Splits are summed in a
        fixed order: deterministic.
        GDC (launched as the partial kernel's programmatic dependent, Hopper): the programs start
        while the partial kernel runs and wait for its grid to finish. B, the scaling and the bias
        are read after the wait: loaded before it, they stay live across the split loop (sm_90
        spills at BC = 256).
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_c = tl.arange(0, BC)
        blk = offs_c // R
        j = offs_c % R
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask_c = offs_c < NUM_HYP * R
        if HAS_IDS:  # an input: read before the wait
            hyp = tl.load(ids_ptr + offs_m // ROW_DIV, mask=mask_m, other=-1)
        else:
            hyp = (offs_m // ROW_DIV) % NUM_HYP
        # row m's own block of S (a row of id -1 has none)
        mask_own = mask_m[:, None] & mask_c[None, :] & (blk[None, :] == hyp[:, None])
        if GDC:
            tl.extra.cuda.gdc_wait()
        ws_rows = ws_ptr + offs_m.to(tl.int64)[:, None] * stride_ws_m
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_s = tl.zeros((BM, BC), dtype=tl.float32)
        for split in range(NUM_SPLITS):
            if HAS_BASE:
                acc += tl.load(ws_rows + split * stride_ws_split + offs_n[None, :],
                               mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            acc_s += tl.load(ws_rows + split * stride_ws_split + A_COL0 + offs_c[None, :], mask=mask_own, other=0.0)
        s_bd = acc_s.to(shrink_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(shrink_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_c[None, :], s_bd,
                     mask=mask_m[:, None] & mask_c[None, :])
        scale = tl.load(scale_ptr + blk, mask=mask_c, other=0.0)
        # B contiguous (K, d_out, r): row stride r, known when compiling, so rows load as vectors
        bt = tl.load(b_ptr + blk.to(tl.int64)[None, :] * (N * R) + offs_n[:, None] * R + j[None, :],
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        s_op = (s_bd.to(tl.float32) * scale[None, :]).to(bt.dtype)
        acc = tl.dot(s_op, tl.trans(bt), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _r_pad(r: int) -> int:
    return max(16, _next_pow2(r))


# fp32 inputs must match fp32 PyTorch, so their dots use full fp32 (no tf32); 16-bit inputs ignore it.
_DOT_PRECISION = "ieee"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gemm_configs():
    if _interpreting():
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GM": 4}, num_stages=1, num_warps=4)]
    return [
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GM": 8}, num_stages=3, num_warps=8),
        triton.Config({"BM": 128, "BN": 128, "BK": 64, "GM": 8}, num_stages=4, num_warps=8),
        triton.Config({"BM": 64, "BN": 128, "BK": 64, "GM": 8}, num_stages=4, num_warps=4),
    ]


# The autotuner's key: the sizes, and every variant flag, for the variants need different amounts of
# shared memory (at large r a 128 x 256 tile fits shared input's but not the distinct rows' TMA-store
# variant), and Triton launches a key's tuned config without checking that it fits.
_GEMM_TUNING_KEY = ["M_BUCKET", "N", "KD", "R", "NUM_HYP", "HAS_BASE", "W_KN", "HAS_INIT", "SHARED_OUT", "EXPAND_TMA",
                    "HAS_SCALE", "HAS_BIAS", "E_ROWS_OF_R", "DROPOUT", "FLATTEN", "TMA_STORE", "E_KN"]
if triton is not None:
    _gemm_kernel = triton.autotune(configs=_gemm_configs(), key=_GEMM_TUNING_KEY)(_gemm_expand_kernel)


def _dropout_args(dropout, fallback: Tensor) -> tuple:
    """dropout = (seed tensor, p) or None -> (seed_ptr, threshold, scale) kernel arguments."""
    if dropout is None:
        return fallback, 0, 1.0
    seed, p = dropout
    return seed, _dropout_threshold(p), 1.0 / (1.0 - p)


def _shrink_stage_buffers(stages: int, block_m: int, element_size: int, capability: int) -> int:
    """Shared-memory buffers of x and P tiles that Triton keeps for a shrink of `stages` stages.
    Compiled for sm_90 with triton 3.6 and 3.9 (tests/sm90_compile.py): where the dot is Hopper's
    warpgroup MMA (16-bit tiles of 64 rows) all `stages`; as per-warp MMA (32-row tiles, fp32, the
    cards before Hopper) stages - 1. Later cards are counted as Hopper (not compiled here)."""
    return stages if capability >= 9 and element_size == 2 and block_m >= 64 else stages - 1


def _launch_shrink(x: Tensor, p: Tensor, scaling: Optional[Tensor], hypothesis_ids: Optional[Tensor],
                   row_div: int, block_diag: bool, dropout=None) -> Tensor:
    """x (M, D) times P (K, r, D) (any strides) -> (M, K*r) in x's dtype (S_bd when block_diag);
    dropout = (seed, p): dropout(x) instead of x. Block diagonal with runs of row_div >= BM rows
    per hypothesis: per-run tiles that read only P_h (see _shrink_kernel's RUNS)."""
    m, d = x.shape
    num_hyp, r, _ = p.shape
    r_pad = _r_pad(r)
    out = torch.empty(m, num_hyp * r, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    on_cpu = x.device.type == "cpu"  # CPU tensors only run under the Triton interpreter
    block_m, block_d = (16, 32) if on_cpu else (SHRINK_GPU_BM, SHRINK_GPU_BD_BYTES // x.element_size())
    # Block diagonal with runs of at least a tile of rows per hypothesis (a sequence's tokens):
    # per-run tiles that read and multiply P_h only. Else every program takes all the blocks of
    # BC columns and masks them (decode-like runs of few rows, shared input).
    # (grid dim 1 limit: counted with the fewest rows a tile may end up with below)
    runs = block_diag and row_div >= block_m and cdiv(row_div, min(block_m, 32)) < 65536
    block_c = r_pad if runs else r_pad * min(_next_pow2(num_hyp), max(1, 256 // r_pad))
    # x is read once; many row tiles keep every SM streaming (P is re-read from L2)
    # shared memory: rows, then the K-step, halve until two stages fit (99 KB cards; K*r = 256 on
    # Hopper: 64 x 256 bf16 of x and 256 x 256 of P are 160 KB a K-step), then as many stages as fit
    capability = 0 if on_cpu else _device_facts(x.device)[1]
    budget = 0 if on_cpu else _shared_memory_budget(x.device)
    while not on_cpu and _shrink_stage_buffers(2, block_m, x.element_size(), capability) * (
            block_m + block_c) * block_d * x.element_size() > budget:
        if block_m > 32:
            block_m //= 2
        elif block_d > 32:
            block_d //= 2
        else:
            break
    stage_bytes = (block_m + block_c) * block_d * x.element_size()
    unbuffered = 2 - _shrink_stage_buffers(2, block_m, x.element_size(), capability)  # 1: the stage in registers
    stages = 1 if on_cpu else max(2, min(SHRINK_GPU_MAX_STAGES, budget // stage_bytes + unbuffered))
    if runs:
        grid = (cdiv(m, row_div), cdiv(row_div, block_m))
    else:
        grid = (cdiv(m, block_m), cdiv(num_hyp, block_c // r_pad))
    seed, threshold, keep_scale = _dropout_args(dropout, x)
    launch(_shrink_kernel, grid,
        x, p, scaling if scaling is not None else x, hypothesis_ids if hypothesis_ids is not None else x, out, seed,
        m, d, num_hyp, row_div,
        x.stride(0), p.stride(0), p.stride(1), p.stride(2), out.stride(0), threshold, keep_scale,
        R=r, BM=block_m, BD=block_d, BC=block_c, R_PAD=r_pad, BLOCK_DIAG=block_diag,
        HAS_IDS=hypothesis_ids is not None, HAS_SCALE=scaling is not None, DOT_PRECISION=_DOT_PRECISION,
        DROPOUT=dropout is not None, RUNS=runs, num_warps=SHRINK_GPU_WARPS, num_stages=stages,
    )
    return out


def _choose_path(x: Tensor, weight: Optional[Tensor], shared_input: bool = False) -> str:
    """'fused', 'cublas' or 'decode' for this call (shared_input: a GEMM of shared input's forward,
    K outputs per row of x, or backward); env LORAMCL_MULTI_LORA_PATH overrides auto.

    decode: the whole forward of a few rows in two kernels, see _decode_partial_kernel; only the
    forward of distinct rows, with at most DECODE_MAX_ROWS rows, K*r <= 256 and W read along d_in
    (_decode_applies); where it does not apply (the backward's dx, shared input) callers take cublas.

    auto, on Hopper GPUs with 16-bit operands (measured on an H200, bf16, d=4096,
    benchmarks/measured/), elsewhere cublas. fp32 operands take cublas: compiled for sm_90, the fp32
    variants of the fused GEMM and of the decode finish kernel keep 10-19 KB a thread in local
    memory (their exact fp32 dots are FMA loops over whole tiles), where cuBLAS's SGEMM does not.
    - decode up to DECODE_AUTO_MAX_ROWS rows: the split-K pair took 23.2 / 18.5 / 23.1 / 20.1 us
      replayed from a CUDA graph at 8 rows per hypothesis against 43.5 / 40.1 / 45.0 / 55.7 us for
      cublas (K, r = 5, 8 / 4, 16 / 8, 8 / 4, 64; base 12.5-13.6 us; h200-2026-11-27), and its sweep
      17.7 / 17.2 / 17.8 / 20.3 us with the 4 splits _decode_config now takes;
    - fused for distinct rows from FUSED_MIN_ROWS rows (it needs TMA and aligned rows): on the
      H200 of 2026-11-27 (benchmarks/measured/h200-2026-11-27/, fwd+bwd) kernel time at K=4,
      T=2048, r=16 0.841 ms fused vs 0.844 ms cublas (base 0.686); replayed from a CUDA graph
      0.485 / 0.905 / 0.912 / 1.002 ms fused vs 0.482 / 0.921 / 0.920 / 1.001 ms cublas at the four
      training shapes (3900-8192 rows): within 2 %, so FUSED_MIN_ROWS stays;
    - cublas in between, and for shared input (forward and backward): graph 0.185 / 0.355 / 0.248
      / 0.390 ms on the cublas path against 0.216 / 0.388 / 0.258 / 0.408 fused at those shapes.
    """
    path = os.environ.get("LORAMCL_MULTI_LORA_PATH", "auto").lower()
    if path not in PATHS:
        raise ValueError(f"LORAMCL_MULTI_LORA_PATH must be one of {PATHS}, got '{path}'")
    if path == "decode":
        return "decode"
    capability = _device_facts(x.device)[1]
    # TMA descriptors: aligned rows, and CPU tensors (the interpreter) or a GPU the persistent TMA
    # GEMM runs on (Hopper with room for its tiles, not consumer Blackwell's 99 KB)
    eligible = (weight is not None and _tma_ok(x, weight)
                and (x.device.type == "cpu" or _tma_gemm_capable(x.device, capability)))
    if path == "fused":
        return "fused" if eligible else "cublas"
    if path == "cublas" or capability < 9 or x.dtype not in (torch.float16, torch.bfloat16) or shared_input:
        return "cublas"
    if x.shape[0] <= DECODE_AUTO_MAX_ROWS:
        return "decode"
    return "fused" if eligible and x.shape[0] >= FUSED_MIN_ROWS else "cublas"


def _launch_gemm_expand(x, weight, w_kn, init, shrink, e, e_strides, scaling, bias, out, shared_out, num_hyp, r,
                        rows_per_group=1, expand_tma=False, dropout=None, e_kn=False):
    """out = [x W^T] + [init] + [bias] + expand (masked by the LoRA dropout of dropout = (seed, p):
    the expand-only epilogue of dx).

    With weight: the fused persistent TMA GEMM (one program per SM). Without: the expand-only
    epilogue, memory bound, one program per tile so that many tiles are in flight.
    """
    m = shrink.shape[0]
    n = out.shape[1]
    if m == 0 or n == 0:
        return out
    has_base = weight is not None
    common = dict(NUM_HYP=num_hyp, R=r, R_PAD=_r_pad(r), HAS_BASE=has_base, W_KN=w_kn, HAS_INIT=init is not None,
                  SHARED_OUT=shared_out, EXPAND_TMA=expand_tma, HAS_SCALE=scaling is not None,
                  HAS_BIAS=bias is not None, DOT_PRECISION=_DOT_PRECISION,
                  E_ROWS_OF_R=not expand_tma and tuple(e_strides[1:]) == (r, 1), DROPOUT=dropout is not None,
                  # the persistent GEMM on 16-bit operands (the expand-only epilogue runs one tile per
                  # program: flattening its loop compiled to scalar 2-byte stores, sm_90 PTX)
                  FLATTEN=has_base and x.element_size() == 2 and FLATTEN_16_BIT_GEMM,
                  TMA_STORE=has_base and not shared_out and GEMM_TMA_STORE and _tma_ok(out), E_KN=e_kn)
    seed, threshold, keep_scale = _dropout_args(dropout, out)
    args = [x if has_base else out, weight if has_base else out, init if init is not None else out,
            shrink, e, scaling if scaling is not None else shrink, bias if bias is not None else out, out, seed,
            m, n, x.shape[1] if has_base else 1, rows_per_group]
    strides = [init.stride(0) if init is not None else 0, shrink.stride(0), *e_strides, out.stride(0),
               threshold, keep_scale]
    if has_base:
        _set_tma_allocator(out.device)
        num_sms = _device_facts(out.device)[0]

        def grid(meta):
            return (min(num_sms, cdiv(m, meta["BM"]) * cdiv(n, meta["BN"])),)

        launch(_gemm_kernel, grid, *args, num_sms, _next_pow2(m), *strides, **common)
    else:
        block_m, block_n = (16, 32) if out.device.type == "cpu" else (64, 128)
        tiles = cdiv(m, block_m) * cdiv(n, block_n)
        launch(_gemm_expand_kernel, (tiles,), *args, tiles, _next_pow2(m), *strides, BM=block_m, BN=block_n, BK=16,
               GM=8, **common, num_warps=4, num_stages=1)
    return out


def _base_then_expand(x, weight, w_kn, bias, shrink, e, e_strides, scaling, out, shared_out, num_hyp, r,
                      rows_per_group=1, dropout=None):
    """cublas path: base = x W^T (+ bias) by cuBLAS, then the Triton epilogue adds the expand."""
    base = None
    if weight is not None:
        w_op = weight if w_kn else weight.t()
        base = torch.addmm(bias, x, w_op) if bias is not None else x @ w_op
        bias = None
        if not shared_out:
            out = base  # the epilogue reads each tile and writes it back in place
    return _launch_gemm_expand(None, None, False, base, shrink, e, e_strides, scaling, bias, out, shared_out,
                               num_hyp, r, rows_per_group, dropout=dropout)


def _expand_then_base(x, weight, w_kn, bias, shrink, e_all_t, out):
    """cublas path, one output per row: out = S E_all^T (+ bias) by a small cuBLAS GEMM (inner size
    K*r), then out += x W^T by cuBLAS with beta = 1, which reads out in its epilogue. The expand
    costs one write of out (memory bound, ~15 us at 8192 x 4096 bf16) instead of an epilogue
    kernel's read and write of out after the base GEMM."""
    if bias is not None:
        torch.addmm(bias, shrink, e_all_t, out=out)
    else:
        torch.mm(shrink, e_all_t, out=out)
    if weight is not None:
        out.addmm_(x, weight if w_kn else weight.t())
    return out


# The fused GEMM's per-hypothesis expand (K outputs per row of shared input; S rows not 16-byte
# aligned) keeps (rows + columns) x r_pad tiles in flight: compiled for sm_90 (tests/sm90_compile.py)
# no tile configuration fits Hopper's shared memory past r_pad = 128 in 16-bit (256 bytes a row)
# or 64 in fp32; there the cublas path runs instead.
PER_K_EXPAND_MAX_BYTES = 256


def _gemm_with_expand(x, weight, w_kn, bias, shrink, e, e_strides, scaling, out, shared_out, num_hyp, r,
                      rows_per_group=1, stacked_expand_t=None, dropout=None, shared_input=False):
    """out = x W^T (+ bias) + expand: the fused path when it applies, else cuBLAS.

    stacked_expand_t() gives E_all^T (K*r, N) with the scaling folded in (A_all is a view of
    lora_A): when the rows of S and of E_all are 16-byte aligned the fused GEMM loads both through
    TMA descriptors, E_all^T as it is where its own rows are (dx: A_all, E_KN), else E_all made
    contiguous (the forward's B_all), and the expand becomes ceil(K*r / BK) extra K-steps (the
    shared-output mode always uses the per-k epilogue, which needs r_pad within
    PER_K_EXPAND_MAX_BYTES, else the cublas path runs). On the cublas path it makes the expand a
    cuBLAS GEMM under the base (_expand_then_base); the Triton epilogue remains for the K outputs
    of shared input and for dropout (dx of the LoRA dropout, whose expand is masked on its own).
    The kernels read S (M, K*r) with unit column stride (at r = 1, dS_all of shared input is not).
    """
    shrink = _contig_rows(shrink)
    if dropout is None and _choose_path(x, weight, shared_input=shared_out or shared_input) == "fused":
        if stacked_expand_t is not None and not shared_out and _tma_ok(shrink):
            e_all_t = stacked_expand_t()  # (K*r, N): dx's A_all is lora_A's own rows, read as they are
            e_kn = _tma_ok(e_all_t)
            e_all = e_all_t if e_kn else e_all_t.t().contiguous()
            return _launch_gemm_expand(x, weight.contiguous(), w_kn, None, shrink, e_all, (0, e_all.stride(0), 1),
                                       None, bias, out, False, num_hyp, r, expand_tma=True, e_kn=e_kn)
        if _r_pad(r) * x.element_size() <= PER_K_EXPAND_MAX_BYTES:
            return _launch_gemm_expand(x, weight.contiguous(), w_kn, None, shrink, e, e_strides, scaling, bias, out,
                                       shared_out, num_hyp, r, rows_per_group)
    if dropout is None and stacked_expand_t is not None and not shared_out:
        return _expand_then_base(x, weight, w_kn, bias, shrink, stacked_expand_t(), out)
    return _base_then_expand(x, weight, w_kn, bias, shrink, e, e_strides, scaling, out, shared_out, num_hyp, r,
                             rows_per_group, dropout=dropout)


def _launch_dropout_rows(x: Tensor, dropout) -> Tensor:
    """dropout(x) (M, D) materialised, for the backward's dA = dS_bd^T dropout(x)."""
    m, d = x.shape
    out = torch.empty(m, d, device=x.device, dtype=x.dtype)
    if m == 0 or d == 0:
        return out
    seed, threshold, keep_scale = _dropout_args(dropout, x)
    block_m, block_d = (16, 32) if x.device.type == "cpu" else (32, 256)
    launch(_dropout_rows_kernel, (cdiv(m, block_m), cdiv(d, block_d)),
        x, seed, out, m, d, x.stride(0), threshold, keep_scale, BM=block_m, BD=block_d, num_warps=4)
    return out


def _contig_rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _b_as_expand(lora_B: Tensor):
    """E_k = B_k (d_out, r): strides over (k, n, j)."""
    return lora_B, (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2))


def _a_as_expand(lora_A: Tensor):
    """E_k = A_k^T (d_in, r): strides over (k, n, j)."""
    return lora_A, (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1))


# GPU tiles of the decode kernels: at most this many rows per block, this many partial-product
# columns, and at most this many tiles in flight (benchmarks/sweep_decode.py varies it)
DECODE_GPU_MAX_BM, DECODE_GPU_BN, DECODE_GPU_MAX_STAGES = 64, 64, 3
# Output columns per program of the finish kernel (its grid: d_out / this many programs per row
# block; benchmarks/sweep_decode.py varies it)
DECODE_GPU_FINISH_BN = 64
# Hopper: the finish kernel as the partial kernel's programmatic dependent launch (see the kernels);
# benchmarks/sweep_decode.py turns it off to time the difference
DECODE_PDL = True


def _decode_expand_columns(num_hyp: int, r: int) -> int:
    """BC of the decode finish kernel: the K*r shrink columns padded to a power of two (>= 16)."""
    return max(16, _next_pow2(num_hyp * r))


def _decode_applies(x: Tensor, weight: Optional[Tensor], lora_A: Tensor) -> bool:
    """Few rows, K*r <= 256 shrink columns, W read along d_in, and room in shared memory for the
    finish kernel's expand operands, up to (BM rows + BN outputs) x BC columns: fp32 at K*r > 128
    needs 128 KB, more than the 99 KB cards allow (else the cublas path)."""
    num_hyp, r, _ = lora_A.shape
    expand_operand_bytes = ((DECODE_GPU_MAX_BM + DECODE_GPU_FINISH_BN) * _decode_expand_columns(num_hyp, r)
                            * x.element_size())
    return (x.shape[0] <= DECODE_MAX_ROWS and num_hyp * r <= 256
            and (weight is None or weight.stride(1) == 1 or weight.shape[1] == 1)
            and expand_operand_bytes <= _shared_memory_budget(x.device))


def _decode_config(m: int, d: int, columns: int, element_size: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BM rows, BN columns, BK, D_SPLIT) of the decode kernels for m rows, d = d_in and
    columns = d_out + K*r partial-product columns.

    GPU: the rows in one block where they fit (64), so W is read once; 64-column tiles; d split into
    the number of parts nearest to two programs per SM (d = 4096 on 132 SMs: 65 or 68 column tiles,
    4 splits of 1024). benchmarks/sweep_decode.py on an H200 (2026-11-27, bf16, under a CUDA graph):
    64 columns and 4 splits took 17.2-17.8 us at K, r = 5, 8 / 4, 16 / 8, 8 against 18.1-24.2 us
    for 1, 2 or 8 splits and 23.1-23.4 us for the 5 of the earlier rule (the splits rounded up: 325
    programs, 61 of them in a second round), and 20.3 us at 4, 64 (2 splits: 21.0).
    CPU (the interpreter, tests): small tiles and splits of 2 BK, so that tests cover several.
    """
    block_m = max(16, min(DECODE_GPU_MAX_BM, _next_pow2(m)))
    if device.type == "cpu":
        return block_m, 16, 32, 64
    block_n, block_k = DECODE_GPU_BN, 256 // element_size
    programs = cdiv(m, block_m) * cdiv(columns, block_n)
    splits = max(1, min(cdiv(d, 2 * block_k), round(2 * _device_facts(device)[0] / programs)))
    return block_m, block_n, block_k, cdiv(cdiv(d, splits), block_k) * block_k


def _launch_decode(x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div):
    """y (M, d_out) and S_bd (M, K*r) in two launches: split-K partial products of x with [W; A_all]
    into an fp32 workspace, then the sum over splits with the bias and the expand (see the kernels)."""
    m, d = x.shape
    num_hyp, r, _ = lora_A.shape
    n = lora_B.shape[1]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    shrink_bd = torch.empty(m, num_hyp * r, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out, shrink_bd.zero_()
    # A_all (K*r, d_in), rows along d_in; its row stride from the 2-D view (at r = 1 a contiguous
    # lora_A's stride(1) may be anything: torch ignores the strides of size-1 dims)
    a_all = lora_A.contiguous().view(num_hyp * r, d)
    lora_B = lora_B.contiguous()  # addressed as (K, d_out, r) contiguous
    has_base = weight is not None
    on_cpu = x.device.type == "cpu"  # the interpreter
    block_m, block_n, block_k, d_split = _decode_config(m, d, (n if has_base else 0) + num_hyp * r,
                                                        x.element_size(), x.device)
    w_tiles = cdiv(n, block_n) if has_base else 0
    columns = (w_tiles + cdiv(num_hyp * r, block_n)) * block_n  # [W tiles | A_all tiles]
    splits = cdiv(d, d_split)
    workspace = torch.empty(splits, m, columns, device=x.device, dtype=torch.float32)
    # shared memory: a buffer of the x and [W; A] tiles per stage (measured by tests/sm90_compile.py)
    stage_bytes = (block_m + block_n) * block_k * x.element_size()
    stages = 1 if on_cpu else max(1, min(DECODE_GPU_MAX_STAGES, _shared_memory_budget(x.device) // stage_bytes))
    # Hopper: the finish kernel launches while the partial kernel runs (programmatic dependent launch)
    gdc = DECODE_PDL and not on_cpu and _device_facts(x.device)[1] >= 9
    launch(_decode_partial_kernel, (cdiv(m, block_m), columns // block_n, splits),
        x, weight if has_base else x, a_all, workspace, m, n, d, num_hyp * r, d_split, w_tiles,
        x.stride(0), weight.stride(0) if has_base else 0, a_all.stride(0), workspace.stride(0), workspace.stride(1),
        BM=block_m, BN=block_n, BK=block_k, DOT_PRECISION=_DOT_PRECISION, GDC=gdc, num_warps=4, num_stages=stages,
    )
    finish_bn = 2 * block_n if on_cpu else DECODE_GPU_FINISH_BN  # CPU: tiles unlike the partial kernel's (tests)
    launch(_decode_finish_kernel, (cdiv(m, block_m), cdiv(n, finish_bn)),
        workspace, bias if bias is not None else x, lora_B, scaling,
        hypothesis_ids if hypothesis_ids is not None else x, out, shrink_bd,
        m, n, num_hyp, row_div, splits, w_tiles * block_n,
        workspace.stride(0), workspace.stride(1), out.stride(0), shrink_bd.stride(0),
        R=r, BM=block_m, BN=finish_bn, BC=_decode_expand_columns(num_hyp, r), HAS_BASE=has_base,
        HAS_BIAS=bias is not None, HAS_IDS=hypothesis_ids is not None, DOT_PRECISION=_DOT_PRECISION, GDC=gdc,
        num_warps=4, num_stages=1, launch_pdl=gdc,
    )
    return out, shrink_bd


@on_input_device
def multi_lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed=None,
                             lora_dropout=0.0):
    num_hyp, r, _ = lora_A.shape
    x, bias = _contig_rows(x), contiguous_or_none(bias)  # the fused and decode kernels read bias flat
    dropout = (dropout_seed, lora_dropout) if lora_dropout else None
    if dropout is None and _choose_path(x, weight) == "decode" and _decode_applies(x, weight, lora_A):
        return _launch_decode(x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div)
    # (M, K*r) from dropout(x) when training with LoRA dropout; the GEMM below reads x itself
    shrink_bd = _launch_shrink(x, lora_A, None, hypothesis_ids, row_div, block_diag=True, dropout=dropout)
    out = torch.empty(x.shape[0], lora_B.shape[1], device=x.device, dtype=x.dtype)
    y = _gemm_with_expand(x, weight, False, bias, shrink_bd, *_b_as_expand(lora_B), scaling, out, False, num_hyp, r,
                          stacked_expand_t=lambda: _stack_B(lora_B, scaling, x.dtype).t())
    return y, shrink_bd


@on_input_device
def multi_lora_linear_triton_backward(grad_y, x, weight, lora_A, lora_B, scaling, hypothesis_ids, row_div, shrink_bd,
                                      dropout_seed=None, lora_dropout=0.0):
    num_hyp, r, d_in = lora_A.shape
    grad_y = _contig_rows(grad_y)
    x = _contig_rows(x)
    dropout = (dropout_seed, lora_dropout) if lora_dropout else None
    # dS_bd = s_h dy B_h in block h: the shrink kernel with P_k = B_k^T (r, d_out). Where r is its
    # own padding (16, 32, 64, ...) B^T is read in place, a K-step's (r, BD) tile being BD * r
    # contiguous values of a contiguous lora_B (K, d_out, r); else from a contiguous copy (loads
    # along d_out).
    # benchmarks/sweep_shrink.py on an H200 (bf16, d = 4096): in place 21.0 / 23.4 us against 25.1 /
    # 34.9 copied first at r = 16 / 64, but 33.7 against 25.0 at r = 8 (padded to 16).
    lora_Bt = lora_B.transpose(1, 2)
    if r != _r_pad(r):
        lora_Bt = lora_Bt.contiguous()
    grad_shrink_bd = _launch_shrink(grad_y, lora_Bt, scaling, hypothesis_ids, row_div, block_diag=True)
    out = torch.empty(grad_y.shape[0], d_in, device=x.device, dtype=x.dtype)
    grad_x = _gemm_with_expand(grad_y, weight, True, None, grad_shrink_bd, *_a_as_expand(lora_A), None, out, False,
                               num_hyp, r, stacked_expand_t=lambda: _stack_A(lora_A, x.dtype),
                               dropout=dropout)
    x_lora = x if dropout is None else _launch_dropout_rows(x, dropout)
    grad_A, grad_B = _lora_weight_grads(grad_shrink_bd, shrink_bd, x_lora, grad_y, scaling, lora_A, lora_B)
    return grad_x, grad_A, grad_B


@on_input_device
def multi_lora_linear_shared_triton(x, weight, bias, lora_A, lora_B, scaling, num_groups):
    num_hyp, r, _ = lora_A.shape
    x, bias = _contig_rows(x), contiguous_or_none(bias)  # the fused and decode kernels read bias flat
    shrink_all = _launch_shrink(x, lora_A, None, None, 1, block_diag=False)  # (G*L, K*r)
    out = torch.empty(x.shape[0] * num_hyp, lora_B.shape[1], device=x.device, dtype=x.dtype)
    y = _gemm_with_expand(x, weight, False, bias, shrink_all, *_b_as_expand(lora_B), scaling, out, True, num_hyp, r,
                          x.shape[0] // num_groups)
    return y, shrink_all


@on_input_device
def multi_lora_linear_shared_triton_backward(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups):
    num_hyp, r, d_in = lora_A.shape
    x = _contig_rows(x)
    grad_y4 = _group_rows(grad_y, num_groups, num_hyp)
    grad_shrink_all, grad_A, grad_B = _shared_lora_grads(grad_y4, x, lora_A, lora_B, scaling, shrink_all)
    grad_y_sum = grad_y4.sum(1, dtype=torch.float32).to(x.dtype).reshape(x.shape[0], grad_y.shape[-1])
    out = torch.empty(x.shape[0], d_in, device=x.device, dtype=x.dtype)
    grad_x = _gemm_with_expand(grad_y_sum, weight, True, None, grad_shrink_all, *_a_as_expand(lora_A), None, out,
                               False, num_hyp, r, stacked_expand_t=lambda: _stack_A(lora_A, x.dtype),
                               shared_input=True)
    return grad_x, grad_A, grad_B


# ---------------------------------------------------------------------------------------------
# Registered custom ops (fake implementations + autograd)
# ---------------------------------------------------------------------------------------------


# The implementations per backend, shared by the registered ops and the eager autograd path below.
_FORWARD = {"triton": multi_lora_linear_triton, "reference": multi_lora_linear_ref}
_BACKWARD = {"triton": multi_lora_linear_triton_backward, "reference": multi_lora_linear_ref_backward}
_SHARED_FORWARD = {"triton": multi_lora_linear_shared_triton, "reference": multi_lora_linear_shared_ref}
_SHARED_BACKWARD = {"triton": multi_lora_linear_shared_triton_backward,
                    "reference": multi_lora_linear_shared_ref_backward}


def _grad_outputs_like(x: Tensor, lora_A: Tensor, lora_B: Tensor):
    """Fake backward outputs: contiguous dx, dA, dB (the real kernels return contiguous tensors)."""
    return x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


@torch.library.custom_op("loramcl::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor,
                          lora_B: Tensor, scaling: Tensor, hypothesis_ids: Optional[Tensor], row_div: int,
                          dropout_seed: Optional[Tensor], lora_dropout: float, backend: str) -> tuple[Tensor, Tensor]:
    return _FORWARD[backend](x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed,
                             lora_dropout)


@_multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed, lora_dropout, backend):
    return x.new_empty(x.shape[0], lora_B.shape[1]), x.new_empty(x.shape[0], lora_A.shape[0] * lora_A.shape[1])


@torch.library.custom_op("loramcl::multi_lora_linear_backward", mutates_args=())
def _multi_lora_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor,
                                   lora_B: Tensor, scaling: Tensor, hypothesis_ids: Optional[Tensor], row_div: int,
                                   shrink_bd: Tensor, dropout_seed: Optional[Tensor], lora_dropout: float,
                                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _BACKWARD[backend](grad_y, x, weight, lora_A, lora_B, scaling, hypothesis_ids, row_div, shrink_bd,
                              dropout_seed, lora_dropout)


@_multi_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scaling, hypothesis_ids, row_div, shrink_bd, dropout_seed, lora_dropout,
      backend):
    return _grad_outputs_like(x, lora_A, lora_B)


def _weight_grads(ctx, grad_y2, x2):
    """dW = dy^T x and dbias = sum_m dy[m], fp32 accumulation, only when they require grad."""
    acc = _acc_dtype(x2.dtype)
    grad_weight = (grad_y2.to(acc).t() @ x2.to(acc)).to(x2.dtype) if ctx.needs_input_grad[1] else None
    grad_bias = grad_y2.sum(0, dtype=acc).to(grad_y2.dtype) if ctx.needs_input_grad[2] else None
    return grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed, lora_dropout, backend = inputs
    ctx.backend, ctx.row_div, ctx.lora_dropout = backend, row_div, lora_dropout
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, hypothesis_ids, output[1], dropout_seed)
    ctx.set_materialize_grads(False)  # S has no gradient: no (M, K*r) zeros made for it in backward


def _backward_with(backward_impl, ctx, grad_y):
    if grad_y is None:  # grads are not materialised: none reached y
        return (None,) * len(ctx.needs_input_grad)
    with autocast_off(grad_y.device):
        return _backward_formula(backward_impl, ctx, grad_y)


def _backward_formula(backward_impl, ctx, grad_y):
    x, weight, lora_A, lora_B, scaling, hypothesis_ids, shrink_bd, dropout_seed = ctx.saved_tensors
    grad_x, grad_A, grad_B = backward_impl(
        grad_y.contiguous(), x, weight, lora_A, lora_B, scaling, hypothesis_ids, ctx.row_div, shrink_bd, dropout_seed,
        ctx.lora_dropout, ctx.backend)
    grad_weight, grad_bias = _weight_grads(ctx, grad_y, x)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None, None, None


def _backward(ctx, grad_y, grad_shrink):
    return _backward_with(_multi_lora_linear_backward_op, ctx, grad_y)


_multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("loramcl::multi_lora_linear_shared", mutates_args=())
def _multi_lora_linear_shared_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor,
                                 lora_B: Tensor, scaling: Tensor, num_groups: int,
                                 backend: str) -> tuple[Tensor, Tensor]:
    return _SHARED_FORWARD[backend](x, weight, bias, lora_A, lora_B, scaling, num_groups)


@_multi_lora_linear_shared_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, num_groups, backend):
    num_hyp, r, _ = lora_A.shape
    return x.new_empty(x.shape[0] * num_hyp, lora_B.shape[1]), x.new_empty(x.shape[0], num_hyp * r)


@torch.library.custom_op("loramcl::multi_lora_linear_shared_backward", mutates_args=())
def _multi_lora_linear_shared_backward_op(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor,
                                          lora_B: Tensor, scaling: Tensor, shrink_all: Tensor, num_groups: int,
                                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _SHARED_BACKWARD[backend](grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups)


@_multi_lora_linear_shared_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups, backend):
    return _grad_outputs_like(x, lora_A, lora_B)


def _shared_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, num_groups, backend = inputs
    ctx.backend, ctx.num_groups = backend, num_groups
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, output[1])
    ctx.set_materialize_grads(False)  # S has no gradient: no zeros made for it in backward


def _shared_backward_with(backward_impl, ctx, grad_y):
    if grad_y is None:  # grads are not materialised: none reached y
        return (None,) * len(ctx.needs_input_grad)
    with autocast_off(grad_y.device):
        return _shared_backward_formula(backward_impl, ctx, grad_y)


def _shared_backward_formula(backward_impl, ctx, grad_y):
    x, weight, lora_A, lora_B, scaling, shrink_all = ctx.saved_tensors
    grad_x, grad_A, grad_B = backward_impl(
        grad_y.contiguous(), x, weight, lora_A, lora_B, scaling, shrink_all, ctx.num_groups, ctx.backend)
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # a pass over dy only when W or bias train
        num_hyp = lora_A.shape[0]
        grad_y_sum = _group_rows(grad_y, ctx.num_groups, num_hyp).sum(1).reshape(x.shape[0], grad_y.shape[-1])
        grad_weight, grad_bias = _weight_grads(ctx, grad_y_sum, x)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None


def _shared_backward(ctx, grad_y, grad_shrink):
    return _shared_backward_with(_multi_lora_linear_shared_backward_op, ctx, grad_y)


_multi_lora_linear_shared_op.register_autograd(_shared_backward, setup_context=_shared_setup_context)


# ---------------------------------------------------------------------------------------------
# Eager path: the same implementations and autograd formulas without the dispatcher
# ---------------------------------------------------------------------------------------------
# A call through a registered op pays for the dispatcher, argument normalisation and the
# generated autograd wrapper: on the dev CPU, with the kernel launches stubbed out, that was about
# 85 us per forward+backward, more than everything else on the host together. Eagerly the public
# function therefore calls the implementations directly (no autograd node when nothing needs a
# gradient) or through these autograd.Functions; torch.compile traces the registered ops. They
# keep the forward(ctx, ...) form: the forward / setup_context form (which torch.func transforms
# need) measured 55-65 us more per fwd+bwd in the same stubbed setting.


def _backward_direct(*args):
    """The backward op's body for the eager path: same arguments, the last one names the backend."""
    return _BACKWARD[args[-1]](*args[:-1])


def _shared_backward_direct(*args):
    return _SHARED_BACKWARD[args[-1]](*args[:-1])


class _MultiLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed, lora_dropout,
                backend):
        output = _FORWARD[backend](x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed,
                                   lora_dropout)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, scaling, hypothesis_ids, row_div, dropout_seed,
                             lora_dropout, backend), output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_shrink):
        refuse_double_backward("multi_lora_linear")
        return _backward_with(_backward_direct, ctx, grad_y)


class _MultiLoRALinearSharedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, num_groups, backend):
        output = _SHARED_FORWARD[backend](x, weight, bias, lora_A, lora_B, scaling, num_groups)
        _shared_setup_context(ctx, (x, weight, bias, lora_A, lora_B, scaling, num_groups, backend), output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_shrink):
        refuse_double_backward("multi_lora_linear")
        return _shared_backward_with(_shared_backward_direct, ctx, grad_y)


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run_op(x, weight, bias, lora_A, lora_B, scale, hypothesis_ids, row_div, dropout_seed, lora_dropout, backend):
    args = (x, weight, bias, lora_A, lora_B, scale, hypothesis_ids, row_div, dropout_seed, lora_dropout)
    if tracing():
        return _multi_lora_linear_op(*args, backend)
    if _needs_autograd(x, weight, bias, lora_A, lora_B):
        return _MultiLoRALinearFunction.apply(*args, backend)
    return _FORWARD[backend](*args)


def _run_shared_op(x, weight, bias, lora_A, lora_B, scale, num_groups, backend):
    if tracing():
        return _multi_lora_linear_shared_op(x, weight, bias, lora_A, lora_B, scale, num_groups, backend)
    if _needs_autograd(x, weight, bias, lora_A, lora_B):
        return _MultiLoRALinearSharedFunction.apply(x, weight, bias, lora_A, lora_B, scale, num_groups, backend)
    return _SHARED_FORWARD[backend](x, weight, bias, lora_A, lora_B, scale, num_groups)


# ---------------------------------------------------------------------------------------------
# Public function: argument checks, row -> hypothesis map, backend choice
# ---------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, dims: int, expected: str):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def _check_inputs(x, weight, bias, lora_A, lora_B, num_hypotheses):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, ..., d_in), got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, ..., d_in) with at least 2 dims, got {tuple(x.shape)}")
    d_in = x.shape[-1]
    _check_tensor("lora_A", lora_A, 3, "(K, r, d_in)")
    _check_tensor("lora_B", lora_B, 3, "(K, d_out, r)")
    num_hyp, r, a_in = lora_A.shape
    if num_hyp < 1:
        raise ValueError(f"lora_A must hold at least one hypothesis, got shape {tuple(lora_A.shape)}")
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if a_in != d_in:
        raise ValueError(f"lora_A must have shape (K, r, d_in) = ({num_hyp}, {r}, {d_in}) to match x, "
                         f"got {tuple(lora_A.shape)}")
    if lora_B.shape[0] != num_hyp or lora_B.shape[2] != r:
        raise ValueError(f"lora_B must have shape (K, d_out, r) with K={num_hyp}, r={r} from lora_A, "
                         f"got {tuple(lora_B.shape)}")
    d_out = lora_B.shape[1]
    if weight is not None:
        _check_tensor("weight", weight, 2, "(d_out, d_in)")
        if tuple(weight.shape) != (d_out, d_in):
            raise ValueError(f"weight must have shape (d_out, d_in) = ({d_out}, {d_in}) to match lora_B and x, "
                             f"got {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, "(d_out,)")
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have shape (d_out,) = ({d_out},), got {tuple(bias.shape)}")
    if num_hypotheses is not None and (isinstance(num_hypotheses, bool)
                                       or not isinstance(num_hypotheses, numbers.Integral)):
        raise TypeError(f"num_hypotheses must be an int, got {type(num_hypotheses).__name__}")
    if num_hypotheses is not None and num_hypotheses != num_hyp:
        raise ValueError(f"num_hypotheses={num_hypotheses} does not match lora_A.shape[0]={num_hyp}")
    named = [("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)]
    for name, t in named:
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all must be on one device")
    return num_hyp, r, d_in, d_out


_SCALING_VECTORS: dict = {}
_MAX_SCALING_VECTORS = 256


def _scaling_vector(scaling, num_hyp: int, x: Tensor) -> Tensor:
    if isinstance(scaling, Tensor):
        if scaling.is_complex() or scaling.dtype == torch.bool:
            raise TypeError(f"scaling must hold real numbers, got {scaling.dtype}")
        if scaling.requires_grad and torch.is_grad_enabled():
            raise ValueError("scaling is not differentiated: pass a detached tensor or a float")
        if scaling.dim() == 0:
            scaling = scaling.reshape(1).expand(num_hyp)
        if scaling.shape != (num_hyp,):
            raise ValueError(f"scaling must be a float or a tensor of shape (K,) = ({num_hyp},), "
                             f"got {tuple(scaling.shape)}")
        return scaling.to(device=x.device, dtype=_acc_dtype(x.dtype)).contiguous()
    if isinstance(scaling, bool) or not isinstance(scaling, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"scaling must be a float or a (K,) tensor, got {type(scaling).__name__}")
    dtype = _acc_dtype(x.dtype)
    if tracing():  # made by a multiplication: a traced float stays symbolic (no recompiles)
        return torch.ones((num_hyp,), device=x.device, dtype=dtype) * scaling
    # Eagerly a float scaling becomes a cached (K,) tensor: no fill kernel per call. The cached
    # tensors are never written to; they are made outside inference mode so that autograd may save them,
    # and outside CUDA-graph capture (a tensor made there belongs to the graph's memory pool) and
    # tracing (a tracer's fake tensor would then serve later eager calls). One per CUDA stream: the
    # fill runs on the stream that made the vector, and a call on another would not wait for it.
    stream = torch._C._cuda_getCurrentRawStream(x.device.index) if x.device.type == "cuda" else None
    key = (float(scaling), num_hyp, x.device, dtype, stream)
    vector = _SCALING_VECTORS.get(key)
    if vector is None:
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.full((num_hyp,), float(scaling), device=x.device, dtype=dtype)  # not cached
        with torch.inference_mode(False):
            vector = torch.full((num_hyp,), float(scaling), device=x.device, dtype=dtype)
        # a scaling that changes every call fills the cache: past it, vectors are not cached (the
        # cached ones stay alive, for a CUDA graph captured with one may still read it)
        if len(_SCALING_VECTORS) < _MAX_SCALING_VECTORS:
            _SCALING_VECTORS[key] = vector
    return vector


def _row_div(n: int, tokens: int, num_hyp: int, layout: str, inner: int, hypothesis_ids) -> int:
    """Flattened row m belongs to hypothesis ids[m // row_div], or (m // row_div) % K by layout."""
    if hypothesis_ids is not None:
        return tokens
    if layout == "batch_major":
        return tokens * inner
    return tokens * (n // num_hyp)


_LAST_CHECKED_IDS: list = [None, -1, -1]  # weakref to the ids tensor, its version counter, K


def _check_id_values(hypothesis_ids: Tensor, num_hyp: int) -> None:
    """ids in [-1, K). Reading them is a host sync, so it happens once per ids tensor: a model's
    layers all receive the same tensor, and an in-place change bumps its version and re-checks.
    Inference tensors have no version counter: checked on every call. While torch.compile traces,
    _assert_ids_in_range asserts on the device instead."""
    if hypothesis_ids.is_inference():
        _raise_bad_ids(hypothesis_ids, num_hyp)
        return
    ref, version, checked_k = _LAST_CHECKED_IDS
    if ref is not None and ref() is hypothesis_ids and version == hypothesis_ids._version and checked_k == num_hyp:
        return
    _raise_bad_ids(hypothesis_ids, num_hyp)
    _LAST_CHECKED_IDS[:] = [weakref.ref(hypothesis_ids), hypothesis_ids._version, num_hyp]


def _raise_bad_ids(hypothesis_ids: Tensor, num_hyp: int) -> None:
    ids = hypothesis_ids if hypothesis_ids.dtype == torch.int64 else hypothesis_ids.to(torch.int64)  # uint32: no min
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= num_hyp:
        raise ValueError(f"hypothesis_ids must lie in [-1, K) = [-1, {num_hyp}), got values in [{lo}, {hi}]")


def _check_layout(n, num_hyp, layout, inner, hypothesis_ids, shared_input, device):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    if isinstance(inner, bool) or not isinstance(inner, numbers.Integral) or inner < 1:
        raise ValueError(f"inner must be a positive int, got {inner!r}")
    if inner != 1 and layout != "batch_major":
        raise ValueError("inner (beams per row) applies to the batch_major layout only")
    if hypothesis_ids is not None:
        if shared_input:
            raise ValueError("hypothesis_ids cannot be combined with shared_input=True")
        if layout != "batch_major" or inner != 1:
            raise ValueError(f"hypothesis_ids gives each row's hypothesis: leave layout and inner at their defaults "
                             f"('batch_major', 1), got layout={layout!r}, inner={inner!r}")
        if not isinstance(hypothesis_ids, Tensor):
            raise TypeError(f"hypothesis_ids must be an integer tensor, got {type(hypothesis_ids).__name__}")
        if hypothesis_ids.shape != (n,):
            raise ValueError(f"hypothesis_ids must be an integer tensor of shape (N,) = ({n},), "
                             f"got {tuple(hypothesis_ids.shape)}")
        if hypothesis_ids.is_floating_point() or hypothesis_ids.is_complex() or hypothesis_ids.dtype == torch.bool:
            raise TypeError(f"hypothesis_ids must hold integers, got {hypothesis_ids.dtype}")
        if hypothesis_ids.dtype == torch.uint64:  # values past 2^63 would wrap to negative ids in int64
            raise TypeError("hypothesis_ids of dtype uint64: use int64")
        if hypothesis_ids.device != device:
            raise ValueError(f"hypothesis_ids is on {hypothesis_ids.device} but x is on {device}")
        if tracing():  # no host read in a graph: a device-side assert (in int64: uint8 would wrap -1)
            ids = hypothesis_ids.to(torch.int64)
            torch._assert_async(((ids >= -1) & (ids < num_hyp)).all(),
                                "hypothesis_ids must lie in [-1, K)")
        elif n > 0:
            _check_id_values(hypothesis_ids, num_hyp)
        return
    if shared_input:
        if layout == "batch_major" and n % inner:
            raise ValueError(f"shared input: the batch N={n} must be divisible by inner={inner}")
        return
    per_copy = num_hyp * inner if layout == "batch_major" else num_hyp
    if n % per_copy:
        what = f"K*inner = {num_hyp}*{inner}" if layout == "batch_major" else f"K = {num_hyp}"
        raise ValueError(f"the batch N={n} (x.shape[0]) must be divisible by {what} in the {layout} layout")


def _choose_backend(backend, x: Tensor) -> str:
    chosen = resolve_backend(backend, x.device, x.dtype)
    if chosen == "cuda":  # resolve_backend only returns it when the extension is importable
        chosen = "triton"
    if chosen == "triton" and x.dtype not in TRITON_DTYPES:
        if requested_backend(backend) == "auto":  # not asked for by name (argument or LORAMCL_BACKEND)
            return "reference"
        raise TypeError(f"backend 'triton' supports {TRITON_DTYPES}, got {x.dtype}; use backend='reference'")
    return chosen


def multi_lora_linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling=1.0,
    *,
    num_hypotheses: Optional[int] = None,
    layout: str = "batch_major",
    inner: int = 1,
    hypothesis_ids: Optional[Tensor] = None,
    shared_input: bool = False,
    lora_dropout: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """y = x W^T + bias + s[h] (dropout(x) A_h^T) B_h^T for K LoRA hypotheses in one pass.

    x: (N, ..., d_in); weight: (d_out, d_in) or None (LoRA delta only); bias: (d_out,) or None;
    lora_A: (K, r, d_in); lora_B: (K, d_out, r); scaling: float or (K,) tensor (not differentiated).
    Row n's hypothesis: batch_major (n // inner) % K (official), hypothesis_major n // (N/K), or
    hypothesis_ids[n] in [-1, K) (-1 = base only). shared_input=True: every hypothesis sees all N
    rows and the result has N*K rows in the layout. Returns (N, ..., d_out) or (N*K, ..., d_out).
    lora_dropout = p > 0 (pass it when training): the LoRA path sees x with elements zeroed with
    probability p and the rest scaled by 1 / (1 - p), a mask drawn from torch's generator
    (dropout_keep_mask), applied inside the kernels: nothing extra is stored for the backward.
    """
    refuse_functorch_transforms("multi_lora_linear")
    cast = autocast_operands(x.device, x, weight, bias, lora_A, lora_B) if isinstance(x, Tensor) else None
    if cast is not None:  # fp32 master adapters included: their gradients flow back through the cast
        with autocast_off(x.device):
            return multi_lora_linear(*cast, scaling, num_hypotheses=num_hypotheses, layout=layout, inner=inner,
                                     hypothesis_ids=hypothesis_ids, shared_input=shared_input,
                                     lora_dropout=lora_dropout, backend=backend)
    if (isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real)
            or not 0.0 <= float(lora_dropout) < 1.0):
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
    shared_input = check_flag(False if shared_input is None else shared_input, "shared_input")
    if lora_dropout and shared_input:
        raise ValueError("lora_dropout with shared_input=True: each hypothesis needs its own mask, so repeat "
                         "the rows (distinct rows per hypothesis) first, as MultiLoRALinear does")
    num_hyp, r, d_in, d_out = _check_inputs(x, weight, bias, lora_A, lora_B, num_hypotheses)
    n = x.shape[0]
    _check_layout(n, num_hyp, layout, inner, hypothesis_ids, shared_input, x.device)
    inner = int(inner)  # a numpy integer included
    if hypothesis_ids is not None:
        hypothesis_ids = hypothesis_ids.contiguous()
    chosen = _choose_backend(backend, x)
    scale = _scaling_vector(scaling, num_hyp, x)
    lead = x.shape[:-1]
    x2 = x.reshape(x.shape[:-1].numel(), d_in)  # explicit rows: -1 is ambiguous when d_in = 0
    tokens = x2.shape[0] // n if n else 1
    if shared_input:
        num_groups = n // inner if layout == "batch_major" else 1
        y2, _ = _run_shared_op(x2, weight, bias, lora_A, lora_B, scale, max(num_groups, 1), chosen)
        return y2.view(n * num_hyp, *lead[1:], d_out)
    row_div = max(_row_div(n, tokens, num_hyp, layout, inner, hypothesis_ids), 1)
    lora_dropout = float(lora_dropout)
    dropout_seed = _dropout_seed(x.device) if lora_dropout else None
    y2, _ = _run_op(x2, weight, bias, lora_A, lora_B, scale, hypothesis_ids, row_div, dropout_seed, lora_dropout,
                    chosen)
    return y2.view(*lead, d_out)
