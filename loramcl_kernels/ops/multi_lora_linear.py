"""Multi-LoRA linear: K low-rank adapters applied to the rows of one frozen linear layer.

Math (DESIGN.md section 2.1). x: (N, ..., d_in), flattened to M = N * T rows of d_in (T = the
product of the dims between the batch dim and the last). W: (d_out, d_in), bias: (d_out,),
A: (K, r, d_in), B: (K, d_out, r), s: (K,) scaling. Every flattened row m has a hypothesis h(m):

    batch_major       h = (n // inner) % K      (the official LoRA-MCL order; inner = beams)
    hypothesis_major  h = n // (N / K)
    hypothesis_ids    h = ids[n], -1 meaning "base layer only"

    y[m] = x[m] W^T + bias + s[h] * (x[m] A_h^T) B_h^T

Block-diagonal form. Let S (M, r) hold the shrink x[m] A_h^T of each row (the compact form of the
(M, K*r) matrix S_bd that holds it in the columns of block h and zeros elsewhere). Then

    y = x W^T + bias + S_bd B_all^T,  B_all = [s_1 B_1 | ... | s_K B_K]  (d_out, K*r)

so the LoRA expand is one extra inner block of size K*r whatever the row-to-hypothesis map is:
no per-hypothesis tiles, so decoding a few rows per hypothesis wastes nothing. S is tiny and is
kept for the backward pass:

    dS[m] = s[h] * dy[m] B_h                      (M, r), the same shrink kernel on dy
    dx    = dy W + dS_bd A_all,  A_all = [A_1; ...; A_K]  (K*r, d_in): the same GEMM kernel
    dA_k  = sum_{m: h(m)=k} dS[m]^T x[m]  = (dS_bd^T x)  block k
    dB_k  = s_k sum_{m: h(m)=k} dy[m]^T S[m] = s_k (dy^T S_bd) block k
    dW    = dy^T x,  dbias = sum_m dy[m]         (only when they require grad)

Shared input (shared_input=True): x holds rows that every hypothesis sees; the output has K times
as many rows, grouped (G, K, L) with L rows per group: batch_major gives G = N / inner groups of
L = inner * T rows (output row ((g*K + k)*inner + j) reads input row g*inner + j), hypothesis_major
gives G = 1. The base GEMM runs once over the input rows and each output tile is written K times,
once per hypothesis, from the same accumulator. Backward: dx = (sum_k dy_k) W + dS_all A_all.

Backends: 'reference' is plain PyTorch with fp32 accumulation (fp64 stays fp64): the oracle and
the CPU path. 'triton' has two paths, chosen per call (env LORAMCL_MULTI_LORA_PATH overrides):
  fused   one persistent Triton GEMM loading x and W through TMA tensor descriptors, with the
          block-diagonal expand (and bias, and the K shared-input outputs) in its epilogue;
  cublas  cuBLAS for x W^T (+ bias), then a Triton epilogue kernel that adds the expand in place
          (or writes the K shared-input outputs).
Both use the Triton shrink kernel; dA and dB are deterministic cuBLAS GEMMs over the
block-diagonal matrices (no atomics). Neither path syncs with the host.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from loramcl_kernels._backend import resolve_backend

LAYOUTS = ("batch_major", "hypothesis_major")
PATHS = ("auto", "fused", "cublas")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch, fp32 accumulation). Works on any device; also gives the math used by
# the deterministic dA / dB reductions of every backend.
# ---------------------------------------------------------------------------------------------


def _one_hot(row_ids: Tensor, num_hypotheses: int, dtype: torch.dtype) -> Tensor:
    """(M, K) with a 1 in column h(m); an all-zero row for h = -1."""
    hyps = torch.arange(num_hypotheses, device=row_ids.device, dtype=row_ids.dtype)
    return (row_ids[:, None] == hyps[None, :]).to(dtype)


def _block_diag(compact: Tensor, row_ids: Tensor, num_hypotheses: int) -> Tensor:
    """(M, r) -> (M, K*r): row m's values in the columns of block h(m), zeros elsewhere."""
    m, r = compact.shape
    one_hot = _one_hot(row_ids, num_hypotheses, compact.dtype)
    return (one_hot[:, :, None] * compact[:, None, :]).reshape(m, num_hypotheses * r)


def _select_block(full: Tensor, row_ids: Tensor, num_hypotheses: int) -> Tensor:
    """(M, K*r) -> (M, r): the columns of block h(m) of each row (zeros for h = -1)."""
    m = full.shape[0]
    one_hot = _one_hot(row_ids, num_hypotheses, full.dtype)
    return (full.view(m, num_hypotheses, -1) * one_hot[:, :, None]).sum(1)


