"""Benchmark of the fused multi-LoRA linear against the baselines of DESIGN.md sections 1 and 3.

    python benchmarks/bench_multi_lora.py [--out results/multi_lora.json] [--quick]
                                          [--cpu-backend reference|triton]

Every implementation computes the same function (DESIGN.md section 2.1, batch-major rows, no
bias, scaling 1, as the official multi-hypothesis path applies no alpha/r scaling):

    y[n] = x[n] W^T + (x[n] A_h^T) B_h^T,   h(n) = n % K,
    x (B*K, T, d_in), W (d_out, d_in) frozen, A (K, r, d_in), B (K, d_out, r).

Implementations (the names are those of the measured anchor rows, shared/anchors/):
  ours-auto / ours-fused / ours-cublas  multi_lora_linear on the Triton backend; the two
                    strategies forced through LORAMCL_MULTI_LORA_PATH, auto leaves it unset.
                    (CPU smoke run: ours-reference, the reference backend.)
  base_only         x W^T alone, one cuBLAS GEMM: the floor every ratio is taken against.
  loop              PEFT-style loop over hypotheses: for each k, on the rows of hypothesis k,
                    base + lora_B_k(lora_A_k(x_k)) * s, outputs stacked back batch-major.
  bmm               one base GEMM + torch.bmm shrink and expand on x viewed (K, B*T, d_in).
  bmm_compiled      torch.compile(bmm), static shapes.
  group_conv        the official layer: two grouped 1x1 convolutions, lora_A weight
                    [K*r, d_in, 1] and lora_B weight [K*d_out, r, 1], both groups=K, on x
                    permuted to channels-first (B, K*d_in, T).

Tables:
  1. forward, backward and forward+backward (W frozen; x, A, B require grad) at the shapes of
     DESIGN.md section 3. Backward is timed on a retained graph (torch.autograd.grad with
     retain_graph=True, so no .grad accumulation); where an implementation refuses to retain
     its graph (torch.compile with donated buffers) backward = (fwd+bwd) - fwd, and the row
     says so in `bwd_method`.
  2. shared input, fwd+bwd: x holds B*T rows seen by every hypothesis (output B*K rows);
     ours with shared_input=True vs bmm on the repeated input vs base computed once in torch.
  3. decode, forward only under no_grad: 8 sequences per hypothesis, one token each, x (8*K, 1, d).
Before timing, each implementation's output (and gradients, where it has a backward) is
compared once per shape against multi_lora_linear(backend='reference'); a mismatch or an error
is recorded in the row and makes the script exit 1 after it wrote the JSON.
Targets (DESIGN.md section 4) are ratios measured in the same run: fwd+bwd <= 1.10x base_only,
shared input <= 0.40x bmm on the repeated input, decode <= 1.3x base_only.

Without a GPU the same tables run as a small, labelled CPU smoke run (fp32, tiny shapes, the
reference backend, torch.compile skipped; --cpu-backend triton adds the Triton backend's fused and
cublas paths under the interpreter); its times say nothing about the kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

if not common.HAS_CUDA:
    # Without a GPU, Triton kernels run only under the interpreter, which must be on before the
    # kernel module is imported (used by --cpu-backend triton; the reference path ignores it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loramcl_kernels.ops.multi_lora_linear import multi_lora_linear  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH_ENV = "LORAMCL_MULTI_LORA_PATH"

TARGET_FWDBWD_VS_BASE = 1.10
TARGET_SHARED_VS_REPEAT = 0.40
TARGET_DECODE_VS_BASE = 1.30

# (K, B, T, r): K hypotheses, B sequences of T tokens per hypothesis, rank r.
GPU_CASES = [(5, 1, 780, 8), (4, 1, 2048, 16), (8, 1, 1024, 8), (4, 1, 2048, 64)]
GPU_D_IN, GPU_D_OUT, GPU_DTYPE = 4096, 4096, torch.bfloat16
# CPU smoke: d_in != d_out and B = 2 in one case, so that wrong plumbing cannot pass unnoticed.
CPU_CASES = [(3, 1, 5, 4), (2, 2, 8, 8)]
CPU_D_IN, CPU_D_OUT, CPU_DTYPE = 64, 48, torch.float32
DECODE_SEQS = 8  # decode: sequences per hypothesis, one new token each

# max |value - reference| / max |reference| allowed when checking that rows compute the same thing
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------------------------
# Baselines. x: (B*K, T, d_in) batch-major (row b*K + k is hypothesis k); A (K, r, d_in);
# Bm (K, d_out, r); W (d_out, d_in). All return (B*K, T, d_out).
# ----------------------------------------------------------------------------------------------
def base_only(x, W):
    return F.linear(x, W)


def loop_peft(x, W, A, Bm, scaling=1.0):
    """PEFT-style: one full LoRA linear per hypothesis on its rows x[:, k]."""
    K = A.shape[0]
    x4 = x.view(x.shape[0] // K, K, *x.shape[1:])  # (B, K, T, d_in)
    outs = [F.linear(x4[:, k], W) + F.linear(F.linear(x4[:, k], A[k]), Bm[k]) * scaling for k in range(K)]
    y = torch.stack(outs, dim=1)  # (B, K, T, d_out)
    return y.reshape(x.shape[0], *y.shape[2:])


def bmm_lora(x, W, A, Bm):
    """Base GEMM over all rows + batched shrink/expand on x viewed hypothesis-major (K, B*T, d_in)."""
    K = A.shape[0]
    Bsz, T, d_in = x.shape[0] // K, x.shape[1], x.shape[2]
    xk = x.view(Bsz, K, T, d_in).transpose(0, 1).reshape(K, Bsz * T, d_in)  # a view when B == 1
    lora = torch.bmm(torch.bmm(xk, A.transpose(1, 2)), Bm.transpose(1, 2))  # (K, B*T, d_out)
    lora = lora.view(K, Bsz, T, -1).transpose(0, 1).reshape(Bsz * K, T, -1)
    return F.linear(x, W) + lora


def group_conv_lora(x, W, A, Bm):
    """The official layer: grouped 1x1 convs on channels-first (B, K*d_in, T), groups = K.

    Conv channel k*r + j of lora_A reads channels [k*d_in, (k+1)*d_in) = hypothesis k's features
    with weight A[k, j]; channel k*d_out + o of lora_B reads the r shrink channels of hypothesis k
    with weight Bm[k, o]. So lora_A.weight = A.reshape(K*r, d_in, 1), lora_B.weight =
    Bm.reshape(K*d_out, r, 1), and the result equals the bmm form.
    """
    K, r, d_in = A.shape
    d_out = Bm.shape[1]
    Bsz, T = x.shape[0] // K, x.shape[1]
    xc = x.view(Bsz, K, T, d_in).permute(0, 1, 3, 2).reshape(Bsz, K * d_in, T)
    h = F.conv1d(xc, A.reshape(K * r, d_in, 1), groups=K)  # (B, K*r, T)
    lora = F.conv1d(h, Bm.reshape(K * d_out, r, 1), groups=K)  # (B, K*d_out, T)
    lora = lora.view(Bsz, K, d_out, T).permute(0, 1, 3, 2).reshape(Bsz * K, T, d_out)
    return F.linear(x, W) + lora


def shared_repeat_bmm(xs, W, A, Bm):
    """Shared input the official way: repeat xs (B, T, d_in) to batch-major (B*K, T, d_in), then bmm."""
    K = A.shape[0]
    xr = xs.unsqueeze(1).expand(xs.shape[0], K, *xs.shape[1:]).reshape(xs.shape[0] * K, *xs.shape[1:])
    return bmm_lora(xr, W, A, Bm)


def shared_once_torch(xs, W, A, Bm):
    """Shared input with the base GEMM and the shrink done once on the B*T distinct rows."""
    K, r, d_in = A.shape
    Bsz, T = xs.shape[0], xs.shape[1]
    base = F.linear(xs, W)  # (B, T, d_out)
    s = F.linear(xs, A.reshape(K * r, d_in))  # (B, T, K*r)
    s = s.view(Bsz, T, K, r).permute(2, 0, 1, 3).reshape(K, Bsz * T, r)
    lora = torch.bmm(s, Bm.transpose(1, 2)).view(K, Bsz, T, -1).transpose(0, 1)  # (B, K, T, d_out)
    return (lora + base.unsqueeze(1)).reshape(Bsz * K, T, -1)


_compiled_bmm = None


def compiled_bmm_lora(x, W, A, Bm):
    global _compiled_bmm
    if _compiled_bmm is None:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one recompilation per shape
            if hasattr(cfg, name):
                setattr(cfg, name, max(64, getattr(cfg, name)))
        _compiled_bmm = torch.compile(bmm_lora, dynamic=False)
    return _compiled_bmm(x, W, A, Bm)


# ----------------------------------------------------------------------------------------------
# Implementations as rows
# ----------------------------------------------------------------------------------------------
class Impl:
    """One row of a table: fn(x, W, A, Bm) -> y, which inputs get gradients, the env it runs in."""

    def __init__(self, name, fn, *, lora_grads=True, path_env=None, skip=None, ours=False, checked=True):
        self.name, self.fn, self.lora_grads, self.path_env = name, fn, lora_grads, path_env
        self.skip, self.ours = skip, ours
        self.checked = checked  # False for the base GEMM alone: it computes a different function

    def context(self):
        return common.env_var(PATH_ENV, self.path_env) if self.ours else contextlib.nullcontext()


def ours_impls(mode, *, shared_input=False, decode=False):
    """Our op's rows. mode 'gpu': auto, and the Triton backend forced onto each path;
    'reference' (CPU smoke run): the reference backend; 'triton' (CPU smoke run, interpreter):
    the reference backend and the Triton backend forced onto each path. decode: also the
    one-kernel decode path."""
    fused_and_cublas = [("ours-fused", "triton", "fused"), ("ours-cublas", "triton", "cublas")]
    if decode:
        fused_and_cublas.append(("ours-decode", "triton", "decode"))
    variants = {"gpu": [("ours-auto", None, None), *fused_and_cublas],
                "reference": [("ours-reference", "reference", None)],
                "triton": [("ours-reference", "reference", None), *fused_and_cublas]}[mode]
    impls = []
    for name, backend, path in variants:
        def fn(x, W, A, Bm, _backend=backend):
            return multi_lora_linear(x, W, None, A, Bm, 1.0, shared_input=shared_input, backend=_backend)

        impls.append(Impl(name, fn, path_env=path, ours=True))
    return impls


def reference(x, W, A, Bm, *, shared_input=False):
    return multi_lora_linear(x, W, None, A, Bm, 1.0, shared_input=shared_input, backend="reference")


# ----------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------
def rel_err(value, ref):
    value, ref = value.detach().double(), ref.detach().double()
    if value.shape != ref.shape:
        if value.numel() != ref.numel():
            return math.inf
        ref = ref.reshape(value.shape)
    if not torch.isfinite(value).all():
        return math.inf
    return ((value - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_against(outputs, refs, dtype):
    """(matched, worst relative error) of outputs (y, grads...) against the reference's."""
    worst = max(rel_err(v, r) for v, r in zip(outputs, refs))
    return worst <= REL_TOL[dtype], worst


