"""Fused MCL loss: per-hypothesis NLL from hidden states, argmin winner, WTA weighting.

Math (DESIGN.md sections 1 and 2.2)
-----------------------------------
hidden (R, T, H), R = B*K rows in the model's layout:
  batch_major       row r = b*K + k   (the official layout: the batch is repeated K times)
  hypothesis_major  row r = k*B + b
lm_head weight (V, H), optional bias (V,); labels (B, T) shared by the K hypotheses, or (R, T) in
the layout of `hidden`. With shift_labels, hidden position t predicts labels[:, t+1] and the last
position predicts nothing (as in Hugging Face causal LMs).

  z[r,t,:]  = hidden[r,t] W^T + bias                          (fp32 accumulation)
  nll[r,t]  = logsumexp_v z[r,t,v] - z[r,t,target]            for supervised (r, t) only
  L[k,b]    = sum_t nll[row(k,b), t]  (/ number of supervised t when sequence_reduction="mean";
              a sequence without supervised tokens has L = 0 and contributes 0)
  winner[b] = argmin_k L[k,b], ties to the lowest k
  w[k,b]    = wta: 1 on the winner | relaxed(eps): winner 1-eps, others eps/(K-1) (K=1: 1)
              | annealed(tau): softmax_k(-L[:,b]/tau), computed stably; w is detached
  loss      = mean_b sum_k w[k,b] L[k,b]

Gradient: d loss / d z[r,t,:] = c[r] * (softmax(z[r,t,:]) - onehot(target)), with
c[r] = grad * w[k,b] / B (/ count[r] for "mean"); d hidden = that @ W, d W = that^T @ hidden,
d bias = column sums. Rows with w = 0 contribute nothing; the losers of hard WTA are skipped.

Design of the 'triton' backend
------------------------------
1. Compaction. Two small Triton kernels, one program per hidden row each, read the labels where
   they are (shift, shared or per-row labels, the layout) and write the supervised positions
   r*T + t and their targets in row-major order into fixed-size (R*T,) arrays: the first counts
   each row's supervised positions and bad labels, the second places a row's positions after
   those of the rows before it (a prefix sum of the counts, then a cumulative sum within the
   row) and writes the totals. No sort, no torch.nonzero, two launches where torch ops took ~15.
   Unsupervised positions then cost nothing: with captioning shapes (32 of 780 positions
   supervised) the GEMMs see 4 % of the rows. Pass 2 compacts the same way, keeping only the
   rows of non-zero weight. The kernels that follow read the rest where it lives (each row's
   coefficient c[r] from the weights and counts, lse at its position) instead of gathering it
   with torch ops.
2. Pass 1 (all K hypotheses): for row chunks x vocab chunks, one cuBLAS GEMM writes fp32 logits
   (bf16/fp16 operands, fp32 accumulation and output) into one reused buffer of
   LOGITS_CHUNK_ELEMENTS elements (64 MiB by default: memory O(chunk x V_chunk), never rows x V);
   a Triton row kernel folds each chunk into a running fp32 (max, sum-exp) pair and picks up the
   target logit; after the last vocab chunk it writes the lse and nll at the position's slot of
   (R*T,) arrays, the lse as its two parts (max, log sum exp(z - max)) and nll = (max - z_target)
   + log-sum: one fp32 lse = max + log-sum would carry half an ulp of |lse| into nll and into pass
   2's softmax (large logits: 1e-5 at |lse| ~ 300, where PyTorch works from the row max). Vocab chunks are the inner loop, so W is streamed once per row chunk. The
   combination order is fixed: deterministic, no atomics.
   Or, fused (env LORAMCL_MCL_PASS1=fused; auto takes it for 16-bit operands on Hopper, where it
   measured faster, see _pass1_path): per row chunk the rows are gathered, then one persistent Triton GEMM (TMA
   descriptors, as the multi-LoRA GEMM) computes each (BM, BN) logits tile in registers and
   leaves only its rows' (max, sum exp(z - max), target logit), 3 values per row and vocab tile;
   a second kernel combines the tiles in vocab order. The fp32 logits never reach memory.
3. A small Triton kernel, one program per sequence, sums nll over t for each k (fixed order),
   divides by the count, takes the argmin (ties -> lowest k), writes the weights and sum_k w L;
   the loss is the mean of that over sequences. No host sync.
4. Soft weights (relaxed with epsilon > 0, annealed, or K = 1) with a frozen lm_head: every
   w > 0, so every supervised row needs d hidden, and d hidden[p] = c[r] * (softmax(z_p) -
   onehot) W where only the scalar c[r] waits for the weights. Pass 1 therefore also forms
   (softmax - onehot) W per supervised row (one more GEMM per chunk, P W_c, with a flash-style
   rescale of the running sum; see _pass1_chunked) and keeps it in the input dtype; the
   backward only scales and scatters it: 4 n H V GEMM FLOPs in all instead of 6, no logits
   recomputed (env LORAMCL_MCL_SOFT_BACKWARD=recompute keeps pass 2).
5. Pass 2 (backward): with hard weights (wta, or relaxed with epsilon = 0; K > 1) only the
   winners' supervised positions (1/K of the rows) are compacted the same way; with soft weights
   and a trainable lm_head (or the recompute switch), pass 1's supervised positions are
   compacted again and a row whose w underflowed to 0 contributes through c[r] = 0. Logits are
   recomputed per chunk (half pass 1's buffer: its fp32 logits, their operand-dtype copy and the
   fp32 d hidden rows are the backward's peak memory) with cuBLAS, a Triton row kernel turns them
   into c * (exp((z - max) - log-sum) - onehot) (in the operand dtype for the next GEMM, and in fp32 when
   lm_head grads are needed). With a frozen lm_head where pass 1 is fused, pass 2 is fused too
   (_grad_logits_tiles_kernel): pass 1's GEMM recomputes the logits and its epilogue stores that
   gradient, so no fp32 logits reach memory (see _pass2_path);
   then cuBLAS gives d hidden (accumulated in fp32 over vocab chunks, by an fp32-output addmm
   where torch has one) and, when lm_head requires grad, d W (fp32 GEMM into an fp32
   accumulator) and d bias (fp32 column sums). A Triton kernel scatters the d hidden rows into
   a zero (R*T, H) tensor, rounding once (unique rows, deterministic).

Host syncs. cuBLAS needs the number of compacted rows on the host. The forward reads (number of
supervised positions n_rows, number of out-of-range labels) in one .tolist(), which also serves
the label check; only the two compaction kernels are launched before it, since after a sync the
GPU idles while the host launches the next kernels. It returns n_rows as `pass1_rows`, an int64
CPU tensor of shape () that autograd saves for the backward. The backward reads it with int()
(host memory, no device sync) and derives its own count (or, with the one-pass gradient of soft
weights, reads nothing: the kept rows carry their count): n_rows with soft weights or K = 1;
n_rows // K with hard weights and labels (B, T) shared by the hypotheses (one winner row per
sequence, whose supervised count is the sequence's). So a forward + backward costs one sync. The exception is hard weights with per-row labels (B*K, T),
K > 1: the winners' supervised count is data-dependent and the backward reads it with one .item().
Each sync sits outside every kernel, inside the custom op's body: the op is opaque to
torch.compile, so torch.compile(fullgraph=True) traces through it (CUDA-graph capture of the op
is not possible for that reason). Everything else (per-sequence reduction, argmin, weights, row
coefficients) stays on the device.

Both passes are registered torch.library custom ops (fake implementations, autograd), which
torch.compile traces; eager calls reach the same implementations and autograd formula through a
plain torch.autograd.Function, which costs less host time than the dispatcher.

The 'reference' backend computes the same thing in plain PyTorch (fp32, or fp64 for fp64 inputs):
it is the CPU path and the oracle for the Triton kernels. `mcl_loss_from_logits` takes logits the
caller already has and is a plain differentiable PyTorch composition.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from loramcl_kernels._backend import BACKENDS, requested_backend, resolve_backend, triton_interpreting
from loramcl_kernels.ops._autocast import autocast_off, autocast_operands
from loramcl_kernels.ops._tracing import (
    check_flag, refuse_double_backward, refuse_functorch_transforms, tracing,
)
from loramcl_kernels.ops._triton_utils import (
    cdiv, contiguous_or_none, device_facts, grouped_tile, launch, next_pow2, on_input_device, set_tma_allocator,
    tma_gemm_capable, tma_rows_ok,
)
from loramcl_kernels.ops._triton_utils import addmm_out_dtype_supported as _addmm_out_dtype_supported
from loramcl_kernels.ops._triton_utils import mm_out_dtype_supported as _mm_out_dtype_supported

LAYOUTS = ("batch_major", "hypothesis_major")
MODES = ("wta", "relaxed", "annealed")
SEQUENCE_REDUCTIONS = ("mean", "sum")

# Pass 1 / pass 2 buffer: (row chunk) x (vocab chunk) fp32 logits, reused for every chunk.
# 2^24 fp32 elements = 64 MiB (pass 2 adds a half-size operand-dtype copy). Module-level so that
# tests can shrink it to exercise many chunks.
LOGITS_CHUNK_ELEMENTS = 1 << 24
# Most rows one GEMM sees; with LOGITS_CHUNK_ELEMENTS this keeps vocab chunks >= 4096 wide.
MAX_ROW_CHUNK = 4096
# Pass 1 with the one-pass gradient rescales a (rows x H) fp32 accumulator once per vocab chunk:
# fewer rows per chunk mean wider vocab chunks (16384 with the default buffer) and fewer rescales.
ONE_PASS_ROW_CHUNK = 1024
# The fused pass 2 cuts its vocab chunks to one wave of tiles only where a wave is at least this
# wide: its d hidden GEMM (rows x H, reducing over the chunk) stays compute-bound, and a chunk costs
# two launches (see _pass2_chunk_sizes).
PASS2_MIN_COLS = 4096
# The fused pass 2 stores its gradient tiles through a TMA descriptor (no tile of 64-bit pointers:
# fewer registers, sm_90), else through masked pointer stores (see _grad_logits_tiles_kernel).
PASS2_TMA_STORE = True
# fp32's lowest finite value: where every online log-sum-exp starts its running max, so that masked
# lanes (z = -inf) give exp(-inf - max) = 0, never NaN, and every finite logit is at or above it.
FP32_LOWEST = tl.constexpr(-3.4028234663852886e38)  # .value on the host


@dataclasses.dataclass
class MCLKernelStats:
    """Rows processed by the last pass 1 / pass 2 (host ints the launchers know anyway)."""

    pass1_rows: int = 0
    pass2_rows: int = 0


# Filled by both backends on every call; reading it costs nothing and needs no sync.
KERNEL_STATS = MCLKernelStats()


class MCLLossOutput(NamedTuple):
    loss: torch.Tensor  # () scalar, fp32 (fp64 for fp64 inputs), differentiable
    nll: torch.Tensor  # (K, B) per-hypothesis per-sequence NLL, detached
    winners: torch.Tensor  # (B,) int64, argmin_k nll[k, b], ties -> lowest k
    weights: torch.Tensor  # (K, B) the detached weights w[k, b]


# ----------------------------------------------------------------------------------------------
# Layout helpers and the shared targets / weights logic
# ----------------------------------------------------------------------------------------------


def _rows_to_kb(per_row: torch.Tensor, K: int, layout: str) -> torch.Tensor:
    """(R,) values in the row layout -> (K, B)."""
    R = per_row.shape[0]
    if layout == "batch_major":
        return per_row.view(R // K, K).t()
    return per_row.view(K, R // K)


def _kb_to_rows(per_kb: torch.Tensor, layout: str) -> torch.Tensor:
    """(K, B) -> (R,) values in the row layout."""
    if layout == "batch_major":
        return per_kb.t().reshape(-1)
    return per_kb.reshape(-1)


def _targets_per_row(labels, R, K, layout, shift_labels, ignore_index) -> torch.Tensor:
    """(R, T) int64: the label each hidden position predicts, ignore_index where none."""
    lab = labels.to(torch.int64)
    if shift_labels:
        lab = F.pad(lab[:, 1:], (0, 1), value=ignore_index)
    if lab.shape[0] != R:  # shared (B, T) labels: row r reads sequence b(r), one copy
        B, T = lab.shape
        lab = lab[:, None].expand(B, K, T) if layout == "batch_major" else lab[None].expand(K, B, T)
        lab = lab.reshape(R, T)
    return lab


def _count_bad_labels(labels, ignore_index, V, shift_labels) -> torch.Tensor:
    """Labels outside [0, V) other than ignore_index, among those some position predicts (with
    shift_labels the first label of each sequence is no position's target)."""
    targets = labels[:, 1:] if shift_labels else labels
    return ((targets != ignore_index) & ((targets < 0) | (targets >= V))).sum()


def _raise_bad_labels(n_bad: int, V: int, ignore_index: int) -> None:
    if n_bad:
        raise ValueError(
            f"labels: {n_bad} value(s) outside [0, {V}) that are not ignore_index={ignore_index}"
        )


def _sequence_weights(nll, mode, epsilon, temperature):
    """nll (K, B) -> winners (B,) int64 (first minimum), weights (K, B), detached."""
    nll = nll.detach()
    K = nll.shape[0]
    winners = torch.argmin(nll, dim=0)  # documented: first minimal index on ties
    onehot = F.one_hot(winners, K).t().to(nll.dtype)
    if mode == "wta" or (mode == "relaxed" and K == 1):
        weights = onehot
    elif mode == "relaxed":
        weights = onehot * (1.0 - epsilon) + (1.0 - onehot) * (epsilon / (K - 1))
    else:
        # softmax_k(-L / tau) = softmax_k(-(L - min_k L) / tau): finite for any tau > 0
        gap = nll - nll.min(0, keepdim=True).values
        weights = torch.softmax(-gap / _min_temperature(temperature), dim=0)
    return winners, weights


def _min_temperature(temperature: float) -> float:
    """tau for the fp32 softmax: below fp32's smallest normal number (~1.2e-38) the weights are
    the winner's one-hot either way, and tau itself would round to 0."""
    return max(float(temperature), torch.finfo(torch.float32).tiny)


def _hard_weights(mode: str, epsilon: float) -> bool:
    """w[:, b] is one-hot (when K > 1): wta, or relaxed with epsilon = 0. Else every w > 0."""
    return mode == "wta" or (mode == "relaxed" and epsilon == 0.0)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_coefficients(grad_loss, weights, row_count, layout, sequence_reduction, dtype):
    """c[r] = grad * w[k(r), b(r)] / B (/ count[r] for mean): d loss / d nll[r, t]."""
    B = weights.shape[1]
    c = _kb_to_rows(weights.to(dtype), layout) * (grad_loss.to(dtype) / B)
    if sequence_reduction == "mean":
        c = c / row_count.clamp(min=1).to(dtype)
    return c


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (fp32, or fp64 for fp64 inputs)
# ----------------------------------------------------------------------------------------------


def _reference_rows_per_chunk(V: int) -> int:
    return max(1, (1 << 26) // max(V, 1))


def _mcl_loss_forward_reference(
    hidden, weight, bias, labels, K, layout, mode, epsilon, temperature, sequence_reduction,
    ignore_index, shift_labels, keep_nll_grad=False,
):
    R, T, H = hidden.shape
    V = weight.shape[0]
    cdt = _stat_dtype(hidden.dtype)
    targets = _targets_per_row(labels, R, K, layout, shift_labels, ignore_index).reshape(-1)
    supervised = targets != ignore_index
    n_bad = _count_bad_labels(labels, ignore_index, V, shift_labels)
    _raise_bad_labels(int(n_bad), V, ignore_index)
    positions = supervised.nonzero().squeeze(1)  # reference: syncs freely
    KERNEL_STATS.pass1_rows = positions.numel()

    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    h2 = hidden.reshape(R * T, H)
    max_sup = torch.empty(positions.numel(), dtype=cdt, device=hidden.device)
    logsum_sup, tgt_logit = torch.empty_like(max_sup), torch.empty_like(max_sup)
    one_pass = keep_nll_grad and _soft_backward_path() == "one_pass"
    nll_grad = hidden.new_empty(positions.numel() if one_pass else 0, H)
    step = _reference_rows_per_chunk(V)
    for i0 in range(0, positions.numel(), step):
        pos = positions[i0 : i0 + step]
        z = h2.index_select(0, pos).to(cdt) @ w.t()
        if b is not None:
            z = z + b
        row_max = z.max(1).values
        max_sup[i0 : i0 + step] = row_max
        logsum_sup[i0 : i0 + step] = torch.log(torch.exp(z - row_max[:, None]).sum(1))
        tgt = targets[pos].unsqueeze(1)
        tgt_logit[i0 : i0 + step] = z.gather(1, tgt).squeeze(1)
        if one_pass:  # (softmax - onehot) W per row, p_target - 1 = -(sum of the other p)
            p_other = torch.softmax(z, dim=1).scatter_(1, tgt, 0.0)
            nll_grad[i0 : i0 + step] = p_other @ w - p_other.sum(1, keepdim=True) * w[tgt.squeeze(1)]

    position_lse = torch.zeros(2, R * T, dtype=cdt, device=hidden.device)  # (max, log-sum) per position
    position_lse[0].index_copy_(0, positions, max_sup)
    position_lse[1].index_copy_(0, positions, logsum_sup)
    nll_pos = torch.zeros(R * T, dtype=cdt, device=hidden.device)
    nll_pos.index_copy_(0, positions, (max_sup - tgt_logit) + logsum_sup)
    row_count = supervised.view(R, T).sum(1).to(torch.int32)
    per_row = nll_pos.view(R, T).sum(1)
    if sequence_reduction == "mean":
        per_row = per_row / row_count.clamp(min=1).to(cdt)
    nll = _rows_to_kb(per_row, K, layout).contiguous()
    winners, weights = _sequence_weights(nll, mode, epsilon, temperature)
    loss = (weights * nll).sum(0).mean()
    pass1_rows = torch.tensor(positions.numel(), dtype=torch.int64)  # CPU
    return loss, nll, winners, weights.contiguous(), position_lse, row_count, pass1_rows, nll_grad


def _mcl_loss_backward_reference(
    grad_loss, hidden, weight, bias, labels, weights, position_lse, row_count, pass1_rows, nll_grad,
    K, layout, sequence_reduction, ignore_index, shift_labels, hard_weights, need_weight_grad,
    need_bias_grad,
):
    # pass1_rows and hard_weights are unused: the reference finds its rows with a sync.
    R, T, H = hidden.shape
    V = weight.shape[0]
    cdt = _stat_dtype(hidden.dtype)
    targets = _targets_per_row(labels, R, K, layout, shift_labels, ignore_index).reshape(-1)
    coef = _row_coefficients(grad_loss, weights, row_count, layout, sequence_reduction, cdt)
    if nll_grad.shape[0] and not (need_weight_grad or need_bias_grad):  # the one-pass gradient
        KERNEL_STATS.pass2_rows = 0
        positions = (targets != ignore_index).nonzero().squeeze(1)  # pass 1's rows, in its order
        grad_h = torch.zeros(R * T, H, dtype=cdt, device=hidden.device)
        grad_h.index_copy_(0, positions, nll_grad.to(cdt) * coef[positions // T].unsqueeze(1))
        return grad_h.view(R, T, H).to(hidden.dtype), hidden.new_empty(0), hidden.new_empty(0)
    row_weight = _kb_to_rows(weights, layout)
    active = (targets != ignore_index) & (row_weight != 0).repeat_interleave(T)
    positions = active.nonzero().squeeze(1)
    KERNEL_STATS.pass2_rows = positions.numel()

    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    h2 = hidden.reshape(R * T, H)
    grad_h = torch.zeros(R * T, H, dtype=cdt, device=hidden.device)
    grad_w = torch.zeros(V, H, dtype=cdt, device=hidden.device) if need_weight_grad else None
    grad_b = torch.zeros(V, dtype=cdt, device=hidden.device) if need_bias_grad else None
    step = _reference_rows_per_chunk(V)
    for i0 in range(0, positions.numel(), step):
        pos = positions[i0 : i0 + step]
        rows = h2.index_select(0, pos).to(cdt)
        z = rows @ w.t()
        if b is not None:
            z = z + b
        g = torch.exp((z - position_lse[0, pos].to(cdt).unsqueeze(1)) - position_lse[1, pos].to(cdt).unsqueeze(1))
        g[torch.arange(pos.numel(), device=g.device), targets[pos]] -= 1.0
        g = g * coef[pos // T].unsqueeze(1)
        grad_h.index_copy_(0, pos, g @ w)
        if grad_w is not None:
            grad_w += g.t() @ rows
        if grad_b is not None:
            grad_b += g.sum(0)
    grad_h = grad_h.view(R, T, H).to(hidden.dtype)
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else hidden.new_empty(0)
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else hidden.new_empty(0)
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_kb(r, K, B, BATCH_MAJOR: tl.constexpr):
    """(k, b) of hidden row r: batch_major r = b*K + k, hypothesis_major r = k*B + b."""
    if BATCH_MAJOR:
        return r % K, r // K
    return r // B, r % B


@triton.jit
def _position_targets(labels_ptr, r, ts, T, K, B, stride_label_row, stride_label_t, ignore_index,
                      SHARED_LABELS: tl.constexpr, BATCH_MAJOR: tl.constexpr, SHIFT: tl.constexpr):
    """int64 targets of the positions (r, ts) of hidden row r: labels[row, t + 1] with shift,
    labels[row, t] without, where row = b(r) for labels (B, T) shared by the hypotheses and r for
    per-row labels; ignore_index where a position predicts nothing (the last one with shift)."""
    label_row = r
    if SHARED_LABELS:
        label_row = _row_kb(r, K, B, BATCH_MAJOR)[1]
    cols = ts
    if SHIFT:
        cols = ts + 1
    valid = cols < T
    ptrs = labels_ptr + label_row.to(tl.int64) * stride_label_row + cols.to(tl.int64) * stride_label_t
    labels = tl.load(ptrs, mask=valid, other=0).to(tl.int64)
    return tl.where(valid, labels, ignore_index)


@triton.jit
def _row_counts_kernel(
    labels_ptr,  # (B, T) or (R, T) integer labels, any strides
    row_count_ptr,  # (R,) int32 out: supervised positions of each hidden row
    row_bad_ptr,  # (R,) int32 out: their labels outside [0, V) (shared labels: on k = 0 rows only)
    position_max_ptr,  # (R*T,) fp32 out: zeroed (pass 1 fills the supervised positions)
    position_logsum_ptr,  # (R*T,) fp32 out: zeroed
    position_nll_ptr,  # (R*T,) fp32 out: zeroed
    T, K, B, V, stride_label_row, stride_label_t, ignore_index,
    SHARED_LABELS: tl.constexpr,
    BATCH_MAJOR: tl.constexpr,
    SHIFT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per hidden row r: count its supervised positions and bad labels, zero its slots
    of the per-position arrays."""
    r = tl.program_id(0)
    supervised = tl.zeros([BLOCK_T], dtype=tl.int32)
    bad = tl.zeros([BLOCK_T], dtype=tl.int32)
    row_start = r.to(tl.int64) * T
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        target = _position_targets(labels_ptr, r, ts, T, K, B, stride_label_row, stride_label_t, ignore_index,
                                   SHARED_LABELS, BATCH_MAJOR, SHIFT)
        is_supervised = (target != ignore_index) & (ts < T)
        supervised += is_supervised.to(tl.int32)
        bad += (is_supervised & ((target < 0) | (target >= V))).to(tl.int32)
        tl.store(position_max_ptr + row_start + ts, 0.0, mask=ts < T)
        tl.store(position_logsum_ptr + row_start + ts, 0.0, mask=ts < T)
        tl.store(position_nll_ptr + row_start + ts, 0.0, mask=ts < T)
    tl.store(row_count_ptr + r, tl.sum(supervised, 0))
    n_bad = tl.sum(bad, 0)
    if SHARED_LABELS:  # the K rows of a sequence read one label row: count it once
        n_bad = tl.where(_row_kb(r, K, B, BATCH_MAJOR)[0] == 0, n_bad, 0)
    tl.store(row_bad_ptr + r, n_bad)


@triton.jit
def _compact_positions_kernel(
    labels_ptr,  # (B, T) or (R, T) integer labels, any strides
    row_count_ptr,  # (R,) int32 supervised positions per row (_row_counts_kernel)
    row_bad_ptr,  # (R,) int32 bad labels per row, read when COUNT_BAD
    weights_ptr,  # (K, B) fp32 weights, read when ROW_WEIGHTS
    positions_ptr,  # int64 out, one slot per active supervised position: r*T + t, row-major
    targets_ptr,  # int64 out: their targets, in the same slots
    counts_ptr,  # (2,) int64 out: number of active supervised positions, number of bad labels
    R, T, K, B, stride_label_row, stride_label_t, ignore_index,
    SHARED_LABELS: tl.constexpr,
    BATCH_MAJOR: tl.constexpr,
    SHIFT: tl.constexpr,
    ROW_WEIGHTS: tl.constexpr,  # active rows: weight w[k(r), b(r)] != 0 (else every row)
    COUNT_BAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per hidden row r: its active supervised positions, ascending, go to the slots
    offset_r + 0, 1, ..., offset_r = the active supervised positions of the rows before r: the
    order of a stable sort of the mask (the row-major order), with no sort and no host sync. The
    last program writes the counts."""
    r = tl.program_id(0)
    offset = tl.zeros([BLOCK_R], dtype=tl.int64)
    for j0 in range(0, r, BLOCK_R):  # prefix sum over the rows before r (fixed, deterministic)
        js = j0 + tl.arange(0, BLOCK_R)
        count = tl.load(row_count_ptr + js, mask=js < r, other=0).to(tl.int64)
        if ROW_WEIGHTS:
            k, b = _row_kb(js, K, B, BATCH_MAJOR)
            count = tl.where(tl.load(weights_ptr + k * B + b, mask=js < r, other=0.0) != 0.0, count, 0)
        offset += count
    slot = tl.sum(offset, 0)
    own = tl.load(row_count_ptr + r).to(tl.int64)  # this row's active supervised positions
    if ROW_WEIGHTS:
        k, b = _row_kb(r, K, B, BATCH_MAJOR)
        own = tl.where(tl.load(weights_ptr + k * B + b) != 0.0, own, 0)
    if r == R - 1:
        tl.store(counts_ptr, slot + own)
        n_bad = tl.zeros([BLOCK_R], dtype=tl.int64)
        if COUNT_BAD:
            for j0 in range(0, R, BLOCK_R):
                js = j0 + tl.arange(0, BLOCK_R)
                n_bad += tl.load(row_bad_ptr + js, mask=js < R, other=0).to(tl.int64)
        tl.store(counts_ptr + 1, tl.sum(n_bad, 0))
    row_start = r.to(tl.int64) * T
    for t0 in range(0, tl.where(own > 0, T, 0), BLOCK_T):  # an inactive row writes nothing
        ts = t0 + tl.arange(0, BLOCK_T)
        target = _position_targets(labels_ptr, r, ts, T, K, B, stride_label_row, stride_label_t, ignore_index,
                                   SHARED_LABELS, BATCH_MAJOR, SHIFT)
        keep = (target != ignore_index) & (ts < T)
        rank = tl.cumsum(keep.to(tl.int32), 0)  # 1-based rank among this block's kept positions
        out = slot + rank - 1
        tl.store(positions_ptr + out, row_start + ts, mask=keep)
        tl.store(targets_ptr + out, target, mask=keep)
        slot += tl.sum(keep.to(tl.int32), 0)


@triton.jit
def _row_coefficient(r, grad_ptr, weights_ptr, row_count_ptr, K, B,
                     BATCH_MAJOR: tl.constexpr, MEAN: tl.constexpr):
    """c[r] = grad * w[k(r), b(r)] / B (/ max(count[r], 1) for "mean"): d loss / d nll[r, t], fp32."""
    k, b = _row_kb(r, K, B, BATCH_MAJOR)
    c = tl.load(weights_ptr + k * B + b) * (tl.load(grad_ptr).to(tl.float32) / B)
    if MEAN:
        c = c / tl.maximum(tl.load(row_count_ptr + r), 1).to(tl.float32)
    return c


@triton.jit
def _nll_gradient(z, is_target, row_max, log_sum, coef):
    """d loss / d z = c[r] * (softmax(z) - onehot(target)), with softmax(z) = exp((z - max) - log-sum)
    from pass 1's (max, log-sum): one row's columns or a (rows, columns) tile, the row values
    broadcast to z's shape by the caller."""
    return coef * (tl.exp((z - row_max) - log_sum) - tl.where(is_target, 1.0, 0.0))


@triton.jit
def _load_logits(row_ptr, bias_ptr, v_start, c0, n_cols, BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_V of one row of a logits chunk (+ bias) in fp32, -inf past n_cols."""
    cols = c0 + tl.arange(0, BLOCK_V)
    in_range = cols < n_cols
    z = tl.load(row_ptr + cols, mask=in_range, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + v_start + cols, mask=in_range, other=0.0).to(tl.float32)
    return z, cols, in_range


@triton.jit
def _lse_chunk_kernel(
    logits_ptr,  # (rows, n_cols) fp32 logits of this chunk, row stride stride_row
    bias_ptr,  # (V,) or a dummy when HAS_BIAS is False
    target_ptr,  # (rows,) int64 target class of each row
    position_ptr,  # (rows,) int64 flat position r*T + t of each row
    max_ptr,  # (rows,) fp32 running max over the vocab chunks seen so far
    sumexp_ptr,  # (rows,) fp32 running sum of exp(z - max)
    target_logit_ptr,  # (rows,) fp32 running target logit (one chunk contributes)
    position_max_ptr,  # (R*T,) fp32 row max per position, written after the last chunk
    position_logsum_ptr,  # (R*T,) fp32 log sum exp(z - max) per position, written after the last chunk
    position_nll_ptr,  # (R*T,) fp32 nll per position, written after the last chunk
    p_ptr,  # KEEP_P: (rows, n_cols) out, exp(z - new max) in the GEMM operand dtype, 0 at the target;
    # it lives in the logits' own memory: row r at p_ptr + r * p_stride_row, column c over the
    # bytes of logits c/2 (16-bit P) or c (fp32 P) of the same row
    alpha_ptr,  # KEEP_P: (rows,) fp32 out, exp(old max - new max): the rescale of earlier chunks
    sum_nt_ptr,  # KEEP_P: (rows,) fp32 running sum of exp(z - max) over the non-target classes
    n_cols,
    v_start,
    stride_row,
    p_stride_row,
    HAS_BIAS: tl.constexpr,
    IS_LAST: tl.constexpr,
    KEEP_P: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: fold one vocab chunk of logits into the row's online logsumexp.

    KEEP_P (the one-pass gradient of soft weights): also write the chunk's unnormalised softmax
    P = exp(z - new max) without the target column, for u <- alpha u + P W_chunk, and keep the
    running state after the last chunk too (the caller finishes u with the final sums).
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    run_max = tl.full([BLOCK_V], FP32_LOWEST, dtype=tl.float32)  # masked lanes add exp(-inf) = 0
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_V):
        z, cols, in_range = _load_logits(row_ptr, bias_ptr, v_start, c0, n_cols, BLOCK_V, HAS_BIAS)
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
    chunk_max = tl.max(run_max, 0)
    chunk_sum = tl.sum(run_sum * tl.exp(run_max - chunk_max), 0)

    old_max = tl.load(max_ptr + row)
    old_sum = tl.load(sumexp_ptr + row)
    new_max = tl.maximum(old_max, chunk_max)
    new_sum = old_sum * tl.exp(old_max - new_max) + chunk_sum * tl.exp(chunk_max - new_max)

    target = tl.load(target_ptr + row)
    in_chunk = (target >= v_start) & (target < v_start + n_cols)
    col = tl.where(in_chunk, target - v_start, 0)
    z_target = tl.load(row_ptr + col, mask=in_chunk, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z_target += tl.load(bias_ptr + v_start + col, mask=in_chunk, other=0.0).to(tl.float32)
    target_logit = tl.load(target_logit_ptr + row) + z_target

    if KEEP_P:
        # second sweep over the chunk (in L2): P in the frame of the new running max, written over
        # the row's logits. A block's stores land at or before the logits it loads (a 16-bit P of
        # column c covers the bytes of logit c/2), never on those of later blocks; the barrier
        # keeps every warp's loads of a block ahead of the other warps' stores into it.
        p_row = p_ptr + row.to(tl.int64) * p_stride_row
        p_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_V):
            z, cols, in_range = _load_logits(row_ptr, bias_ptr, v_start, c0, n_cols, BLOCK_V, HAS_BIAS)
            p = tl.where(cols == target - v_start, 0.0, tl.exp(z - new_max))
            p_sum += p
            tl.debug_barrier()
            tl.store(p_row + cols, p.to(p_ptr.dtype.element_ty), mask=in_range)
        alpha = tl.exp(old_max - new_max)
        tl.store(alpha_ptr + row, alpha)
        tl.store(sum_nt_ptr + row, tl.load(sum_nt_ptr + row) * alpha + tl.sum(p_sum, 0))

    if IS_LAST:
        # the lse kept as (max, log-sum), nll = (max - z_target) + log-sum: both parts exact-ish where
        # one fp32 lse = max + log-sum would lose half an ulp of |lse| (large logits)
        log_sum = tl.log(new_sum)
        position = tl.load(position_ptr + row)
        tl.store(position_max_ptr + position, new_max)
        tl.store(position_logsum_ptr + position, log_sum)
        tl.store(position_nll_ptr + position, (new_max - target_logit) + log_sum)
    if KEEP_P or not IS_LAST:
        tl.store(max_ptr + row, new_max)
        tl.store(sumexp_ptr + row, new_sum)
        tl.store(target_logit_ptr + row, target_logit)


@triton.jit
def _sequence_weights_kernel(
    position_nll_ptr,  # (R*T,) fp32, zero at unsupervised positions
    row_count_ptr,  # (R,) int32 supervised positions per row
    nll_ptr,  # (K, B) fp32 out: L[k, b]
    winners_ptr,  # (B,) int64 out
    weights_ptr,  # (K, B) fp32 out
    sequence_loss_ptr,  # (B,) fp32 out: sum_k w[k, b] L[k, b] (the loss is its mean)
    B,
    K,
    T,
    epsilon,  # relaxed: already 0 when K == 1
    temperature,  # annealed: tau >= fp32's smallest normal number
    BATCH_MAJOR: tl.constexpr,
    MODE: tl.constexpr,  # 0 wta, 1 relaxed, 2 annealed
    MEAN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per sequence b: L[:, b] (fixed summation order), argmin, weights, w . L."""
    b = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    seq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K):
        if BATCH_MAJOR:
            r = b * K + k
        else:
            r = k * B + b
        base = position_nll_ptr + r.to(tl.int64) * T
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            acc += tl.load(base + ts, mask=ts < T, other=0.0)
        total = tl.sum(acc, 0)
        if MEAN:
            count = tl.load(row_count_ptr + r)
            total = total / tl.maximum(count, 1).to(tl.float32)
        seq = tl.where(ks == k, total, seq)
    valid = ks < K
    seq_valid = tl.where(valid, seq, float("inf"))
    best = tl.min(seq_valid, 0)
    winner = tl.min(tl.where(seq_valid == best, ks, BLOCK_K), 0)
    # torch.argmin semantics: a NaN loss is the minimum (first NaN wins), so every sequence has
    # exactly one winner (pass 2 sizes itself on that).
    is_nan = valid & (seq != seq)
    winner = tl.where(tl.max(is_nan.to(tl.int32), 0) > 0, tl.min(tl.where(is_nan, ks, BLOCK_K), 0), winner)
    is_winner = ks == winner
    if MODE == 0:
        w = tl.where(is_winner, 1.0, 0.0)
    elif MODE == 1:
        w = tl.where(is_winner, 1.0 - epsilon, epsilon / tl.maximum(K - 1, 1))
    else:
        x = tl.where(valid, -(seq - best) / temperature, float("-inf"))  # softmax(-L / tau), shifted by min L
        e = tl.exp(x - tl.max(x, 0))
        w = e / tl.sum(e, 0)
    tl.store(nll_ptr + ks * B + b, seq, mask=valid)
    tl.store(weights_ptr + ks * B + b, w, mask=valid)
    tl.store(winners_ptr + b, winner.to(tl.int64))
    tl.store(sequence_loss_ptr + b, tl.sum(tl.where(valid, w * seq, 0.0), 0))


@triton.jit
def _grad_logits_chunk_kernel(
    logits_ptr,  # (rows, n_cols) fp32 logits; overwritten with the fp32 gradient if STORE_FP32
    grad_lowp_ptr,  # (rows, n_cols) gradient in the GEMM operand dtype if STORE_LOWP
    bias_ptr,
    target_ptr,  # (rows,) int64 target of each row
    position_ptr,  # (rows,) int64 flat position r*T + t of each row
    position_max_ptr,  # (R*T,) fp32 row max per position (pass 1)
    position_logsum_ptr,  # (R*T,) fp32 log sum exp(z - max) per position (pass 1)
    grad_ptr,  # () d loss
    weights_ptr,  # (K, B) fp32 weights
    row_count_ptr,  # (R,) int32 supervised positions per row
    n_cols,
    v_start,
    stride_row,
    T, K, B,
    HAS_BIAS: tl.constexpr,
    STORE_FP32: tl.constexpr,
    STORE_LOWP: tl.constexpr,
    BATCH_MAJOR: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: g = c[r] * (exp((z - max) - log-sum) - onehot(target)) over one vocab chunk."""
    row = tl.program_id(0)
    offset = row.to(tl.int64) * stride_row
    target_col = tl.load(target_ptr + row) - v_start
    position = tl.load(position_ptr + row)
    row_max = tl.load(position_max_ptr + position)
    log_sum = tl.load(position_logsum_ptr + position)
    coef = _row_coefficient(position // T, grad_ptr, weights_ptr, row_count_ptr, K, B, BATCH_MAJOR, MEAN)
    for c0 in range(0, n_cols, BLOCK_V):
        z, cols, in_range = _load_logits(logits_ptr + offset, bias_ptr, v_start, c0, n_cols, BLOCK_V, HAS_BIAS)
        g = _nll_gradient(z, cols == target_col, row_max, log_sum, coef)
        if STORE_FP32:
            tl.store(logits_ptr + offset + cols, g, mask=in_range)
        if STORE_LOWP:
            tl.store(grad_lowp_ptr + offset + cols, g.to(grad_lowp_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _scatter_rows_kernel(
    rows_ptr,  # (n, H) rows: pass 2's fp32 d hidden, or the one-pass (softmax - onehot) W
    position_ptr,  # (n,) int64 flat position r*T + t of each row
    out_ptr,  # (R*T, H) d hidden, zero-initialised: row position[i] <- (c[r] *) rows[i]
    grad_ptr,  # () d loss, read when SCALE
    weights_ptr,  # (K, B) fp32 weights, read when SCALE
    row_count_ptr,  # (R,) int32, read when SCALE
    H, T, K, B,
    SCALE: tl.constexpr,
    BATCH_MAJOR: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per (row, BLOCK_H columns): scatter a row of d hidden to its position, scaled by
    c[r] in fp32 when SCALE (the one-pass backward), rounded once to d hidden's dtype."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    position = tl.load(position_ptr + i)
    g = tl.load(rows_ptr + i.to(tl.int64) * H + cols, mask=mask, other=0.0).to(tl.float32)
    if SCALE:
        g = g * _row_coefficient(position // T, grad_ptr, weights_ptr, row_count_ptr, K, B, BATCH_MAJOR, MEAN)
    tl.store(out_ptr + position * H + cols, g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logits_lse_tiles_kernel(
    h_ptr,  # (n, H) the supervised rows, gathered, contiguous (TMA)
    w_ptr,  # (V, H) lm_head weight, contiguous (TMA)
    bias_ptr,  # (V,) or a dummy when HAS_BIAS is False
    target_ptr,  # (n,) int64 target class of each row
    part_ptr,  # (3, n, NUM_PN) fp32 out: per (row, vocab tile) max, sum-exp, target logit
    n,
    V,
    H,
    plane,  # n * NUM_PN, NUM_PN = cdiv(V, BN): the stride between the three planes of part_ptr
    NUM_PROGRAMS,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Pass 1 fused: z = h W^T (+ bias) one (BM, BN) tile at a time, never stored; each tile leaves
    its rows' max, sum exp(z - max) and the target logit (0 unless the target is in the tile).

    A persistent GEMM: x and W through TMA descriptors, tiles visited round-robin by NUM_PROGRAMS
    programs in grouped order (GM row tiles share each vocab panel while it is in L2).
    """
    pid = tl.program_id(0)
    num_pm = tl.cdiv(n, BM)
    num_pn = tl.cdiv(V, BN)
    num_tiles = num_pm * num_pn
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[n, H], strides=[H, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[H, 1], block_shape=[BN, BK])
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=True):
        pm, pn = grouped_tile(tile, num_pm, num_pn, GM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(tl.cdiv(H, BK)):
            a = h_desc.load([pm * BM, ki * BK])
            b = w_desc.load([pn * BN, ki * BK])
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        offs_m = pm * BM + tl.arange(0, BM)
        offs_n = pn * BN + tl.arange(0, BN)
        mask_m = offs_m < n
        mask_n = offs_n < V
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        z = tl.where(mask_n[None, :], acc, float("-inf"))  # TMA fills rows past V with zeros
        tile_max = tl.maximum(tl.max(z, 1), FP32_LOWEST)  # a masked tile sums to 0, not NaN
        tile_sum = tl.sum(tl.exp(z - tile_max[:, None]), 1)
        target = tl.load(target_ptr + offs_m, mask=mask_m, other=-1)
        tile_target = tl.sum(tl.where(offs_n[None, :] == target[:, None], acc, 0.0), 1)
        out = part_ptr + offs_m.to(tl.int64) * num_pn + pn
        tl.store(out, tile_max, mask=mask_m)
        tl.store(out + plane, tile_sum, mask=mask_m)
        tl.store(out + 2 * plane, tile_target, mask=mask_m)


@triton.jit
def _combine_lse_tiles_kernel(
    part_ptr,  # (3, n, NUM_PN) fp32 from _logits_lse_tiles_kernel
    position_ptr,  # (n,) int64 flat position r*T + t of each row
    position_max_ptr,  # (R*T,) fp32 out: row max per position
    position_logsum_ptr,  # (R*T,) fp32 out: log sum exp(z - max) per position
    position_nll_ptr,  # (R*T,) fp32 out: nll per position
    n,
    NUM_PN,
    plane,  # n * NUM_PN
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """lse = logsumexp over the vocab tiles' (max, sum-exp) pairs, combined in tile order
    (deterministic); nll = lse - target logit."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n
    row_max = tl.full([BLOCK_R], FP32_LOWEST, dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    row_target = tl.zeros([BLOCK_R], dtype=tl.float32)
    for p0 in range(0, NUM_PN, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_r[:, None] & (offs_p < NUM_PN)[None, :]
        ptrs = part_ptr + offs_r.to(tl.int64)[:, None] * NUM_PN + offs_p[None, :]
        tile_max = tl.load(ptrs, mask=mask, other=FP32_LOWEST)
        tile_sum = tl.load(ptrs + plane, mask=mask, other=0.0)
        row_target += tl.sum(tl.load(ptrs + 2 * plane, mask=mask, other=0.0), 1)
        new_max = tl.maximum(row_max, tl.max(tile_max, 1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tile_sum * tl.exp(tile_max - new_max[:, None]), 1)
        row_max = new_max
    log_sum = tl.log(tl.where(mask_r, row_sum, 1.0))
    position = tl.load(position_ptr + offs_r, mask=mask_r, other=0)
    tl.store(position_max_ptr + position, row_max, mask=mask_r)
    tl.store(position_logsum_ptr + position, log_sum, mask=mask_r)
    tl.store(position_nll_ptr + position, (row_max - row_target) + log_sum, mask=mask_r)


@triton.jit
def _grad_logits_tiles_kernel(
    h_ptr,  # (n, H) the rows of pass 2, gathered, contiguous (TMA)
    w_ptr,  # (V, H) lm_head weight, contiguous (TMA)
    bias_ptr,  # (V,) or a dummy when HAS_BIAS is False
    target_ptr,  # (n,) int64 target class of each row
    position_ptr,  # (n,) int64 flat position r*T + t of each row
    position_max_ptr,  # (R*T,) fp32 row max per position (pass 1)
    position_logsum_ptr,  # (R*T,) fp32 log sum exp(z - max) per position (pass 1)
    grad_ptr,  # () d loss
    weights_ptr,  # (K, B) fp32 weights
    row_count_ptr,  # (R,) int32 supervised positions per row
    g_ptr,  # (n, n_cols) out, row stride stride_g, in the operand dtype: the gradient of vocab columns v_start ..
    n,
    V,
    H,
    v_start,
    n_cols,
    stride_g,
    T, K, B,
    NUM_PROGRAMS,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BATCH_MAJOR: tl.constexpr,
    MEAN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA_STORE: tl.constexpr,
):
    """Pass 2 fused: z = h W^T (+ bias) one (BM, BN) tile at a time, as in pass 1, and straight from
    the accumulator g = c[r] * (exp((z - max) - log-sum) - onehot(target)), stored once in the
    operand dtype: no fp32 logits in memory (the chunked pass 2 writes them, reads them back and
    writes this g). The same persistent TMA GEMM as _logits_lse_tiles_kernel.
    TMA_STORE: g leaves through a tensor descriptor (a (BM, BN) tile staged in shared memory, the
    rows and columns past (n, n_cols) clipped by the copy engine), else through a masked store of a
    tile of pointers (stride_g a multiple of 16 elements either way).
    """
    pid = tl.program_id(0)
    num_pm = tl.cdiv(n, BM)
    num_pn = tl.cdiv(n_cols, BN)
    num_tiles = num_pm * num_pn
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[n, H], strides=[H, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[H, 1], block_shape=[BN, BK])
    if TMA_STORE:
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[n, n_cols], strides=[stride_g, 1], block_shape=[BM, BN])
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=True):
        pm, pn = grouped_tile(tile, num_pm, num_pn, GM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(tl.cdiv(H, BK)):
            a = h_desc.load([pm * BM, ki * BK])
            b = w_desc.load([v_start + pn * BN, ki * BK])
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        offs_m = pm * BM + tl.arange(0, BM)
        cols = pn * BN + tl.arange(0, BN)
        mask_m = offs_m < n
        mask_n = cols < n_cols
        if HAS_BIAS:
            acc += tl.load(bias_ptr + v_start + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        position = tl.load(position_ptr + offs_m, mask=mask_m, other=0)
        row_max = tl.load(position_max_ptr + position, mask=mask_m, other=0.0)
        log_sum = tl.load(position_logsum_ptr + position, mask=mask_m, other=0.0)
        coef = _row_coefficient(position // T, grad_ptr, weights_ptr, row_count_ptr, K, B, BATCH_MAJOR, MEAN)
        target = tl.load(target_ptr + offs_m, mask=mask_m, other=-1) - v_start
        g = _nll_gradient(acc, cols[None, :] == target[:, None], row_max[:, None], log_sum[:, None], coef[:, None])
        if TMA_STORE:
            g_desc.store([pm * BM, pn * BN], g.to(g_ptr.dtype.element_ty))
        else:
            out = g_ptr + offs_m.to(tl.int64)[:, None] * stride_g + cols[None, :]
            tl.store(out, g.to(g_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _mm_fp32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out (fp32, contiguous) = a @ b with fp32 accumulation and output. Without the fp32-output GEMM
    (the CPU, where the Triton kernels only run under the interpreter) the operands are widened:
    a 16-bit output would round the logits, and overflow fp16's range past 65504."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if _mm_out_dtype_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _addmm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out (fp32, contiguous) += a @ b with fp32 accumulation, in one GEMM where cuBLAS can read out
    (beta = 1); else on widened operands, as _mm_fp32_into."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b)
    if _addmm_out_dtype_supported(a.device):
        return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    return out.addmm_(a.float(), b.float())


def _chunk_sizes(n_rows: int, V: int, max_rows: Optional[int] = None,
                 elements: Optional[int] = None) -> tuple[int, int]:
    """(rows, vocab columns) per logits chunk: at most max_rows rows and `elements` logits."""
    rows = max(1, min(n_rows, max_rows or MAX_ROW_CHUNK))
    cols = min(V, max(16, (elements or LOGITS_CHUNK_ELEMENTS) // rows))
    if cols < V:
        cols = max(16, cols // 128 * 128 if cols >= 128 else cols // 16 * 16)
    return rows, cols


def _pass2_chunk_sizes(n_rows: int, V: int,
                       fused_tiles: Optional[tuple[int, int, int]] = None) -> tuple[int, int]:
    """Half pass 1's rows and logits per chunk: pass 2 also holds an operand-dtype copy of the
    logits and the rows' fp32 d hidden, and its GEMMs stay compute-bound (2048 x 4096 chunks with
    the default buffer). Its peak at small vocab (1792 winner rows, H=2048, V=32000, bf16): fp32
    logits 32 MiB + their bf16 copy 16 + d hidden 14 + rows 7 = 69 MiB (Cut Cross-Entropy's
    whole peak there: 0.06 GiB).

    fused_tiles = (BM, BN, SMs) of the fused pass 2, whose buffer is the 16-bit gradient alone:
    where one wave of its tiles, BN * (SMs // row tiles) columns, is at least PASS2_MIN_COLS wide,
    a vocab chunk is at most one wave. That is the case of few rows: hard WTA at captioning (128
    winner rows, V = 156032, bf16, 132 SMs) 128 x 65536 (16 MiB) -> 128 x 16896 (4.1 MiB; peak
    extra 19.4 -> 7.48 MiB, against 1.5x Cut Cross-Entropy's 5.0 MiB). The other regimes' row
    tiles fill a wave with fewer columns than that, and keep the buffer's chunks."""
    rows, cols = _chunk_sizes(n_rows, V, _pass2_row_chunk(n_rows), max(16, LOGITS_CHUNK_ELEMENTS // 2))
    if fused_tiles is not None:
        wave = _one_wave_columns(rows, *fused_tiles)
        if wave is not None:
            cols = min(cols, wave)
    return rows, cols


def _pass2_row_chunk(n_rows: int) -> int:
    """Rows per pass-2 chunk: at most half pass 1's (MAX_ROW_CHUNK)."""
    return max(1, min(n_rows, MAX_ROW_CHUNK // 2))


def _one_wave_columns(rows: int, block_m: int, block_n: int, num_sms: int) -> Optional[int]:
    """The columns of one wave of (block_m, block_n) tiles over `rows` rows, where that is at least
    PASS2_MIN_COLS (few rows: pass 2's vocab chunks are then one wave); else None."""
    wave = block_n * max(1, num_sms // cdiv(rows, block_m))
    return wave if wave >= PASS2_MIN_COLS else None


def _block_v(n_cols: int) -> tuple[int, int]:
    cap = 1024 if triton_interpreting() else 4096
    block = min(cap, next_pow2(max(n_cols, 16)))
    return block, (8 if block >= 2048 else 4)


def _tma_gemm_device(device: torch.device) -> bool:
    """A GPU the fused passes' persistent TMA GEMMs run on: Hopper or later (TMA) with the H100's
    shared memory per block for their tiles (not consumer Blackwell's 99 KB)."""
    return device.type == "cuda" and tma_gemm_capable(device, device_facts(device)[1])


def _tma_operands(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Can the fused passes' persistent TMA GEMMs take these operands here: a device they run on
    (or the interpreter), 16-byte aligned rows of H and a 16-byte aligned, contiguous W."""
    tma = triton_interpreting() or _tma_gemm_device(hidden.device)
    return tma and (hidden.shape[-1] * hidden.element_size()) % 16 == 0 and tma_rows_ok(weight)


PASS1_PATHS = ("auto", "chunked", "fused")


def _pass1_path(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """'chunked' (cuBLAS logits chunks + Triton row kernels) or 'fused' (one persistent Triton GEMM
    whose epilogue folds each logits tile into per-row log-sum-exp partials); env
    LORAMCL_MCL_PASS1 overrides auto. fused needs TMA and the H100's shared memory per block (Hopper,
    not consumer Blackwell; or the interpreter when asked for),
    16-byte aligned rows of H and a 16-byte aligned W (contiguous), and fp32 logits in pass 2.

    auto takes fused for 16-bit operands on Hopper GPUs: benchmarks/bench_mcl_loss.py on an H200 (bf16, hard WTA,
    fwd+bwd) measured 2.26 vs 2.75 ms (captioning), 44.8 vs 46.7 ms (dense LM) and 4.20 vs 4.86 ms
    (small vocab) against chunked (benchmarks/measured/h200-2026-11-27/). Soft weights with the
    one-pass gradient need the logits chunks and stay chunked (the caller decides)."""
    path = os.environ.get("LORAMCL_MCL_PASS1", "auto").lower()
    if path not in PASS1_PATHS:
        raise ValueError(f"LORAMCL_MCL_PASS1 must be one of {PASS1_PATHS}, got '{path}'")
    measured = hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16)
    if path == "chunked" or (path == "auto" and not measured):
        return "chunked"
    # pass 2 recomputes the logits with cuBLAS: its lse must come from logits of the same (fp32)
    # precision, which 16-bit operands only get where mm can write fp32
    same_logits = hidden.dtype == torch.float32 or _mm_out_dtype_supported(hidden.device)
    return "fused" if same_logits and _tma_operands(hidden, weight) else "chunked"


PASS2_PATHS = ("auto", "chunked", "fused")


def _pass2_path(hidden: torch.Tensor, weight: torch.Tensor, lm_head_grads: bool) -> str:
    """'chunked' (cuBLAS fp32 logits chunks, a Triton row kernel forming the gradient, cuBLAS for d
    hidden) or 'fused' (_grad_logits_tiles_kernel forms the gradient in the logits GEMM's epilogue,
    cuBLAS for d hidden); env LORAMCL_MCL_PASS2 overrides auto. fused forms d hidden only (a frozen
    lm_head and bias) and needs what pass 1's fused GEMM needs (TMA, aligned rows). auto follows
    pass 1: fused where pass 1 is.

    The chunked pass 2 writes fp32 logits from its GEMM and a row kernel reads them back and writes
    the 16-bit gradient (6 bytes a logit in a kernel of its own); the fused one writes that gradient
    from the GEMM, and its buffer is a third of the chunked one's. Counted at dense LM (3584 winner
    rows, V = 151936): the row kernel moves 3.3 GB, ~0.8 ms. Measured (benchmarks/sweep_mcl_loss.py,
    H200, bf16, pass 2 alone): chunked 0.810 / 14.94 / 0.905 ms at captioning / dense LM / small
    vocab, fused 0.797 / 15.23 / 0.885 with 128 x 128 tiles and 14.94 / 0.837 with 128 x 256 at the
    last two: the GEMM, not the row kernel's traffic, sets the pace.
    """
    path = os.environ.get("LORAMCL_MCL_PASS2", "auto").lower()
    if path not in PASS2_PATHS:
        raise ValueError(f"LORAMCL_MCL_PASS2 must be one of {PASS2_PATHS}, got '{path}'")
    if lm_head_grads or path == "chunked":
        return "chunked"
    if path == "auto":
        return _pass1_path(hidden, weight)
    return "fused" if _tma_operands(hidden, weight) else "chunked"


SOFT_BACKWARD_PATHS = ("auto", "one_pass", "recompute")


def _soft_backward_path() -> str:
    """How d hidden is formed for soft weights with a frozen lm_head (the forward was asked to keep
    it): 'one_pass' leaves (softmax - onehot) W of every supervised row in pass 1, and the backward
    only scales it by c[r] (4 n H V GEMM FLOPs in all instead of 6: no logits recomputed);
    'recompute' runs pass 2 over every supervised row. Env LORAMCL_MCL_SOFT_BACKWARD; auto picks
    one_pass."""
    path = os.environ.get("LORAMCL_MCL_SOFT_BACKWARD", "auto").lower()
    if path not in SOFT_BACKWARD_PATHS:
        raise ValueError(f"LORAMCL_MCL_SOFT_BACKWARD must be one of {SOFT_BACKWARD_PATHS}, got '{path}'")
    return "recompute" if path == "recompute" else "one_pass"


def _fused_config(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type == "cpu":  # the interpreter: small tiles
        return dict(BM=16, BN=32, BK=32, GM=4, num_warps=4, num_stages=1)
    # benchmarks/sweep_mcl_loss.py on an H200 (2026-11-27, bf16; measured/.../sweep_mcl_pass1.log):
    # 128 x 256 tiles in 3 stages were faster than the 128 x 128 x 4 stages of before in all three
    # regimes (captioning 1.335 vs 1.367 ms, dense LM 28.3 vs 29.6, small vocab 3.22 vs 3.38);
    # shared memory: 48 KB a stage.
    # fp32 tiles are twice the bytes: 128 x 128 in 3 stages.
    if dtype == torch.float32:
        return dict(BM=128, BN=128, BK=64, GM=8, num_warps=8, num_stages=3)
    return dict(BM=128, BN=256, BK=64, GM=8, num_warps=8, num_stages=3)


def _pass2_fused_config(device: torch.device, dtype: torch.dtype, n_rows: int, has_bias: bool) -> dict:
    """Pass 2's fused GEMM over n_rows winner rows: the K-step of pass 1 (BK = 64), g stored
    through a TMA descriptor (PASS2_TMA_STORE), 128 x 256 tiles in 3 stages where they fit the
    case, else 128 x 128 in 4.

    benchmarks/sweep_mcl_loss.py on an H200 (2026-11-27, bf16, no bias; measured/h200-2026-11-27-b/):
    128 x 256 took 14.94 ms at dense LM (3584 rows) and 0.837 at small vocab (1792) against 15.23
    and 0.885 for 128 x 128. Two cases keep 128 x 128: a bias (compiled for sm_90, tests/sm90_compile.py:
    128 x 256 spills 608 bytes a thread, 128 x 128 none at 188 registers), and few rows, where the
    vocab chunks would be one wave of 128 x 256 tiles (_pass2_chunk_sizes): 128 x 128 halves that
    chunk (captioning's 128 rows: 4.1 MiB against 8.3, within its memory target), or lifts the cap
    (5-8 row tiles on 132 SMs), so the wide tiles never run in one-wave chunks."""
    narrow = dict(BM=128, BN=128, BK=64, GM=8, num_warps=8, num_stages=4, TMA_STORE=PASS2_TMA_STORE)
    if device.type == "cpu" or dtype == torch.float32:
        return dict(_fused_config(device, dtype), TMA_STORE=PASS2_TMA_STORE)
    if has_bias or _one_wave_columns(_pass2_row_chunk(n_rows), narrow["BM"], 256, device_facts(device)[0]) is not None:
        return narrow
    return dict(narrow, BN=256, num_stages=3)


def _pass1_fused(h2, positions, targets, w, bias, position_lse, position_nll):
    """lse and nll of the rows at `positions` (targets: theirs) into position_lse / position_nll,
    logits never stored.

    Per row chunk: gather the rows (TMA needs them contiguous), one persistent GEMM that leaves
    (max, sum-exp, target logit) per (row, vocab tile) in `part` (3 x rows x cdiv(V, BN) fp32,
    1/BN of the logits), one kernel combining the tiles in order.
    """
    n_rows, (V, H), device = positions.numel(), w.shape, h2.device
    config = _fused_config(device, h2.dtype)
    block_m, block_n = config["BM"], config["BN"]
    num_pn = cdiv(V, block_n)
    rows_per_chunk = min(n_rows, MAX_ROW_CHUNK)
    part = torch.empty(3 * rows_per_chunk * num_pn, dtype=torch.float32, device=device)
    set_tma_allocator(device)
    num_sms = device_facts(device)[0]
    for r0 in range(0, n_rows, rows_per_chunk):
        pos = positions[r0 : r0 + rows_per_chunk]
        nr = pos.numel()
        rows, tgt = h2.index_select(0, pos), targets[r0 : r0 + rows_per_chunk]
        programs = min(num_sms, cdiv(nr, block_m) * num_pn)
        launch(_logits_lse_tiles_kernel, (programs,),
            rows, w, bias if bias is not None else rows, tgt, part, nr, V, H, nr * num_pn, programs,
            HAS_BIAS=bias is not None, DOT_PRECISION="ieee", **config,
        )
        block_r = 16
        launch(_combine_lse_tiles_kernel, (cdiv(nr, block_r),),
            part, pos, position_lse[0], position_lse[1], position_nll, nr, num_pn, nr * num_pn,
            BLOCK_R=block_r, BLOCK_P=32 if device.type == "cpu" else 128,
        )


def _online_lse_state(nr, device):
    """A fresh online log-sum-exp state for nr rows: running max (fp32's lowest value), sum of
    exp(z - max), target logit (fp32)."""
    return (torch.full((nr,), FP32_LOWEST.value, dtype=torch.float32, device=device),
            torch.zeros(nr, dtype=torch.float32, device=device), torch.zeros(nr, dtype=torch.float32, device=device))


def _supervised_positions(labels, R, T, K, layout, shift_labels, ignore_index, row_count, *, V=None,
                          position_lse=None, position_nll=None, weights=None, capacity=None):
    """Compacts the supervised positions on the device, in row-major order (a stable sort of the
    mask would give the same), with no sort and no host sync.

    -> positions (capacity,) int64 flat positions r*T + t, targets (capacity,) int64 their targets
    (the first n entries of both hold them; the rest is unused) and counts (2,) int64 (n, bad
    labels). Forward (V and the position arrays given): also fills row_count (R,) int32, counts the
    labels outside [0, V) and zeroes position_lse (2, R*T) and position_nll (R*T,). Else row_count
    is the forward's; with weights (K, B) only the rows whose weight is non-zero count (pass 2 of
    hard weights). capacity: at least the active positions, R*T when None (one-hot weights: B*T,
    one row per sequence; at captioning's hard WTA 2 x 125 KB less at the loss's peak).
    """
    device = labels.device
    capacity = R * T if capacity is None else capacity
    positions = torch.empty(capacity, dtype=torch.int64, device=device)
    targets = torch.empty(capacity, dtype=torch.int64, device=device)
    counts = torch.empty(2, dtype=torch.int64, device=device)
    shape_args = (T, K, R // K)
    label_reads = (labels.stride(0), labels.stride(1), ignore_index)  # labels read in place, any strides
    layout_flags = dict(SHARED_LABELS=labels.shape[0] != R, BATCH_MAJOR=layout == "batch_major", SHIFT=shift_labels)
    block_t = min(1024, next_pow2(T))
    forward = position_nll is not None
    row_bad = torch.empty(R, dtype=torch.int32, device=device) if forward else row_count
    if forward:
        launch(_row_counts_kernel, (R,),
            labels, row_count, row_bad, position_lse[0], position_lse[1], position_nll, *shape_args, V, *label_reads,
            **layout_flags, BLOCK_T=block_t,
        )
    launch(_compact_positions_kernel, (R,),
        labels, row_count, row_bad, weights.contiguous() if weights is not None else row_count, positions,
        targets, counts, R, *shape_args, *label_reads,
        **layout_flags, ROW_WEIGHTS=weights is not None, COUNT_BAD=forward,
        BLOCK_R=min(1024, next_pow2(R)), BLOCK_T=block_t,
    )
    return positions, targets, counts


@on_input_device
def _mcl_loss_forward_triton(
    hidden, weight, bias, labels, K, layout, mode, epsilon, temperature, sequence_reduction,
    ignore_index, shift_labels, keep_nll_grad=False,
):
    R, T, H = hidden.shape
    V = weight.shape[0]
    B = R // K
    device = hidden.device
    row_count = torch.empty(R, dtype=torch.int32, device=device)
    # the log-sum-exp of each position as (max, log-sum): zeroed by the kernel below
    position_lse = torch.empty(2, R * T, dtype=torch.float32, device=device)
    position_nll = torch.empty(R * T, dtype=torch.float32, device=device)
    positions, targets, counts = _supervised_positions(
        labels, R, T, K, layout, shift_labels, ignore_index, row_count, V=V,
        position_lse=position_lse, position_nll=position_nll,
    )
    n_rows, n_bad = counts.tolist()  # the forward's one host sync (sizes the cuBLAS GEMMs)
    _raise_bad_labels(n_bad, V, ignore_index)
    KERNEL_STATS.pass1_rows = n_rows

    w, bias = weight.contiguous(), contiguous_or_none(bias)  # the kernels index both flat
    one_pass = keep_nll_grad and _soft_backward_path() == "one_pass"
    nll_grad = hidden.new_empty(n_rows if one_pass else 0, H)
    pass1 = (positions[:n_rows], targets[:n_rows], w, bias, position_lse, position_nll)
    if n_rows and not one_pass and _pass1_path(hidden, w) == "fused":
        _pass1_fused(hidden.reshape(R * T, H), *pass1)
    elif n_rows:
        _pass1_chunked(hidden.reshape(R * T, H), *pass1, nll_grad if one_pass else None)

    nll = torch.empty(K, B, dtype=torch.float32, device=device)
    winners = torch.empty(B, dtype=torch.int64, device=device)
    weights = torch.empty(K, B, dtype=torch.float32, device=device)
    sequence_loss = torch.empty(B, dtype=torch.float32, device=device)
    mode_id = MODES.index(mode)
    launch(_sequence_weights_kernel, (B,),
        position_nll, row_count, nll, winners, weights, sequence_loss, B, K, T,
        float(epsilon) if K > 1 else 0.0,
        _min_temperature(temperature) if mode == "annealed" else 1.0,
        BATCH_MAJOR=layout == "batch_major", MODE=mode_id, MEAN=sequence_reduction == "mean",
        BLOCK_K=next_pow2(K), BLOCK_T=min(1024, next_pow2(T)),
    )
    loss = sequence_loss.mean()
    pass1_rows = torch.tensor(n_rows, dtype=torch.int64)  # CPU: the backward reads it sync-free
    return loss, nll, winners, weights, position_lse, row_count, pass1_rows, nll_grad


def _pass1_chunked(h2, positions, targets, w, bias, position_lse, position_nll, nll_grad=None):
    """Pass 1 over cuBLAS logits chunks: lse and nll of the rows at `positions` (targets: theirs)
    into position_lse / position_nll, folding each (rows, vocab) chunk of fp32 logits into an
    online log-sum-exp.

    With nll_grad (n, H), the one-pass gradient of soft weights: it also leaves nll_grad[i] =
    (softmax(z_i) - onehot(target_i)) W for every row i (d hidden = c[r] * nll_grad, no pass 2).
    Per row chunk, over vocab chunks c with the running max m and sums s (all classes), s' (all
    but the target), online as in flash attention:
        P_c = exp(z_c - m_new) with the target column zeroed   (Triton, operand dtype, written
                                                                over the chunk's own logits)
        u   = exp(m_old - m_new) u + P_c W_c                    (u scaled in place, then cuBLAS
                                                                adds P_c W_c onto it in fp32)
    and at the end nll_grad = (u - s' W_target) / s. Keeping the target out of P and of s' keeps
    p_target - 1 = -s'/s exact when the softmax is peaked (no 1 - p cancellation in 16 bits).
    """
    n_rows, (V, H), device = positions.numel(), w.shape, h2.device
    has_bias, keep_p = bias is not None, nll_grad is not None
    rows_per_chunk, cols_per_chunk = _chunk_sizes(n_rows, V, ONE_PASS_ROW_CHUNK if keep_p else None)
    buffer = torch.empty(rows_per_chunk * cols_per_chunk, dtype=torch.float32, device=device)
    if keep_p:
        u_chunk = torch.empty(rows_per_chunk * H, dtype=torch.float32, device=device)
    block_v, warps = _block_v(cols_per_chunk)
    for r0 in range(0, n_rows, rows_per_chunk):
        pos = positions[r0 : r0 + rows_per_chunk]
        nr = pos.numel()
        rows, tgt = h2.index_select(0, pos), targets[r0 : r0 + rows_per_chunk]
        run_max, run_sum, tgt_logit = _online_lse_state(nr, device)
        if keep_p:
            sum_nt = torch.zeros(nr, dtype=torch.float32, device=device)
            alpha = torch.empty(nr, dtype=torch.float32, device=device)
            u = u_chunk[: nr * H].view(nr, H)
        for v0 in range(0, V, cols_per_chunk):
            nc = min(cols_per_chunk, V - v0)
            logits = buffer[: nr * nc].view(nr, nc)
            w_chunk = w[v0 : v0 + nc]
            _mm_fp32_into(logits, rows, w_chunk.t())
            # P (nr, nc) in the operand dtype over the logits' memory, row stride nc * 4 bytes (cuBLAS
            # reads it with that leading dimension, no copy)
            p = logits.view(h2.dtype)[:, :nc] if keep_p else logits
            launch(_lse_chunk_kernel, (nr,),
                logits, bias if has_bias else logits, tgt, pos, run_max, run_sum, tgt_logit,
                position_lse[0], position_lse[1], position_nll, p, alpha if keep_p else run_max,
                sum_nt if keep_p else run_max,
                nc, v0, nc, p.stride(0), HAS_BIAS=has_bias, IS_LAST=v0 + nc >= V, KEEP_P=keep_p,
                BLOCK_V=block_v, num_warps=warps,
            )
            if not keep_p:
                continue
            if v0 == 0:
                _mm_fp32_into(u, p, w_chunk)
            else:  # u = alpha u + P W_c: rescale in place, then the GEMM adds onto u
                u.mul_(alpha[:, None])
                _addmm_fp32_(u, p, w_chunk)
        if keep_p:
            u.addcmul_(sum_nt[:, None], w.index_select(0, tgt), value=-1.0).div_(run_sum[:, None])
            nll_grad[r0 : r0 + nr] = u


def _pass2_positions(labels, weights, row_count, pass1_rows, R, T, K, layout, ignore_index, shift_labels,
                     hard_weights):
    """-> pass 2's positions and targets (the first n entries of each, as _supervised_positions),
    and n. pass1_rows: () int64 CPU tensor, the n_supervised of pass 1."""
    n_supervised = int(pass1_rows)  # CPU tensor: no device sync
    if not (hard_weights and K > 1):
        # every w > 0 in exact arithmetic: all supervised positions; a row whose w underflowed to
        # 0 gets c[r] = 0
        positions, targets, _ = _supervised_positions(labels, R, T, K, layout, shift_labels, ignore_index, row_count)
        return positions, targets, n_supervised
    positions, targets, counts = _supervised_positions(  # w[:, b] one-hot: B rows at most
        labels, R, T, K, layout, shift_labels, ignore_index, row_count, weights=weights, capacity=(R // K) * T)
    if labels.shape[0] != R:
        # labels (B, T): the K rows of sequence b each have count_b supervised positions, so
        # n_supervised = K * sum_b count_b, and one winner row per sequence (w[:, b] one-hot)
        # leaves sum_b count_b = n_supervised // K active positions
        return positions, targets, n_supervised // K
    # per-row labels (B*K, T): the winners' supervised count is data-dependent, so this case
    # reads it from the device (the backward's only host sync)
    return positions, targets, int(counts[0].item())


@on_input_device
def _mcl_loss_backward_triton(
    grad_loss, hidden, weight, bias, labels, weights, position_lse, row_count, pass1_rows, nll_grad,
    K, layout, sequence_reduction, ignore_index, shift_labels, hard_weights, need_weight_grad,
    need_bias_grad,
):
    R, T, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    weights = weights.contiguous()
    # c[r] = grad * w[k(r), b(r)] / B (/ count[r]): the kernels compute it from these
    coefficient_args = (grad_loss, weights, row_count)
    coefficient_flags = dict(BATCH_MAJOR=layout == "batch_major", MEAN=sequence_reduction == "mean")
    if nll_grad.shape[0] and not (need_weight_grad or need_bias_grad):  # the one-pass backward
        KERNEL_STATS.pass2_rows = 0
        positions = _supervised_positions(labels, R, T, K, layout, shift_labels, ignore_index, row_count)[0]
        grad_h = torch.zeros(R * T, H, dtype=hidden.dtype, device=device)
        _scatter_rows(nll_grad, positions[: nll_grad.shape[0]], grad_h, coefficient_args, coefficient_flags, T, K,
                      R // K)
        return grad_h.view(R, T, H), hidden.new_empty(0), hidden.new_empty(0)
    positions, targets, n_rows = _pass2_positions(
        labels, weights, row_count, pass1_rows, R, T, K, layout, ignore_index, shift_labels, hard_weights,
    )
    KERNEL_STATS.pass2_rows = n_rows

    grad_h = torch.zeros(R * T, H, dtype=hidden.dtype, device=device)
    grad_w = torch.zeros(V, H, dtype=torch.float32, device=device) if need_weight_grad else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=device) if need_bias_grad else None
    if n_rows:
        h2 = hidden.reshape(R * T, H)
        w, bias = weight.contiguous(), contiguous_or_none(bias)  # the kernels index both flat
        has_bias = bias is not None
        lowp = hidden.dtype != torch.float32
        store_fp32 = (not lowp) or need_weight_grad or need_bias_grad
        fused = _pass2_path(hidden, w, need_weight_grad or need_bias_grad) == "fused"
        if fused:
            config = _pass2_fused_config(device, hidden.dtype, n_rows, has_bias)
            set_tma_allocator(device)
            num_sms = device_facts(device)[0]
        rows_per_chunk, cols_per_chunk = _pass2_chunk_sizes(
            n_rows, V, fused_tiles=(config["BM"], config["BN"], num_sms) if fused else None)
        # chunked: fp32 logits (overwritten by the fp32 gradient) and the gradient in the operand
        # dtype; fused: that gradient only
        buffer = None if fused else torch.empty(rows_per_chunk * cols_per_chunk, dtype=torch.float32, device=device)
        # (the fused kernel writes rows 16 elements apart: Triton then knows them aligned for vector stores)
        buffer_lowp = (
            torch.empty(rows_per_chunk * cdiv(cols_per_chunk, 16) * 16, dtype=hidden.dtype, device=device)
            if lowp or fused else None
        )
        dh_chunk = torch.empty(rows_per_chunk * H, dtype=torch.float32, device=device)
        block_v, warps = _block_v(cols_per_chunk)
        for r0 in range(0, n_rows, rows_per_chunk):
            pos = positions[r0 : min(r0 + rows_per_chunk, n_rows)]
            nr = pos.numel()
            rows, tgt = h2.index_select(0, pos), targets[r0 : r0 + nr]
            dh = dh_chunk[: nr * H].view(nr, H)
            for v0 in range(0, V, cols_per_chunk):
                nc = min(cols_per_chunk, V - v0)
                w_chunk = w[v0 : v0 + nc]
                if fused:
                    stride_g = cdiv(nc, 16) * 16
                    grad_lowp = buffer_lowp[: nr * stride_g].view(nr, stride_g)[:, :nc]
                    programs = min(num_sms, cdiv(nr, config["BM"]) * cdiv(nc, config["BN"]))
                    launch(_grad_logits_tiles_kernel, (programs,),
                        rows, w, bias if has_bias else rows, tgt, pos, position_lse[0], position_lse[1],
                        *coefficient_args, grad_lowp, nr, V, H, v0, nc, stride_g, T, K, R // K, programs,
                        HAS_BIAS=has_bias, **coefficient_flags, DOT_PRECISION="ieee", **config,
                    )
                else:
                    logits = buffer[: nr * nc].view(nr, nc)
                    _mm_fp32_into(logits, rows, w_chunk.t())
                    grad_lowp = buffer_lowp[: nr * nc].view(nr, nc) if lowp else logits
                    launch(_grad_logits_chunk_kernel, (nr,),
                        logits, grad_lowp, bias if has_bias else logits, tgt, pos, position_lse[0], position_lse[1],
                        *coefficient_args,
                        nc, v0, nc, T, K, R // K, HAS_BIAS=has_bias, STORE_FP32=store_fp32, STORE_LOWP=lowp,
                        **coefficient_flags, BLOCK_V=block_v, num_warps=warps,
                    )
                # d hidden rows, fp32 accumulation over vocab chunks (fixed order)
                if v0 == 0:
                    _mm_fp32_into(dh, grad_lowp, w_chunk)
                else:
                    _addmm_fp32_(dh, grad_lowp, w_chunk)
                if grad_w is not None:  # fp32 GEMM into the fp32 accumulator
                    grad_w[v0 : v0 + nc].addmm_(logits.t(), rows.float())
                if grad_b is not None:
                    grad_b[v0 : v0 + nc] += logits.sum(0)
            _scatter_rows(dh, pos, grad_h, None, coefficient_flags, T, K, R // K)
    grad_h = grad_h.view(R, T, H)
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else hidden.new_empty(0)
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else hidden.new_empty(0)
    return grad_h, grad_w, grad_b


def _scatter_rows(rows, positions, grad_h, coefficient_args, coefficient_flags, T, K, B):
    """grad_h[positions[i]] = rows[i], times c[r] when coefficient_args (grad, weights, row_count)
    are given (the one-pass backward), rounded once to grad_h's dtype."""
    n, H = rows.shape
    block_h = min(1024, next_pow2(H))
    launch(_scatter_rows_kernel, (n, cdiv(H, block_h)),
        rows, positions, grad_h, *(coefficient_args or (positions,) * 3), H, T, K, B,
        SCALE=coefficient_args is not None, **coefficient_flags, BLOCK_H=block_h,
    )


# ----------------------------------------------------------------------------------------------
# Registered custom ops
# ----------------------------------------------------------------------------------------------

# The implementations per backend, shared by the registered ops and the eager autograd path below.
_FORWARD = {"triton": _mcl_loss_forward_triton, "reference": _mcl_loss_forward_reference}
_BACKWARD = {"triton": _mcl_loss_backward_triton, "reference": _mcl_loss_backward_reference}


@torch.library.custom_op("loramcl::mcl_loss_forward", mutates_args=())
def _mcl_loss_forward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    num_hypotheses: int,
    layout: str,
    mode: str,
    epsilon: float,
    temperature: torch.Tensor,
    sequence_reduction: str,
    ignore_index: int,
    shift_labels: bool,
    keep_nll_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """-> loss (), nll (K,B), winners (B,), weights (K,B), position_lse (2, R*T): (max, log-sum), row_count (R,),
    pass1_rows () int64 on the CPU (number of supervised positions), nll_grad (n, H): with
    keep_nll_grad and the one-pass soft backward, (softmax - onehot) W of pass 1's n supervised
    positions in their compaction order, else (0, H). temperature: a () float64 CPU tensor (a
    tensor, so that a changing temperature does not recompile compiled graphs; reading it is no
    device sync)."""
    return _FORWARD[backend](
        hidden, weight, bias, labels, num_hypotheses, layout, mode, epsilon, float(temperature),
        sequence_reduction, ignore_index, shift_labels, keep_nll_grad,
    )


@_mcl_loss_forward_op.register_fake
def _(hidden, weight, bias, labels, num_hypotheses, layout, mode, epsilon, temperature,
      sequence_reduction, ignore_index, shift_labels, keep_nll_grad, backend):
    R, T, H = hidden.shape
    K = num_hypotheses
    B = R // K
    sdt = _stat_dtype(hidden.dtype)
    # nll_grad has one row per supervised position (data-dependent) when kept
    n_grad_rows = torch.library.get_ctx().new_dynamic_size() if keep_nll_grad else 0
    return (
        hidden.new_empty((), dtype=sdt),
        hidden.new_empty((K, B), dtype=sdt),
        hidden.new_empty((B,), dtype=torch.int64),
        hidden.new_empty((K, B), dtype=sdt),
        hidden.new_empty((2, R * T), dtype=sdt),
        hidden.new_empty((R,), dtype=torch.int32),
        torch.empty((), dtype=torch.int64, device="cpu"),
        hidden.new_empty((n_grad_rows, H)),
    )


@torch.library.custom_op("loramcl::mcl_loss_backward", mutates_args=())
def _mcl_loss_backward_op(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    weights: torch.Tensor,
    position_lse: torch.Tensor,
    row_count: torch.Tensor,
    pass1_rows: torch.Tensor,
    nll_grad: torch.Tensor,
    num_hypotheses: int,
    layout: str,
    sequence_reduction: str,
    ignore_index: int,
    shift_labels: bool,
    hard_weights: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d hidden (R,T,H), d weight (V,H) or (0,), d bias (V,) or (0,).

    pass1_rows: the forward's () int64 CPU tensor; nll_grad: the forward's (n, H) one-pass gradient
    rows, used when it has rows and the lm_head is frozen (else pass 2 recomputes the logits);
    hard_weights: w[:, b] is one-hot (wta, or relaxed with epsilon = 0).
    """
    return _BACKWARD[backend](
        grad_loss, hidden, weight, bias, labels, weights, position_lse, row_count, pass1_rows,
        nll_grad, num_hypotheses, layout, sequence_reduction, ignore_index, shift_labels, hard_weights,
        need_weight_grad, need_bias_grad,
    )


@_mcl_loss_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, labels, weights, position_lse, row_count, pass1_rows, nll_grad,
      num_hypotheses, layout, sequence_reduction, ignore_index, shift_labels, hard_weights,
      need_weight_grad, need_bias_grad, backend):
    grad_w = torch.empty_like(weight) if need_weight_grad else hidden.new_empty(0)
    grad_b = torch.empty_like(bias) if (need_bias_grad and bias is not None) else hidden.new_empty(0)
    return torch.empty_like(hidden), grad_w, grad_b


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, K, layout, mode, epsilon, temperature, sequence_reduction,
     ignore_index, shift_labels, _, backend) = inputs
    _, _, _, weights, position_lse, row_count, pass1_rows, nll_grad = output
    ctx.save_for_backward(hidden, weight, bias, labels, weights, position_lse, row_count, pass1_rows,
                          nll_grad)
    ctx.config = (K, layout, sequence_reduction, ignore_index, shift_labels, _hard_weights(mode, epsilon), backend)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zeros made in backward for those outputs (nll_grad is n x H)


def _backward(ctx, grad_loss, *unused_grads, backward_impl=None):
    if grad_loss is None:  # grads are not materialised: none reached the loss
        return (None,) * len(ctx.needs_input_grad)
    with autocast_off(grad_loss.device):
        return _backward_formula(ctx, grad_loss, backward_impl)


def _backward_formula(ctx, grad_loss, backward_impl=None):
    hidden, weight, bias, labels, weights, position_lse, row_count, pass1_rows, nll_grad = ctx.saved_tensors
    K, layout, sequence_reduction, ignore_index, shift_labels, hard_weights, backend = ctx.config
    need_w = bool(ctx.needs_input_grad[1])
    need_b = bool(bias is not None and ctx.needs_input_grad[2])
    grad_h, grad_w, grad_b = (backward_impl or _mcl_loss_backward_op)(
        grad_loss, hidden, weight, bias, labels, weights, position_lse, row_count, pass1_rows,
        nll_grad, K, layout, sequence_reduction, ignore_index, shift_labels, hard_weights, need_w,
        need_b, backend,
    )
    return (
        grad_h, grad_w if need_w else None, grad_b if need_b else None,
        None, None, None, None, None, None, None, None, None, None, None,
    )


torch.library.register_autograd(
    "loramcl::mcl_loss_forward", _backward, setup_context=_setup_context
)


# Eager path: the same implementations and autograd formula without the dispatcher, whose
# argument handling and generated autograd wrapper cost more host time than the small torch ops
# around the GEMMs. torch.compile traces the registered ops. (The forward(ctx, ...) form is the
# cheaper one on the host; see multi_lora_linear's eager path.)


def _backward_direct(*args):
    """The backward op's body for the eager path: same arguments, the last one names the backend."""
    return _BACKWARD[args[-1]](*args[:-1])


class _MCLLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        output = _FORWARD[inputs[-1]](*inputs[:-1])
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        refuse_double_backward("mcl_loss")
        return _backward(ctx, grad_loss, backward_impl=_backward_direct)


def _run_forward(*inputs):
    """inputs: the forward op's arguments, with the temperature as a number."""
    if tracing():
        # the temperature as a tensor made by a multiplication: a traced float (an annealing
        # schedule's) then stays symbolic instead of recompiling the graph for every value
        temperature = torch.ones((), dtype=torch.float64) * inputs[8]
        return _mcl_loss_forward_op(*inputs[:8], temperature, *inputs[9:])
    hidden, weight, bias = inputs[:3]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _MCLLossFunction.apply(*inputs)
    return _FORWARD[inputs[-1]](*inputs[:-1])



# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _real(value, name: str = "value"):
    """A real number (a Python or numpy number, a one-element tensor) as a float; a float traced by
    torch.compile (SymFloat) stays symbolic. Strings and booleans are refused, not converted."""
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, (str, bytes, bool)) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_config(num_hypotheses, layout, mode, epsilon, temperature, sequence_reduction):
    if (not isinstance(num_hypotheses, numbers.Integral) or isinstance(num_hypotheses, bool)
            or num_hypotheses < 1):
        raise ValueError(f"num_hypotheses must be an int >= 1, got {num_hypotheses!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= _real(epsilon, "epsilon") < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon!r}")
    if mode != "relaxed" and not isinstance(epsilon, torch.SymFloat) and _real(epsilon, "epsilon") != 0.0:
        raise ValueError(f"epsilon={epsilon!r} applies to mode='relaxed' (winner 1 - epsilon), got mode={mode!r}")
    if mode != "annealed" and temperature is not None:  # mode defaults to "wta": no silent WTA
        raise ValueError(f"temperature={temperature!r} applies to mode='annealed' (w = softmax_k(-L / temperature)), "
                         f"got mode={mode!r}")
    _check_temperature(temperature)
    if mode == "annealed" and temperature is None:
        raise ValueError("mode='annealed' needs a temperature > 0")
    if sequence_reduction not in SEQUENCE_REDUCTIONS:
        raise ValueError(f"sequence_reduction must be one of {SEQUENCE_REDUCTIONS}, got {sequence_reduction!r}")


def _check_temperature(temperature) -> None:
    if temperature is not None and not _real(temperature, "temperature") > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index!r}")
    return int(ignore_index)


def _check_labels(labels, R, T, K) -> torch.Tensor:
    """The labels as int64: comparisons with V and ignore_index in a narrower dtype would wrap
    them (uint8 labels: ignore_index=-100 is 156)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dtype == torch.uint64:  # values past 2^63 would wrap to negative labels in int64
        raise TypeError("labels of dtype uint64: use int64")
    if labels.dim() != 2 or labels.shape[1] != T or labels.shape[0] not in (R // K, R):
        raise ValueError(
            f"labels must have shape (B, T) = ({R // K}, {T}) (shared by the hypotheses) or "
            f"(B*K, T) = ({R}, {T}), got {tuple(labels.shape)}"
        )
    return labels if labels.dtype == torch.int64 else labels.to(torch.int64)


def _check_rows(x, name, K):
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B*K, T, {'H' if name == 'hidden' else 'V'}), got {tuple(x.shape)}")
    if x.shape[0] % K != 0 or x.shape[0] == 0:
        raise ValueError(
            f"{name} has {x.shape[0]} rows (B*K), which is not a positive multiple of num_hypotheses={K}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no positions (T = 0): shape {tuple(x.shape)}")


def mcl_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_hypotheses: int,
    lm_head_bias: Optional[torch.Tensor] = None,
    layout: str = "batch_major",
    mode: str = "wta",
    epsilon: float = 0.0,
    temperature: Optional[float] = None,
    sequence_reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = True,
    backend: Optional[str] = None,
) -> MCLLossOutput:
    """MCL loss from the last hidden states and the lm_head, never materialising rows x V logits.

    hidden (B*K, T, H) rows in `layout`; lm_head_weight (V, H); lm_head_bias (V,) or None;
    labels (B, T) shared by the hypotheses or (B*K, T). Returns MCLLossOutput(loss, nll (K,B),
    winners (B,), weights (K,B)); only `loss` is differentiable.
    """
    refuse_functorch_transforms("mcl_loss")
    cast = (autocast_operands(hidden.device, hidden, lm_head_weight, lm_head_bias)
            if isinstance(hidden, torch.Tensor) else None)
    if cast is not None:  # the lm_head GEMM in the autocast dtype
        hidden, lm_head_weight, lm_head_bias = cast
        with autocast_off(hidden.device):
            return mcl_loss(
                hidden, lm_head_weight, labels, num_hypotheses=num_hypotheses, lm_head_bias=lm_head_bias,
                layout=layout, mode=mode, epsilon=epsilon, temperature=temperature,
                sequence_reduction=sequence_reduction, ignore_index=ignore_index, shift_labels=shift_labels,
                backend=backend)
    _check_config(num_hypotheses, layout, mode, epsilon, temperature, sequence_reduction)
    K = int(num_hypotheses)  # a numpy integer included
    if not isinstance(hidden, torch.Tensor) or not isinstance(lm_head_weight, torch.Tensor):
        raise TypeError("hidden and lm_head_weight must be tensors")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be a floating tensor, got {hidden.dtype}")
    _check_rows(hidden, "hidden", K)
    R, T, H = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight must have shape (V, H={H}), got {tuple(lm_head_weight.shape)}")
    if lm_head_weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight dtype {lm_head_weight.dtype} differs from hidden's {hidden.dtype}")
    V = lm_head_weight.shape[0]
    if V == 0:
        raise ValueError("lm_head_weight has no rows (V = 0)")
    if lm_head_bias is not None:
        if not isinstance(lm_head_bias, torch.Tensor):
            raise TypeError(f"lm_head_bias must be a tensor or None, got {type(lm_head_bias).__name__}")
        if lm_head_bias.dim() != 1 or lm_head_bias.shape[0] != V:
            raise ValueError(f"lm_head_bias must have shape (V,) = ({V},), got {tuple(lm_head_bias.shape)}")
        if lm_head_bias.dtype != lm_head_weight.dtype:
            raise TypeError(f"lm_head_bias dtype {lm_head_bias.dtype} differs from lm_head_weight's "
                            f"{lm_head_weight.dtype}")
    labels = _check_labels(labels, R, T, K)
    for name, t in (("lm_head_weight", lm_head_weight), ("labels", labels), ("lm_head_bias", lm_head_bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    chosen = resolve_backend(backend, hidden.device, hidden.dtype)
    if chosen == "triton" and hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        if requested_backend(backend) == "triton":  # asked for by name (argument or LORAMCL_BACKEND)
            raise TypeError(f"the triton backend supports fp16/bf16/fp32, got {hidden.dtype}; "
                            "use backend='reference'")
        chosen = "reference"
    # soft weights (every w > 0) with a frozen lm_head: pass 1 may form d hidden's rows up to the
    # per-row scale, so the backward needs no second pass over the logits
    soft_weights = K == 1 or not _hard_weights(mode, epsilon)
    keep_nll_grad = (soft_weights and torch.is_grad_enabled() and hidden.requires_grad
                     and not lm_head_weight.requires_grad
                     and not (lm_head_bias is not None and lm_head_bias.requires_grad))
    loss, nll, winners, weights = _run_forward(
        hidden, lm_head_weight, lm_head_bias, labels, K, layout, mode, float(epsilon),
        _real(temperature) if temperature is not None else 1.0, sequence_reduction,
        _check_ignore_index(ignore_index), check_flag(shift_labels, "shift_labels"), keep_nll_grad, chosen,
    )[:4]
    return MCLLossOutput(loss, nll.detach(), winners.detach(), weights.detach())


def mcl_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_hypotheses: int,
    layout: str = "batch_major",
    mode: str = "wta",
    epsilon: float = 0.0,
    temperature: Optional[float] = None,
    sequence_reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = True,
) -> MCLLossOutput:
    """The same loss for callers that already hold logits (B*K, T, V); plain PyTorch, autograd.

    Eagerly only the supervised rows are upcast and reduced (one sync to find them); under
    torch.compile a shape-static path reduces every position and masks.
    """
    _check_config(num_hypotheses, layout, mode, epsilon, temperature, sequence_reduction)
    K = int(num_hypotheses)  # a numpy integer included
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating tensor")
    _check_rows(logits, "logits", K)
    R, T, V = logits.shape
    labels = _check_labels(labels, R, T, K)
    ignore_index = _check_ignore_index(ignore_index)
    shift_labels = check_flag(shift_labels, "shift_labels")
    cdt = _stat_dtype(logits.dtype)
    targets = _targets_per_row(labels, R, K, layout, shift_labels, ignore_index).reshape(-1)
    supervised = targets != ignore_index
    flat = logits.reshape(R * T, V)
    if tracing():  # no host read in a graph: a device-side assert on the labels
        torch._assert_async((~supervised | ((targets >= 0) & (targets < V))).all(),
                            f"labels: values outside [0, {V}) that are not ignore_index={ignore_index}")
        safe = torch.where(supervised, targets, 0)
        z = flat.to(cdt)
        nll_all = torch.logsumexp(z, dim=1) - z.gather(1, safe.unsqueeze(1)).squeeze(1)
        nll_pos = torch.where(supervised, nll_all, torch.zeros_like(nll_all))
    else:
        _raise_bad_labels(int(_count_bad_labels(labels, ignore_index, V, shift_labels)), V, ignore_index)
        positions = supervised.nonzero().squeeze(1)
        z = flat.index_select(0, positions).to(cdt)
        nll_sup = torch.logsumexp(z, dim=1) - z.gather(1, targets[positions].unsqueeze(1)).squeeze(1)
        nll_pos = torch.zeros(R * T, dtype=cdt, device=logits.device).scatter(0, positions, nll_sup)
    per_row = nll_pos.view(R, T).sum(1)
    if sequence_reduction == "mean":
        per_row = per_row / supervised.view(R, T).sum(1).clamp(min=1).to(cdt)
    nll = _rows_to_kb(per_row, K, layout)
    winners, weights = _sequence_weights(nll, mode, float(epsilon), temperature)
    loss = (weights * nll).sum(0).mean()
    return MCLLossOutput(loss, nll.detach(), winners, weights)


class MCLLoss(torch.nn.Module):
    """nn.Module around mcl_loss: forward(hidden, lm_head_weight, labels, lm_head_bias=None).

    `temperature` may be changed between steps (annealing schedule); set mode='wta' once it falls
    below the schedule's minimum, as the official recipe does. The temperature is used in mode
    'annealed' only and epsilon in mode 'relaxed' only, so either may stay set when `mode` changes
    (the constructor refuses one its mode would ignore).
    """

    def __init__(
        self,
        num_hypotheses: int,
        *,
        layout: str = "batch_major",
        mode: str = "wta",
        epsilon: float = 0.0,
        temperature: Optional[float] = None,
        sequence_reduction: str = "mean",
        ignore_index: int = -100,
        shift_labels: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        _check_config(num_hypotheses, layout, mode, epsilon, temperature if mode == "annealed" else None,
                      sequence_reduction)
        _check_temperature(temperature)  # used in mode 'annealed' only, checked now
        _check_ignore_index(ignore_index)
        if requested_backend(backend) not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_hypotheses = int(num_hypotheses)
        self.layout = layout
        self.mode = mode
        self.epsilon = epsilon
        self.temperature = temperature
        self.sequence_reduction = sequence_reduction
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.backend = backend

    def forward(self, hidden, lm_head_weight, labels, lm_head_bias=None) -> MCLLossOutput:
        return mcl_loss(
            hidden, lm_head_weight, labels, num_hypotheses=self.num_hypotheses,
            lm_head_bias=lm_head_bias, layout=self.layout, mode=self.mode,
            epsilon=self.epsilon if self.mode == "relaxed" else 0.0,
            temperature=self.temperature if self.mode == "annealed" else None,
            sequence_reduction=self.sequence_reduction,
            ignore_index=self.ignore_index, shift_labels=self.shift_labels, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"num_hypotheses={self.num_hypotheses}, layout={self.layout}, mode={self.mode}, "
                f"epsilon={self.epsilon}, temperature={self.temperature}, "
                f"sequence_reduction={self.sequence_reduction}")