def _lora_weight_grads(grad_shrink, shrink, x, grad_y, row_ids, lora_A, scaling, dtype):
    """dA (K, r, d_in) and dB (K, d_out, r) as two GEMMs over the block-diagonal matrices.

    A fixed-order reduction over rows (cuBLAS / CPU GEMM, no atomics): deterministic.
    """
    num_hyp, r, d_in = lora_A.shape
    grad_shrink_bd = _block_diag(grad_shrink.to(dtype), row_ids, num_hyp)  # (M, K*r)
    shrink_bd = _block_diag(shrink.to(dtype), row_ids, num_hyp)  # (M, K*r)
    grad_A = (grad_shrink_bd.t() @ x.to(dtype)).view(num_hyp, r, d_in)
    grad_Bt = (shrink_bd.t() @ grad_y.to(dtype)).view(num_hyp, r, -1)  # (K, r, d_out)
    grad_B = grad_Bt.transpose(1, 2) * scaling.to(dtype)[:, None, None]
    return grad_A.to(lora_A.dtype), grad_B.to(lora_A.dtype).contiguous()


def multi_lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, row_ids):
    """Reference forward on flattened rows. x (M, d_in), row_ids (M,) -> (y (M, d_out), S (M, r))."""
    acc = _acc_dtype(x.dtype)
    num_hyp, r, d_in = lora_A.shape
    xf = x.to(acc)
    shrink = _select_block(xf @ lora_A.to(acc).reshape(num_hyp * r, d_in).t(), row_ids, num_hyp)
    b_all = (lora_B.to(acc) * scaling.to(acc)[:, None, None]).permute(1, 0, 2).reshape(-1, num_hyp * r)
    y = _block_diag(shrink, row_ids, num_hyp) @ b_all.t()
    if weight is not None:
        y = y + xf @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), shrink


def multi_lora_linear_ref_backward(grad_y, x, weight, lora_A, lora_B, scaling, row_ids, shrink):
    acc = _acc_dtype(x.dtype)
    num_hyp, r, d_in = lora_A.shape
    dyf = grad_y.to(acc)
    b_all = (lora_B.to(acc) * scaling.to(acc)[:, None, None]).permute(1, 0, 2).reshape(-1, num_hyp * r)
    grad_shrink = _select_block(dyf @ b_all, row_ids, num_hyp)  # (M, r)
    grad_x = _block_diag(grad_shrink, row_ids, num_hyp) @ lora_A.to(acc).reshape(num_hyp * r, d_in)
    if weight is not None:
        grad_x = grad_x + dyf @ weight.to(acc)
    grad_A, grad_B = _lora_weight_grads(grad_shrink, shrink, x, grad_y, row_ids, lora_A, scaling, acc)
    return grad_x.to(x.dtype), grad_A, grad_B


def multi_lora_linear_shared_ref(x, weight, bias, lora_A, lora_B, scaling, num_groups):
    """Shared input. x (G*L, d_in) -> (y (G*K*L, d_out) grouped (G, K, L), S_all (G*L, K*r))."""
    acc = _acc_dtype(x.dtype)
    num_hyp, r, d_in = lora_A.shape
    xf = x.to(acc)
    shrink_all = xf @ lora_A.to(acc).reshape(num_hyp * r, d_in).t()  # (G*L, K*r)
    base = xf @ weight.to(acc).t() if weight is not None else xf.new_zeros(x.shape[0], lora_B.shape[1])
    if bias is not None:
        base = base + bias.to(acc)
    b_scaled = lora_B.to(acc) * scaling.to(acc)[:, None, None]  # (K, d_out, r)
    delta = torch.einsum("mkr,kor->kmo", shrink_all.view(-1, num_hyp, r), b_scaled)  # (K, G*L, d_out)
    y = base[None] + delta
    y = y.view(num_hyp, num_groups, -1, y.shape[-1]).transpose(0, 1)  # (G, K, L, d_out)
    return y.reshape(-1, y.shape[-1]).to(x.dtype), shrink_all


def _shared_lora_grads(grad_y4, x, lora_A, lora_B, scaling, shrink_all, dtype):
    """Shared-input LoRA gradients. grad_y4 (G, K, L, d_out) -> dS_all (G*L, K*r), dA, dB."""
    num_hyp, r, d_in = lora_A.shape
    dy_k = grad_y4.transpose(0, 1).reshape(num_hyp, -1, grad_y4.shape[-1]).to(dtype)  # (K, G*L, d_out)
    b_scaled = lora_B.to(dtype) * scaling.to(dtype)[:, None, None]  # (K, d_out, r)
    grad_shrink = torch.bmm(dy_k, b_scaled)  # (K, G*L, r)
    grad_shrink_all = grad_shrink.transpose(0, 1).reshape(-1, num_hyp * r)  # (G*L, K*r)
    grad_A = (grad_shrink_all.t() @ x.to(dtype)).view(num_hyp, r, d_in)
    shrink_k = shrink_all.view(-1, num_hyp, r).transpose(0, 1).to(dtype)  # (K, G*L, r)
    grad_B = torch.bmm(dy_k.transpose(1, 2), shrink_k) * scaling.to(dtype)[:, None, None]
    return grad_shrink_all, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype).contiguous()