# keep_no_graph: no autograd graph over x, A, B may outlive its step. A graph kept alive (here once
# the reference output's) keeps the leaves' AccumulateGrad nodes made on the default stream, and
# torch warns that a backward captured on a side stream then syncs with the default stream and
# can break the CUDA-graph capture: the suspected cause of the failed captures at the first
# training shape (benchmarks/NOTES.md), where torch printed that warning.


def grad_inputs(impl, x, A, Bm):
    return [x, A, Bm] if impl.lora_grads else [x]


def release():
    gc.collect()
    if common.HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def make_params(K, r, d_in, d_out, dtype, device):
    """W frozen; A and B random (not the zero-init B of training, so the LoRA term is checked)."""
    W = (torch.randn(d_out, d_in, device=device) / math.sqrt(d_in)).to(dtype)
    A = (torch.randn(K, r, d_in, device=device) / math.sqrt(d_in)).to(dtype).requires_grad_()
    Bm = (torch.randn(K, d_out, r, device=device) / math.sqrt(r)).to(dtype).requires_grad_()
    return W, A, Bm


def shape_fields(K, Bsz, T, r, d_in, d_out):
    return {"K": K, "B": Bsz, "T": T, "N": Bsz * T, "r": r, "d_in": d_in, "d_out": d_out}