def multi_lora_linear_shared_ref_backward(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups):
    acc = _acc_dtype(x.dtype)
    num_hyp, r, d_in = lora_A.shape
    grad_y4 = grad_y.view(num_groups, num_hyp, -1, grad_y.shape[-1])
    grad_shrink_all, grad_A, grad_B = _shared_lora_grads(grad_y4, x, lora_A, lora_B, scaling, shrink_all, acc)
    grad_x = grad_shrink_all @ lora_A.to(acc).reshape(num_hyp * r, d_in)
    if weight is not None:
        grad_x = grad_x + grad_y4.to(acc).sum(1).reshape(-1, grad_y.shape[-1]) @ weight.to(acc)
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

    @triton.jit
    def _shrink_kernel(
        x_ptr, p_ptr, scale_ptr, ids_ptr, out_ptr,
        M, D, R, NUM_HYP,
        stride_xm, stride_pk, stride_pj, stride_pd, stride_om,
        BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, R_PAD: tl.constexpr,
        SELECT: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """out = x P^T with P (K, r, D) addressed by strides; block k of the columns is scaled by s_k.

        SELECT: out (M, r) keeps only block h(m) of row m (zeros for h = -1).
        else:   out (M, K*r) keeps every block (shared input).
        One program: BM rows x BC columns of the padded (K * R_PAD) column space.
        """
        NB: tl.constexpr = BC // R_PAD
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_c = tl.arange(0, BC)
        blk = pid_c * NB + offs_c // R_PAD
        j = offs_c % R_PAD
        mask_m = offs_m < M
        mask_c = (blk < NUM_HYP) & (j < R)
        p_rows = blk.to(tl.int64) * stride_pk + j * stride_pj
        acc = tl.zeros((BM, BC), dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask_d = offs_d < D
            xt = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_d[None, :],
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            pt = tl.load(p_ptr + p_rows[:, None] + offs_d[None, :] * stride_pd,
                         mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            acc = tl.dot(xt, tl.trans(pt), acc, input_precision=DOT_PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + blk, mask=blk < NUM_HYP, other=0.0)[None, :]
        if SELECT:
            ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
            acc3 = tl.reshape(acc, (BM, NB, R_PAD))
            blk3 = pid_c * NB + tl.arange(0, NB)
            picked = tl.sum(tl.where(blk3[None, :, None] == ids[:, None, None], acc3, 0.0), axis=1)
            offs_j = tl.arange(0, R_PAD)
            # every row is written by exactly one program: the one holding its block (or the
            # first one for base-only rows, which get zeros)
            owner = tl.where(ids < 0, 0, ids // NB) == pid_c
            tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_j[None, :], picked,
                     mask=(mask_m & owner)[:, None] & (offs_j < R)[None, :])
        else:
            cols = blk * R + j
            tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + cols[None, :], acc,
                     mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _gemm_expand_kernel(
        x_ptr, w_ptr, init_ptr, s_ptr, e_ptr, scale_ptr, bias_ptr, ids_ptr, out_ptr,
        M, N, KD, R, NUM_HYP, L,
        stride_init, stride_sm, stride_sk, stride_ek, stride_en, stride_ej, stride_om,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr, R_PAD: tl.constexpr,
        NUM_SMS: tl.constexpr, HAS_BASE: tl.constexpr, W_KN: tl.constexpr, HAS_INIT: tl.constexpr,
        EXPAND: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """out = [x W^T] + [init] + [bias] + expand, on a persistent grid of (BM, BN) output tiles.

        HAS_BASE: x (M, KD) and W ((N, KD), or (KD, N) when W_KN) through TMA tensor descriptors.
        Expand, with S (M, ...) fp32 rows, E_k (N, r) addressed by strides, s_k the scaling:
          EXPAND 0 (block-diagonal): + sum_k [h(m) = k] s_k S[m] E_k^T      (S (M, r), ids (M,))
          EXPAND 1 (dense):          + sum_k s_k S[m, block k] E_k^T        (S (M, K*r))
          EXPAND 2 (shared outputs): for each k, output row (m // L)*K*L + k*L + m % L
                                     gets acc + s_k S[m, block k] E_k^T     (S (M, K*r))
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
        offs_j = tl.arange(0, R_PAD)
        mask_j = offs_j < R
        for tile in tl.range(pid, num_tiles, NUM_SMS, flatten=True):
            group = tile // (GM * num_pn)
            first_m = group * GM
            group_size = min(num_pm - first_m, GM)
            pm = first_m + (tile % (GM * num_pn)) % group_size
            pn = (tile % (GM * num_pn)) // group_size
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
            mask_mn = mask_m[:, None] & mask_n[None, :]
            if HAS_INIT:
                acc += tl.load(init_ptr + offs_m.to(tl.int64)[:, None] * stride_init + offs_n[None, :],
                               mask=mask_mn, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            s_rows = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_j[None, :]
            e_rows = e_ptr + offs_n[:, None] * stride_en + offs_j[None, :] * stride_ej
            mask_s = mask_m[:, None] & mask_j[None, :]
            mask_e = mask_n[:, None] & mask_j[None, :]
            if EXPAND == 2:
                for k in range(NUM_HYP):
                    s_k = tl.load(s_rows + k * stride_sk, mask=mask_s, other=0.0)
                    if HAS_SCALE:
                        s_k = s_k * tl.load(scale_ptr + k)
                    e_k = tl.load(e_rows + k * stride_ek, mask=mask_e, other=0.0)
                    out = acc + tl.dot(s_k.to(e_k.dtype), tl.trans(e_k), input_precision=DOT_PRECISION)
                    rows = (offs_m // L) * (NUM_HYP * L) + k * L + offs_m % L
                    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                             out.to(out_ptr.dtype.element_ty), mask=mask_mn)
            else:
                if EXPAND == 0:
                    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
                    s_row = tl.load(s_rows, mask=mask_s, other=0.0)
                for k in range(NUM_HYP):
                    if EXPAND == 0:
                        s_k = tl.where(ids[:, None] == k, s_row, 0.0)
                        present = tl.max((ids == k).to(tl.int32), axis=0) > 0
                    else:
                        s_k = tl.load(s_rows + k * stride_sk, mask=mask_s, other=0.0)
                        present = True
                    if present:  # a tile of rows without hypothesis k skips its block
                        if HAS_SCALE:
                            s_k = s_k * tl.load(scale_ptr + k)
                        e_k = tl.load(e_rows + k * stride_ek, mask=mask_e, other=0.0)
                        acc = tl.dot(s_k.to(e_k.dtype), tl.trans(e_k), acc, input_precision=DOT_PRECISION)
                tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                         acc.to(out_ptr.dtype.element_ty), mask=mask_mn)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _r_pad(r: int) -> int:
    return max(16, _next_pow2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must match fp32 PyTorch, so no tf32 for them; 16-bit inputs ignore this.
    return "ieee"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_ALLOCATOR_DEVICE: list = []


def _ensure_tma_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need scratch memory from a Triton allocator."""
    if _ALLOCATOR_DEVICE and _ALLOCATOR_DEVICE[0] == device.type:
        return

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device.type)

    triton.set_allocator(alloc)
    _ALLOCATOR_DEVICE[:] = [device.type]


def _gemm_configs():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GM": 4}, num_stages=1, num_warps=4)]
    return [
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GM": 8}, num_stages=3, num_warps=8),
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GM": 8}, num_stages=4, num_warps=8),
        triton.Config({"BM": 128, "BN": 128, "BK": 64, "GM": 8}, num_stages=4, num_warps=8),
        triton.Config({"BM": 64, "BN": 128, "BK": 64, "GM": 8}, num_stages=4, num_warps=4),
    ]


def _epilogue_configs():
    """The expand-only kernel (no in-kernel base GEMM) is memory bound: smaller tiles, more of them."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return [triton.Config({"BM": 16, "BN": 32, "BK": 16, "GM": 4}, num_stages=1, num_warps=4)]
    return [
        triton.Config({"BM": 64, "BN": 128, "BK": 16, "GM": 8}, num_stages=2, num_warps=4),
        triton.Config({"BM": 32, "BN": 128, "BK": 16, "GM": 8}, num_stages=2, num_warps=4),
        triton.Config({"BM": 128, "BN": 128, "BK": 16, "GM": 8}, num_stages=2, num_warps=8),
    ]


_AUTOTUNE_KEY = ["M", "N", "KD", "R", "NUM_HYP"]
if triton is not None:
    _gemm_kernel = triton.autotune(configs=_gemm_configs(), key=_AUTOTUNE_KEY)(_gemm_expand_kernel)
    # the cublas path updates its output in place: autotuning must restore it between trials
    _epilogue_kernel = triton.autotune(configs=_epilogue_configs(), key=_AUTOTUNE_KEY,
                                       restore_value=["out_ptr"])(_gemm_expand_kernel)


def _launch_shrink(x: Tensor, p: Tensor, scaling: Optional[Tensor], row_ids: Optional[Tensor]) -> Tensor:
    """x (M, D) times P (K, r, D) (any strides) -> (M, r) fp32 selected by row_ids, or (M, K*r)."""
    m, d = x.shape
    num_hyp, r, _ = p.shape
    r_pad = _r_pad(r)
    select = row_ids is not None
    out = torch.empty(m, r if select else num_hyp * r, device=x.device, dtype=torch.float32)
    if m == 0:
        return out
    interp = x.device.type == "cpu"
    block_c = r_pad * min(_next_pow2(num_hyp), max(1, 256 // r_pad))
    block_m, block_d = (16, 32) if interp else (32, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(num_hyp, block_c // r_pad))
    _shrink_kernel[grid](
        x, p, scaling if scaling is not None else x, row_ids if select else x, out,
        m, d, r, num_hyp,
        x.stride(0), p.stride(0), p.stride(1), p.stride(2), out.stride(0),
        BM=block_m, BD=block_d, BC=block_c, R_PAD=r_pad,
        SELECT=select, HAS_SCALE=scaling is not None, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=4,
    )
    return out


def _tma_ok(*tensors: Tensor) -> bool:
    """TMA descriptors need contiguous rows, 16-byte aligned base pointers and row strides."""
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() % 16 or (t.shape[-1] * t.element_size()) % 16:
            return False
    return True


def _choose_path(x: Tensor, weight: Optional[Tensor]) -> str:
    path = os.environ.get("LORAMCL_MULTI_LORA_PATH", "auto").lower()
    if path not in PATHS:
        raise ValueError(f"LORAMCL_MULTI_LORA_PATH must be one of {PATHS}, got '{path}'")
    eligible = weight is not None and _tma_ok(x, weight)
    if path == "fused":
        return "fused" if eligible else "cublas"
    if path == "cublas" or not eligible:
        return "cublas"
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] < 9:
        return "cublas"
    # A handful of rows (decoding) is bound by reading W: cuBLAS's split-K GEMV-like kernels win.
    return "fused" if x.shape[0] >= 256 else "cublas"


def _launch_gemm_expand(x, weight, w_kn, init, shrink, shrink_block_stride, e, e_strides, scaling, bias,
                        row_ids, out, expand_mode, num_hyp, r, rows_per_group=1):
    """Launch either the fused GEMM (weight given) or the expand-only epilogue kernel (weight None)."""
    m = shrink.shape[0]
    n = out.shape[1]
    if m == 0 or n == 0:
        return out
    has_base = weight is not None
    kernel = _gemm_kernel if has_base else _epilogue_kernel
    if has_base:
        _ensure_tma_allocator(x.device)
    num_sms = _num_sms(out.device)
    kd = x.shape[1] if has_base else 1

    def grid(meta):
        return (min(num_sms, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)

    kernel[grid](
        x if has_base else out, weight if has_base else out, init if init is not None else out,
        shrink, e, scaling if scaling is not None else shrink, bias if bias is not None else out,
        row_ids if row_ids is not None else shrink, out,
        m, n, kd, r, num_hyp, rows_per_group,
        init.stride(0) if init is not None else 0, shrink.stride(0), shrink_block_stride,
        e_strides[0], e_strides[1], e_strides[2], out.stride(0),
        R_PAD=_r_pad(r), NUM_SMS=num_sms, HAS_BASE=has_base, W_KN=w_kn, HAS_INIT=init is not None,
        EXPAND=expand_mode, HAS_SCALE=scaling is not None, HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(out.dtype),
    )
    return out


def _base_then_expand(x, weight, w_kn, bias, shrink, block_stride, e, e_strides, scaling, row_ids,
                      out, expand_mode, num_hyp, r, rows_per_group=1):
    """cublas path: base = x W^T (+bias) by cuBLAS, then the Triton epilogue adds the expand."""
    base = None
    if weight is not None:
        w_op = weight if w_kn else weight.t()
        base = torch.addmm(bias, x, w_op) if bias is not None else x @ w_op
        bias = None
    if expand_mode != 2 and base is not None:
        out = base  # the epilogue reads each tile and writes it back in place
    return _launch_gemm_expand(None, None, False, base, shrink, block_stride, e, e_strides, scaling, bias,
                               row_ids, out, expand_mode, num_hyp, r, rows_per_group)


def _contig_rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def multi_lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, row_ids):
    num_hyp, r, _ = lora_A.shape
    d_out = lora_B.shape[1]
    x = _contig_rows(x)
    shrink = _launch_shrink(x, lora_A, None, row_ids)  # (M, r) fp32
    out = torch.empty(x.shape[0], d_out, device=x.device, dtype=x.dtype)
    e_strides = (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2))  # E_k = B_k (d_out, r)
    if _choose_path(x, weight) == "fused":
        y = _launch_gemm_expand(x, weight.contiguous(), False, None, shrink, 0, lora_B, e_strides, scaling, bias,
                                row_ids, out, 0, num_hyp, r)
    else:
        y = _base_then_expand(x, weight, False, bias, shrink, 0, lora_B, e_strides, scaling, row_ids,
                              out, 0, num_hyp, r)
    return y, shrink


def multi_lora_linear_triton_backward(grad_y, x, weight, lora_A, lora_B, scaling, row_ids, shrink):
    num_hyp, r, d_in = lora_A.shape
    grad_y = _contig_rows(grad_y)
    x = _contig_rows(x)
    # dS[m] = s_h dy[m] B_h: the shrink kernel with P_k = B_k^T (r, d_out) as a strided view.
    grad_shrink = _launch_shrink(grad_y, lora_B.transpose(1, 2), scaling, row_ids)
    out = torch.empty(grad_y.shape[0], d_in, device=x.device, dtype=x.dtype)
    e_strides = (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1))  # E_k = A_k^T (d_in, r)
    if _choose_path(grad_y, weight) == "fused":
        grad_x = _launch_gemm_expand(grad_y, weight.contiguous(), True, None, grad_shrink, 0, lora_A, e_strides,
                                     None, None, row_ids, out, 0, num_hyp, r)
    else:
        grad_x = _base_then_expand(grad_y, weight, True, None, grad_shrink, 0, lora_A, e_strides, None, row_ids,
                                   out, 0, num_hyp, r)
    grad_A, grad_B = _lora_weight_grads(grad_shrink, shrink, x, grad_y, row_ids, lora_A, scaling, x.dtype)
    return grad_x, grad_A, grad_B


def multi_lora_linear_shared_triton(x, weight, bias, lora_A, lora_B, scaling, num_groups):
    num_hyp, r, _ = lora_A.shape
    d_out = lora_B.shape[1]
    x = _contig_rows(x)
    rows_per_group = x.shape[0] // num_groups
    shrink_all = _launch_shrink(x, lora_A, None, None)  # (G*L, K*r) fp32
    out = torch.empty(x.shape[0] * num_hyp, d_out, device=x.device, dtype=x.dtype)
    e_strides = (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2))
    if _choose_path(x, weight) == "fused":
        y = _launch_gemm_expand(x, weight.contiguous(), False, None, shrink_all, r, lora_B, e_strides, scaling,
                                bias, None, out, 2, num_hyp, r, rows_per_group)
    else:
        y = _base_then_expand(x, weight, False, bias, shrink_all, r, lora_B, e_strides, scaling, None,
                              out, 2, num_hyp, r, rows_per_group)
    return y, shrink_all


def multi_lora_linear_shared_triton_backward(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups):
    num_hyp, r, d_in = lora_A.shape
    x = _contig_rows(x)
    grad_y4 = grad_y.reshape(num_groups, num_hyp, -1, grad_y.shape[-1])
    grad_shrink_all, grad_A, grad_B = _shared_lora_grads(grad_y4, x, lora_A, lora_B, scaling, shrink_all, x.dtype)
    grad_shrink_all = grad_shrink_all.float()
    grad_y_sum = grad_y4.sum(1, dtype=torch.float32).to(x.dtype).reshape(-1, grad_y.shape[-1])
    out = torch.empty(x.shape[0], d_in, device=x.device, dtype=x.dtype)
    e_strides = (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1))
    if _choose_path(grad_y_sum, weight) == "fused":
        grad_x = _launch_gemm_expand(grad_y_sum, weight.contiguous(), True, None, grad_shrink_all, r, lora_A,
                                     e_strides, None, None, None, out, 1, num_hyp, r)
    else:
        grad_x = _base_then_expand(grad_y_sum, weight, True, None, grad_shrink_all, r, lora_A, e_strides, None,
                                   None, out, 1, num_hyp, r)
    return grad_x, grad_A, grad_B


# ---------------------------------------------------------------------------------------------
# Registered custom ops (fake implementations + autograd)
# ---------------------------------------------------------------------------------------------


def _grad_outputs_like(x: Tensor, lora_A: Tensor, lora_B: Tensor):
    """Fake backward outputs: contiguous dx, dA, dB (the real kernels return contiguous tensors)."""
    return x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _shrink_dtype(x: Tensor) -> torch.dtype:
    return _acc_dtype(x.dtype)


@torch.library.custom_op("loramcl::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor,
                          lora_B: Tensor, scaling: Tensor, row_ids: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return multi_lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, row_ids)
    return multi_lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, row_ids)


@_multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, row_ids, backend):
    return (x.new_empty(x.shape[0], lora_B.shape[1]),
            x.new_empty(x.shape[0], lora_A.shape[1], dtype=_shrink_dtype(x)))


@torch.library.custom_op("loramcl::multi_lora_linear_backward", mutates_args=())
def _multi_lora_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor,
                                   lora_B: Tensor, scaling: Tensor, row_ids: Tensor, shrink: Tensor,
                                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return multi_lora_linear_triton_backward(grad_y, x, weight, lora_A, lora_B, scaling, row_ids, shrink)
    return multi_lora_linear_ref_backward(grad_y, x, weight, lora_A, lora_B, scaling, row_ids, shrink)


@_multi_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scaling, row_ids, shrink, backend):
    return _grad_outputs_like(x, lora_A, lora_B)


def _weight_grads(ctx, grad_y2, x2):
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[1]:
        grad_weight = (grad_y2.to(_acc_dtype(x2.dtype)).t() @ x2.to(_acc_dtype(x2.dtype))).to(x2.dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_y2.sum(0, dtype=_acc_dtype(x2.dtype)).to(grad_y2.dtype)
    return grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, row_ids, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, row_ids, output[1])


def _backward(ctx, grad_y, grad_shrink):
    x, weight, lora_A, lora_B, scaling, row_ids, shrink = ctx.saved_tensors
    grad_x, grad_A, grad_B = _multi_lora_linear_backward_op(
        grad_y.contiguous(), x, weight, lora_A, lora_B, scaling, row_ids, shrink, ctx.backend)
    grad_weight, grad_bias = _weight_grads(ctx, grad_y, x)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None


_multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("loramcl::multi_lora_linear_shared", mutates_args=())
def _multi_lora_linear_shared_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor,
                                 lora_B: Tensor, scaling: Tensor, num_groups: int,
                                 backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return multi_lora_linear_shared_triton(x, weight, bias, lora_A, lora_B, scaling, num_groups)
    return multi_lora_linear_shared_ref(x, weight, bias, lora_A, lora_B, scaling, num_groups)


@_multi_lora_linear_shared_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, num_groups, backend):
    num_hyp, r, _ = lora_A.shape
    return (x.new_empty(x.shape[0] * num_hyp, lora_B.shape[1]),
            x.new_empty(x.shape[0], num_hyp * r, dtype=_shrink_dtype(x)))


@torch.library.custom_op("loramcl::multi_lora_linear_shared_backward", mutates_args=())
def _multi_lora_linear_shared_backward_op(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor,
                                          lora_B: Tensor, scaling: Tensor, shrink_all: Tensor, num_groups: int,
                                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return multi_lora_linear_shared_triton_backward(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all,
                                                        num_groups)
    return multi_lora_linear_shared_ref_backward(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups)


@_multi_lora_linear_shared_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scaling, shrink_all, num_groups, backend):
    return _grad_outputs_like(x, lora_A, lora_B)


def _shared_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, num_groups, backend = inputs
    ctx.backend = backend
    ctx.num_groups = num_groups
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, output[1])


def _shared_backward(ctx, grad_y, grad_shrink):
    x, weight, lora_A, lora_B, scaling, shrink_all = ctx.saved_tensors
    grad_x, grad_A, grad_B = _multi_lora_linear_shared_backward_op(
        grad_y.contiguous(), x, weight, lora_A, lora_B, scaling, shrink_all, ctx.num_groups, ctx.backend)
    num_hyp = lora_A.shape[0]
    grad_y_sum = grad_y.reshape(ctx.num_groups, num_hyp, -1, grad_y.shape[-1]).sum(1).reshape(-1, grad_y.shape[-1])
    grad_weight, grad_bias = _weight_grads(ctx, grad_y_sum, x)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None


_multi_lora_linear_shared_op.register_autograd(_shared_backward, setup_context=_shared_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function: argument checks, row -> hypothesis map, backend choice
# ---------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, dims: int, expected: str):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def _check_inputs(x, weight, bias, lora_A, lora_B, num_hypotheses):
    if not isinstance(x, Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (N, ..., d_in) with at least 2 dims, got {shape}")
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


def _scaling_vector(scaling, num_hyp: int, x: Tensor) -> Tensor:
    if isinstance(scaling, Tensor):
        if scaling.requires_grad:
            raise ValueError("scaling is not differentiated: pass a detached tensor or a float")
        if scaling.dim() == 0:
            scaling = scaling.reshape(1).expand(num_hyp)
        if scaling.shape != (num_hyp,):
            raise ValueError(f"scaling must be a float or a tensor of shape (K,) = ({num_hyp},), "
                             f"got {tuple(scaling.shape)}")
        return scaling.to(device=x.device, dtype=_acc_dtype(x.dtype)).contiguous()
    if not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float or a (K,) tensor, got {type(scaling).__name__}")
    return torch.full((num_hyp,), float(scaling), device=x.device, dtype=_acc_dtype(x.dtype))


def _row_ids(n: int, tokens: int, num_hyp: int, layout: str, inner: int, hypothesis_ids, device) -> Tensor:
    """Hypothesis of every flattened row (N * tokens,), int32, built on the device without a sync."""
    if hypothesis_ids is not None:
        return hypothesis_ids.to(device=device, dtype=torch.int32)[:, None].expand(n, tokens).reshape(-1)
    rows = torch.arange(n * tokens, device=device, dtype=torch.int32)
    if layout == "batch_major":
        return (rows // (tokens * inner)) % num_hyp
    return rows // (tokens * (n // num_hyp))


def _check_layout(n, num_hyp, layout, inner, hypothesis_ids, shared_input):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    if not isinstance(inner, int) or inner < 1:
        raise ValueError(f"inner must be a positive int, got {inner!r}")
    if inner != 1 and layout != "batch_major":
        raise ValueError("inner (beams per row) applies to the batch_major layout only")
    if hypothesis_ids is not None:
        if shared_input:
            raise ValueError("hypothesis_ids cannot be combined with shared_input=True")
        if not isinstance(hypothesis_ids, Tensor) or hypothesis_ids.shape != (n,):
            raise ValueError(f"hypothesis_ids must be an integer tensor of shape (N,) = ({n},)")
        if hypothesis_ids.is_floating_point() or hypothesis_ids.is_complex() or hypothesis_ids.dtype == torch.bool:
            raise TypeError(f"hypothesis_ids must hold integers, got {hypothesis_ids.dtype}")
        # A value check needs the values on the host: it is skipped while torch.compile traces.
        if not torch.compiler.is_compiling() and n > 0:
            lo, hi = int(hypothesis_ids.min()), int(hypothesis_ids.max())
            if lo < -1 or hi >= num_hyp:
                raise ValueError(f"hypothesis_ids must lie in [-1, K) = [-1, {num_hyp}), got values in [{lo}, {hi}]")
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
    chosen = resolve_backend(backend, x.device)
    if chosen == "cuda":  # resolve_backend only returns it when the extension is importable
        chosen = "triton"
    if chosen == "triton" and x.dtype not in TRITON_DTYPES:
        if backend is None or backend == "auto":
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
    backend: Optional[str] = None,
) -> Tensor:
    """y = x W^T + bias + s[h] (x A_h^T) B_h^T for K LoRA hypotheses in one pass.

    x: (N, ..., d_in); weight: (d_out, d_in) or None (LoRA delta only); bias: (d_out,) or None;
    lora_A: (K, r, d_in); lora_B: (K, d_out, r); scaling: float or (K,) tensor (not differentiated).
    Row n's hypothesis: batch_major (n // inner) % K (official), hypothesis_major n // (N/K), or
    hypothesis_ids[n] in [-1, K) (-1 = base only). shared_input=True: every hypothesis sees all N
    rows and the result has N*K rows in the layout. Returns (N, ..., d_out) or (N*K, ..., d_out).
    """
    num_hyp, r, d_in, d_out = _check_inputs(x, weight, bias, lora_A, lora_B, num_hypotheses)
    n = x.shape[0]
    _check_layout(n, num_hyp, layout, inner, hypothesis_ids, shared_input)
    chosen = _choose_backend(backend, x)
    scale = _scaling_vector(scaling, num_hyp, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    tokens = x2.shape[0] // n if n else 1
    if shared_input:
        num_groups = n // inner if layout == "batch_major" else 1
        y2, _ = _multi_lora_linear_shared_op(x2, weight, bias, lora_A, lora_B, scale, max(num_groups, 1), chosen)
        return y2.view(n * num_hyp, *lead[1:], d_out)
    row_ids = _row_ids(n, tokens, num_hyp, layout, inner, hypothesis_ids, x.device)
    y2, _ = _multi_lora_linear_op(x2, weight, bias, lora_A, lora_B, scale, row_ids, chosen)
    return y2.view(*lead, d_out)