def error_text(exc):
    return common.error_chain(exc)[:300]


# ----------------------------------------------------------------------------------------------
# Table 1: forward, backward, forward+backward, x distinct per hypothesis
# ----------------------------------------------------------------------------------------------
def bench_training(case, d_in, d_out, dtype, device, impls, timing):
    K, Bsz, T, r = case
    torch.manual_seed(0)
    W, A, Bm = make_params(K, r, d_in, d_out, dtype, device)
    x = torch.randn(Bsz * K, T, d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(Bsz * K, T, d_out, device=device, dtype=dtype)
    ref_y = reference(x, W, A, Bm)
    ref_grads = torch.autograd.grad(ref_y, [x, A, Bm], dy)
    ref_y = ref_y.detach()  # frees its graph: see keep_no_graph
    fields = shape_fields(K, Bsz, T, r, d_in, d_out)
    flops_fwdbwd = 4.0 * Bsz * K * T * d_in * d_out  # the two base GEMMs: y = x W^T, dx = dy W
    rows = []
    for impl in impls:
        base = {**fields, "impl": impl.name}
        if impl.skip:
            rows += [{**base, "what": what, "skipped": impl.skip}
                     for what in ("multilora_fwd", "multilora_bwd", "multilora_fwdbwd")]
            continue
        inputs = grad_inputs(impl, x, A, Bm)
        f = lambda: impl.fn(x, W, A, Bm)  # noqa: E731
        try:
            with impl.context():
                # First run: compiles/autotunes and checks the function against the reference.
                y = f()
                grads = torch.autograd.grad(y, inputs, dy)
                checked = {}
                if impl.checked:
                    matched, err = check_against([y, *grads], [ref_y, *ref_grads], dtype)
                    checked = {"matched": matched, "max_rel_err": err}
                del y, grads
                fwd_ms = common.time_ms(f, **timing)
                fwdbwd = lambda: torch.autograd.grad(f(), inputs, dy)  # noqa: E731
                fwdbwd_ms = common.time_ms(fwdbwd, **timing)
                try:
                    y_kept = f()
                    bwd = lambda: torch.autograd.grad(y_kept, inputs, dy, retain_graph=True)  # noqa: E731
                    bwd()
                    bwd_ms, bwd_method = common.time_ms(bwd, **timing), "retain_graph"
                except RuntimeError:
                    bwd_ms, bwd_method = fwdbwd_ms - fwd_ms, "fwdbwd_minus_fwd"
                y_kept = bwd = None
                peak = common.peak_extra_gib(fwdbwd)
                fwdbwd_host_us = common.host_us(fwdbwd)
                try:  # GPU time without the host: the whole fwd+bwd replayed from a CUDA graph
                    fwdbwd_graph_ms = common.time_graph_us(fwdbwd) / 1e3
                except Exception as exc:  # noqa: BLE001 - an implementation that cannot be captured
                    fwdbwd_graph_ms = math.nan
                    print(f"{impl.name}: fwd+bwd not captured in a CUDA graph: {error_text(exc)}")
        except Exception as exc:  # noqa: BLE001 - record and go on with the other rows
            rows += [{**base, "what": what, "error": error_text(exc), "ms": math.nan}
                     for what in ("multilora_fwd", "multilora_bwd", "multilora_fwdbwd")]
            continue
        finally:
            release()
        rows.append({**base, "what": "multilora_fwd", "ms": fwd_ms, **checked})
        rows.append({**base, "what": "multilora_bwd", "ms": bwd_ms, "bwd_method": bwd_method, **checked})
        rows.append({**base, "what": "multilora_fwdbwd", "ms": fwdbwd_ms, "peak_gib": peak,
                     "host_us": fwdbwd_host_us, "graph_ms": fwdbwd_graph_ms,
                     "base_tflops_equiv": flops_fwdbwd / (fwdbwd_ms * 1e-3) / 1e12, **checked})
    del x, dy, ref_y, ref_grads, W, A, Bm
    release()
    add_ratios(rows, "base_only", "ratio_to_base")
    add_ratios(rows, "base_only", "graph_ratio_to_base", key="graph_ms")
    for row in rows:
        if row["what"] == "multilora_fwdbwd" and row["impl"].startswith("ours"):
            set_target(row, row.get("ratio_to_base"), row.get("graph_ratio_to_base"), TARGET_FWDBWD_VS_BASE,
                       "fwd+bwd <= 1.10x base_only")
    return rows


# ----------------------------------------------------------------------------------------------
# Table 2: shared input, forward+backward
# ----------------------------------------------------------------------------------------------
def bench_shared(case, d_in, d_out, dtype, device, ours_mode, timing):
    K, Bsz, T, r = case
    torch.manual_seed(1)
    W, A, Bm = make_params(K, r, d_in, d_out, dtype, device)
    xs = torch.randn(Bsz, T, d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(Bsz * K, T, d_out, device=device, dtype=dtype)
    dy_base = dy[:Bsz]  # base_once produces B rows only
    ref_y = reference(xs, W, A, Bm, shared_input=True)
    ref_grads = torch.autograd.grad(ref_y, [xs, A, Bm], dy)
    ref_y = ref_y.detach()  # frees its graph: see keep_no_graph
    impls = [Impl("base_once", lambda x, W, A, Bm: base_only(x, W), lora_grads=False, checked=False),
             Impl("shared_repeat", shared_repeat_bmm), Impl("shared_once", shared_once_torch),
             *ours_impls(ours_mode, shared_input=True)]
    fields = shape_fields(K, Bsz, T, r, d_in, d_out)
    rows = []
    for impl in impls:
        row = {**fields, "what": "multilora_shared_fwdbwd", "impl": impl.name}
        if impl.skip:
            rows.append({**row, "skipped": impl.skip})
            continue
        inputs = grad_inputs(impl, xs, A, Bm)
        grad_out = dy if impl.lora_grads else dy_base
        f = lambda: impl.fn(xs, W, A, Bm)  # noqa: E731
        try:
            with impl.context():
                y = f()
                grads = torch.autograd.grad(y, inputs, grad_out)
                if impl.checked:
                    row["matched"], row["max_rel_err"] = check_against([y, *grads], [ref_y, *ref_grads], dtype)
                del y, grads
                fwdbwd = lambda: torch.autograd.grad(f(), inputs, grad_out)  # noqa: E731
                row["ms"] = common.time_ms(fwdbwd, **timing)
                row["host_us"] = common.host_us(fwdbwd)
                if ON_GPU:  # GPU time alone: the same fwd+bwd replayed from a CUDA graph
                    try:
                        row["graph_ms"] = common.time_graph_us(fwdbwd) / 1e3
                    except Exception as exc:  # noqa: BLE001 - an implementation that cannot be captured
                        print(f"{impl.name}: shared fwd+bwd not captured in a CUDA graph: {error_text(exc)}")
        except Exception as exc:  # noqa: BLE001
            row.update(error=error_text(exc), ms=math.nan)
        finally:
            release()
        rows.append(row)
    del xs, dy, dy_base, ref_y, ref_grads, W, A, Bm
    release()
    add_ratios(rows, "shared_repeat", "ratio_to_repeat")
    add_ratios(rows, "shared_repeat", "graph_ratio_to_repeat", key="graph_ms")
    for row in rows:
        if row["impl"].startswith("ours"):
            set_target(row, row.get("ratio_to_repeat"), row.get("graph_ratio_to_repeat"), TARGET_SHARED_VS_REPEAT,
                       "<= 0.40x shared_repeat")
    return rows


# ----------------------------------------------------------------------------------------------
# Table 3: decode, forward only
# ----------------------------------------------------------------------------------------------
DECODE_GRAPH_LAYERS = 4


def decode_layers(W, A, Bm):
    """DECODE_GRAPH_LAYERS copies of a layer's weights, run one after the other in the CUDA graph:
    4 x 32 MiB of W at d = 4096 outgrow the H200's 50 MB L2, so each call reads its W from HBM, as
    consecutive layers of a decoding step do (replaying one W would find it in L2)."""
    return [(W, A, Bm)] + [(W.clone(), A.clone(), Bm.clone()) for _ in range(DECODE_GRAPH_LAYERS - 1)]


def bench_decode(case, d_in, d_out, dtype, device, ours_mode, timing):
    K, _, _, r = case
    Bsz, T = DECODE_SEQS, 1
    torch.manual_seed(2)
    W, A, Bm = make_params(K, r, d_in, d_out, dtype, device)
    A, Bm = A.detach(), Bm.detach()
    x = torch.randn(Bsz * K, T, d_in, device=device, dtype=dtype)
    impls = [Impl("base_only", lambda x, W, A, Bm: base_only(x, W), checked=False), Impl("bmm", bmm_lora),
             Impl("loop", loop_peft), *ours_impls(ours_mode, decode=True)]
    fields = shape_fields(K, Bsz, T, r, d_in, d_out)
    rows = []
    with torch.no_grad():
        ref_y = reference(x, W, A, Bm)
        for impl in impls:
            row = {**fields, "what": "multilora_decode_fwd", "impl": impl.name}
            if impl.skip:
                rows.append({**row, "skipped": impl.skip})
                continue
            f = lambda: impl.fn(x, W, A, Bm)  # noqa: E731
            try:
                with impl.context():
                    y = f()
                    if impl.checked:
                        row["matched"], row["max_rel_err"] = check_against([y], [ref_y], dtype)
                    del y
                    row["us"] = common.time_ms(f, **timing) * 1e3
                    if ON_GPU:  # GPU time alone: the call captured in a CUDA graph, see decode_layers
                        try:
                            layers = decode_layers(W, A, Bm)
                            row["us_graph"] = common.time_graph_us(
                                lambda: [impl.fn(x, *weights) for weights in layers]) / len(layers)
                        except Exception as exc:  # noqa: BLE001 - an implementation that cannot be captured
                            print(f"{impl.name}: decode forward not captured in a CUDA graph: {error_text(exc)}")
            except Exception as exc:  # noqa: BLE001
                row.update(error=error_text(exc), us=math.nan)
            finally:
                release()
            rows.append(row)
    del x, ref_y, W, A, Bm
    release()
    add_ratios(rows, "base_only", "ratio_to_base", key="us")
    add_ratios(rows, "base_only", "ratio_graph_to_base", key="us_graph")
    for row in rows:
        if row["impl"].startswith("ours"):
            set_target(row, row.get("ratio_to_base"), row.get("ratio_graph_to_base"), TARGET_DECODE_VS_BASE,
                       "<= 1.3x base_only")
    return rows


# ----------------------------------------------------------------------------------------------
# Ratios, targets, tables
# ----------------------------------------------------------------------------------------------
ON_GPU = common.HAS_CUDA


def add_ratios(rows, baseline_impl, field, key="ms"):
    """row[field] = row[key] / (the baseline's row[key] for the same `what`)."""
    base = {row["what"]: row.get(key) for row in rows if row["impl"] == baseline_impl}
    for row in rows:
        b, v = base.get(row["what"]), row.get(key)
        if b is not None and v is not None and math.isfinite(b) and math.isfinite(v) and b > 0:
            row[field] = v / b


def _status(ratio, target):
    if ratio is None or not math.isfinite(ratio) or not ON_GPU:  # CPU smoke timings say nothing of the GPU
        return None
    return "PASS" if ratio <= target else "MISS"


def set_target(row, eager_ratio, graph_ratio, target, text):
    """status: the eager ratio against the target (host time included), graph_status: the ratio of
    the calls replayed from a CUDA graph (GPU time alone, how the README judges the targets)."""
    row["target"] = text
    row["status"] = "ERROR" if "error" in row else _status(eager_ratio, target)
    row["graph_status"] = None if "error" in row else _status(graph_ratio, target)


def fmt(value, spec=".3f"):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else format(value, spec)
    return str(value)


def status_cell(row):
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "ERROR"
    if "target" not in row:
        return "-"
    if not ON_GPU:
        return "n/a (CPU)"
    return f"{row.get('status') or '-'} / {row.get('graph_status') or '-'}"


def check_cell(row):
    if "skipped" in row:
        return row["skipped"]
    if "error" in row:
        return row["error"]
    if "matched" not in row:
        return "-"
    return ("ok" if row["matched"] else "MISMATCH") + f" ({row['max_rel_err']:.1e})"


def print_tables(train_rows, shared_rows, decode_rows, card, dtype_name):
    by = {}
    for row in train_rows:
        by.setdefault((row["K"], row["B"], row["T"], row["r"], row["impl"]), {})[row["what"]] = row
    table = []
    for (K, Bsz, T, r, impl), rs in by.items():
        fb = rs["multilora_fwdbwd"]
        table.append([K, f"{Bsz}x{T}", r, impl, fmt(rs["multilora_fwd"].get("ms")),
                      fmt(rs["multilora_bwd"].get("ms")) + ("*" if rs["multilora_bwd"].get("bwd_method") ==
                                                            "fwdbwd_minus_fwd" else ""),
                      fmt(fb.get("ms")), fmt(fb.get("ratio_to_base"), ".2f"), fmt(fb.get("peak_gib")),
                      fmt(fb.get("host_us"), ".0f"), fmt(fb.get("graph_ms")), fmt(fb.get("graph_ratio_to_base"), ".2f"),
                      status_cell(fb), check_cell(fb)])
    common.print_table(
        f"Multi-LoRA linear, forward / backward / fwd+bwd in ms, {dtype_name}, on {card}",
        ["K", "B x T", "r", "impl", "fwd", "bwd", "fwd+bwd", "fwd+bwd / base_only", "peak GiB",
         "host us / fwd+bwd", "fwd+bwd (CUDA graph)", "graph / base_only",
         f"target <= {TARGET_FWDBWD_VS_BASE:.2f}x (eager / graph)", "check vs reference"], table)
    print("bwd: timed on a retained graph (autograd.grad, retain_graph=True); * = (fwd+bwd) - fwd "
          "where the graph cannot be retained. host us: time to enqueue one fwd+bwd; when it exceeds "
          "the fwd+bwd time the host is the bottleneck. CUDA graph: the same fwd+bwd replayed without the host.")
    table = [[r_["K"], f"{r_['B']}x{r_['T']}", r_["r"], r_["impl"], fmt(r_.get("ms")),
              fmt(r_.get("ratio_to_repeat"), ".2f"), fmt(r_.get("host_us"), ".0f"), fmt(r_.get("graph_ms")),
              fmt(r_.get("graph_ratio_to_repeat"), ".2f"), status_cell(r_), check_cell(r_)] for r_ in shared_rows]
    common.print_table(
        f"Shared input, fwd+bwd in ms, {dtype_name}, on {card}",
        ["K", "B x T (distinct rows)", "r", "impl", "fwd+bwd", "/ shared_repeat", "host us / fwd+bwd",
         "fwd+bwd (CUDA graph)", "graph / shared_repeat", f"target <= {TARGET_SHARED_VS_REPEAT:.2f}x (eager / graph)",
         "check vs reference"], table)
    table = [[r_["K"], f"{r_['B']}x{r_['T']}", r_["r"], r_["impl"], fmt(r_.get("us"), ".1f"),
              fmt(r_.get("ratio_to_base"), ".2f"), fmt(r_.get("us_graph"), ".1f"),
              fmt(r_.get("ratio_graph_to_base"), ".2f"), status_cell(r_), check_cell(r_)] for r_ in decode_rows]
    common.print_table(
        f"Decode, forward in us ({DECODE_SEQS} sequences x 1 token per hypothesis), {dtype_name}, on {card}",
        ["K", "B x T", "r", "impl", "fwd us (eager)", "/ base_only",
         f"fwd us (CUDA graph, {DECODE_GRAPH_LAYERS} layers' W in turn)", "/ base_only",
         f"target <= {TARGET_DECODE_VS_BASE:.1f}x (eager / graph)", "check vs reference"], table)


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "multi_lora.json"))
    parser.add_argument("--quick", action="store_true", help="half the warmup and repetition time")
    parser.add_argument("--cpu-backend", choices=("reference", "triton"), default="reference",
                        help="without a GPU: our rows on the reference backend, or also on the Triton "
                             "backend's fused and cublas paths under the interpreter (slower)")
    args = parser.parse_args(argv)
    ours_mode = "gpu" if ON_GPU else args.cpu_backend

    start = time.perf_counter()
    card = common.device_name()
    if ON_GPU:
        device, dtype, cases, d_in, d_out = torch.device("cuda"), GPU_DTYPE, GPU_CASES, GPU_D_IN, GPU_D_OUT
        timing = {"warmup_ms": 10, "rep_ms": 50}
        compile_skip = None
    else:
        ours_text = "reference backend" + (", Triton interpreter" if ours_mode == "triton" else "")
        print("No GPU present: running a small, labelled CPU smoke run of the same tables "
              f"({ours_text}, fp32, d_in={CPU_D_IN}, d_out={CPU_D_OUT}, tiny shapes). "
              "Its times say nothing about the kernels; GPU figures are unmeasured.")
        device, dtype, cases, d_in, d_out = torch.device("cpu"), CPU_DTYPE, CPU_CASES, CPU_D_IN, CPU_D_OUT
        timing = {"warmup_ms": 10, "rep_ms": 50, "cpu_reps": 3}
        compile_skip = "skipped on CPU (smoke run)"
        torch.set_num_threads(1)  # the CPU is shared: one thread keeps the smoke run's times steady
    if args.quick:
        timing["warmup_ms"] /= 2
        timing["rep_ms"] /= 2
    dtype_name = str(dtype).replace("torch.", "")

    # training with LoRA dropout (the official configs use 0.1): fused in our kernels, or the usual
    # unfused form (dropout(x) materialised, base GEMM, LoRA delta, add); masks differ from the
    # reference's, so these rows are not checked against it
    ours_backend = "reference" if ours_mode == "reference" else None
    dropout_impls = [
        Impl("dropout0.1-ours", lambda x, W, A, Bm: multi_lora_linear(
            x, W, None, A, Bm, 1.0, lora_dropout=0.1, backend=ours_backend), checked=False),
        Impl("dropout0.1-unfused", lambda x, W, A, Bm: base_only(x, W) + multi_lora_linear(
            torch.nn.functional.dropout(x, 0.1), None, None, A, Bm, 1.0, backend=ours_backend), checked=False),
    ]
    train_impls = [*ours_impls(ours_mode), *dropout_impls,
                   Impl("base_only", lambda x, W, A, Bm: base_only(x, W), lora_grads=False, checked=False),
                   Impl("loop", loop_peft), Impl("bmm", bmm_lora),
                   Impl("bmm_compiled", compiled_bmm_lora, skip=compile_skip),
                   Impl("group_conv", group_conv_lora)]
    meta = {**common.run_meta(), "dtype": dtype_name, "smoke_run": not ON_GPU, "quick": args.quick,
            "ours_mode": ours_mode, "timing": timing,
            "bwd_timing": "retain_graph, else fwdbwd_minus_fwd (per row)", "rel_tol": REL_TOL[dtype],
            "targets": {"fwdbwd_vs_base_only": TARGET_FWDBWD_VS_BASE,
                        "shared_vs_shared_repeat": TARGET_SHARED_VS_REPEAT,
                        "decode_vs_base_only": TARGET_DECODE_VS_BASE}}
    train_rows, shared_rows, decode_rows = [], [], []
    # `timeout` stops a run with SIGTERM: end through the finally below, which prints the tables
    # and writes the rows measured so far (the JSON is also written after every case)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    finished = False
    try:
        for table, bench in ((train_rows, lambda c: bench_training(c, d_in, d_out, dtype, device, train_impls, timing)),
                             (shared_rows, lambda c: bench_shared(c, d_in, d_out, dtype, device, ours_mode, timing)),
                             (decode_rows, lambda c: bench_decode(c, d_in, d_out, dtype, device, ours_mode, timing))):
            for case in cases:
                table += bench(case)
                common.write_json(train_rows + shared_rows + decode_rows, args.out,
                                  {**meta, "wall_s": time.perf_counter() - start, "complete": False})
        finished = True
    finally:
        wall_s = time.perf_counter() - start
        print_tables(train_rows, shared_rows, decode_rows, card, dtype_name)
        rows = train_rows + shared_rows + decode_rows
        common.write_json(rows, args.out, {**meta, "wall_s": wall_s, "complete": finished})
        print(f"\nwall time {wall_s:.1f} s on {card}; rows written to {args.out}")
    failures = [r_ for r_ in rows if "error" in r_ or r_.get("matched") is False]
    if failures:
        print(f"{len(failures)} row(s) failed (error or output mismatch against the reference):")
        for r_ in failures:
            print(f"  {r_['what']} {r_['impl']} K={r_['K']} T={r_['T']} r={r_['r']}: {check_cell(r_)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
