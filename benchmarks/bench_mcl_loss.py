"""Benchmark of the fused MCL loss (forward + backward, lm_head frozen) at the three regimes of
DESIGN.md section 3, modes wta, relaxed (epsilon=0.05) and annealed (temperature=1).

Baselines: the official approach (full fp32 logits, CE reduction='none', per-sequence mean, WTA in
torch), torch on the supervised rows only (same math on the compacted rows), and, when importable,
Cut Cross-Entropy and Liger's fused linear CE with reduction='none' plus the WTA in torch.
Reported: median ms, peak extra GiB (the most memory allocated during the step beyond what was
allocated before it, the step's new d hidden included: DESIGN.md section 3's accounting), the
largest difference of the method's d hidden from torch's on the supervised rows (relative to the
largest |d hidden|; the run exits 1 where ours differs by more than 2e-2), and the ratio to the
floor (GEMM FLOPs at 781 TFLOP/s: forward 2*K*n*H*V, plus 4*n*H*V for hard WTA's backward over the
winners; for soft weights, whose
d hidden rows are formed in pass 1 as (softmax - onehot) W, one more 2*K*n*H*V and no backward
GEMM). Soft modes also time "ours, chunked pass 1 + recompute" (LORAMCL_MCL_PASS1=chunked and
LORAMCL_MCL_SOFT_BACKWARD=recompute: pass 2 recomputes the logits of every supervised row, 6*K*n*H*V
in all); on a GPU hard WTA also times
"ours, chunked pass 1" (LORAMCL_MCL_PASS1=chunked: cuBLAS logits chunks instead of the fused GEMM
that auto takes on Hopper, in both passes) and "ours, chunked pass 2" (LORAMCL_MCL_PASS2=chunked:
pass 1 fused, pass 2 from fp32 logits chunks instead of the fused GEMM's gradient epilogue).
Cut Cross-Entropy runs twice: with its default gradient filter (filter_eps="high": vocabulary
blocks whose softmax stays under bf16 eps / 32 are skipped in its backward, which on these random,
flat logits is nearly all of them, so its d hidden is approximate) and exact (filter_eps=None).

    python benchmarks/bench_mcl_loss.py [--out results/mcl_loss.json] [--regimes captioning] [--modes wta]

Without a GPU: a small, labelled CPU smoke run of the same tables on the reference backend.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    HAS_CUDA, device_name, env_var, error_chain, peak_extra_gib, print_table, run_meta, time_ms, write_json,
)
from loramcl_kernels.ops import mcl_loss as mcl_module  # noqa: E402
from loramcl_kernels.ops.mcl_loss import mcl_loss  # noqa: E402

PEAK_TFLOPS = 781.0  # dense bf16 GEMM ceiling of the H200 (DESIGN.md section 3)
IGNORE = -100

GPU_REGIMES = [  # name, K, B, T, supervised per sequence, H, V
    ("captioning", 5, 4, 780, 32, 4096, 156032),
    ("dense LM", 4, 8, 512, 448, 4096, 151936),
    ("small vocab", 8, 4, 512, 448, 2048, 32000),
]
CPU_REGIMES = [
    ("captioning (cpu smoke)", 5, 2, 48, 4, 64, 1000),
    ("dense LM (cpu smoke)", 4, 2, 32, 28, 64, 1000),
    ("small vocab (cpu smoke)", 8, 2, 32, 28, 32, 500),
]
MODES = [("wta", {}), ("relaxed", {"epsilon": 0.05}), ("annealed", {"temperature": 1.0})]


def make_inputs(K, B, T, n_sup, H, V, device, dtype):
    """Drawn on the device: the lm_head weights are ~0.6 G values (about 20 s on one CPU core)."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(B * K, T, H, generator=g, device=device) * 0.5).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) / H**0.5).to(dtype)
    labels = torch.full((B, T), IGNORE, dtype=torch.long, device=device)
    labels[:, T - n_sup :] = torch.randint(0, V, (B, n_sup), generator=g, device=device)  # the last n_sup tokens
    return hidden.requires_grad_(True), weight, labels


def wta_weights(L, mode, kw):
    K = L.shape[0]
    win = L.detach().argmin(0)
    w = F.one_hot(win, K).t().to(L.dtype)
    if mode == "relaxed" and K > 1:
        w = w * (1 - kw["epsilon"]) + (1 - w) * kw["epsilon"] / (K - 1)
    elif mode == "annealed":
        w = torch.softmax(-L.detach() / kw["temperature"], 0)
    return (w * L).sum(0).mean()


def official_step(hidden, weight, labels, K, mode, kw):
    """The authors' recipe: fp32 logits for every position, CE none, per-sequence mean."""
    R, T, _ = hidden.shape
    logits = (hidden @ weight.t()).float()
    lab = labels.repeat_interleave(K, 0)[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1),
                         reduction="none", ignore_index=IGNORE).view(R, -1)
    L = (ce.sum(1) / (lab != IGNORE).sum(1).clamp(min=1)).view(R // K, K).t()
    return wta_weights(L, mode, kw)


def supervised_rows_step(hidden, weight, labels, K, mode, kw, positions, targets, counts):
    """Same math on the compacted supervised rows (indices precomputed, as a caller would)."""
    R, T, H = hidden.shape
    rows = hidden.reshape(R * T, H).index_select(0, positions)
    z = (rows @ weight.t()).float()
    nll = F.cross_entropy(z, targets, reduction="none")
    per_row = torch.zeros(R * T, device=hidden.device, dtype=nll.dtype).index_put((positions,), nll)
    L = (per_row.view(R, T).sum(1) / counts).view(R // K, K).t()
    return wta_weights(L, mode, kw)


# (row label, library, its keyword arguments)
LIBRARY_ROWS = [
    ("Cut Cross-Entropy (default grad filter)", "cce", {}),
    ("Cut Cross-Entropy (exact grad)", "cce", {"filter_eps": None}),
    ("Liger FLCE", "liger", {}),
]


def library_step(kind, hidden, weight, labels, K, mode, kw, positions, targets, counts, lib_kw=None):
    R, T, H = hidden.shape
    rows = hidden.reshape(R * T, H).index_select(0, positions)
    if kind == "cce":
        from cut_cross_entropy import linear_cross_entropy

        nll = linear_cross_entropy(rows, weight, targets, reduction="none", **(lib_kw or {}))
    else:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        nll = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, rows, targets)
    per_row = torch.zeros(R * T, device=hidden.device, dtype=torch.float32).index_put((positions,), nll.float())
    L = (per_row.view(R, T).sum(1) / counts).view(R // K, K).t()
    return wta_weights(L, mode, kw)


def available_libraries():
    libs = []
    for name, module in (("cce", "cut_cross_entropy"), ("liger", "liger_kernel")):
        try:
            __import__(module)
            libs.append(name)
        except Exception:
            pass
    return libs


def fwd_bwd(step, hidden, settings=None):
    """One forward (step() -> loss) and backward, with the environment variables of `settings`
    (name -> value) set for both: the backward reads its own (LORAMCL_MCL_PASS2)."""
    def run():
        hidden.grad = None
        with contextlib.ExitStack() as stack:
            for name, value in (settings or {}).items():
                stack.enter_context(env_var(name, value))
            step().backward()

    return run


def step_peak_gib(run, hidden) -> float:
    """Peak extra GiB of one step, DESIGN.md's accounting: the previous step's d hidden freed
    before the count starts, so the new one counts (with it still allocated, the count would start
    above it and hide up to its size of the forward's memory)."""
    hidden.grad = None
    return peak_extra_gib(run)


def grad_difference(grad, reference) -> float:
    """max |grad - reference| / max |reference| (fp32)."""
    if grad is None or reference is None:
        return float("nan")
    return ((grad.float() - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()


def _selected(entries, wanted, what, name_of):
    """The entries named in the comma-separated `wanted` (all when None), in their table order."""
    if wanted is None:
        return entries
    names = [name.strip() for name in wanted.split(",")]
    unknown = sorted(set(names) - {name_of(entry) for entry in entries})
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}: choose from {[name_of(entry) for entry in entries]}")
    return [entry for entry in entries if name_of(entry) in names]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/mcl_loss.json")
    parser.add_argument("--regimes", default=None,
                        help="comma-separated regimes to run, e.g. 'captioning,small vocab' (default: all)")
    parser.add_argument("--modes", default=None, help="comma-separated modes, e.g. 'wta' (default: all)")
    args = parser.parse_args()
    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    backend = "triton" if HAS_CUDA else "reference"
    regimes = _selected(GPU_REGIMES if HAS_CUDA else CPU_REGIMES, args.regimes, "regime",
                        lambda regime: regime[0].removesuffix(" (cpu smoke)"))
    modes = _selected(MODES, args.modes, "mode", lambda mode: mode[0])
    # rep_ms: at least 4 timed calls of the slowest rows (dense LM: 43-100 ms a step; ours ~9)
    timing = dict(warmup_ms=25, rep_ms=400) if HAS_CUDA else {}
    if not HAS_CUDA:
        print("No CUDA device: CPU smoke run of the same tables (reference backend, small shapes, "
              "wall-clock; figures say nothing about GPU performance).")
    print(f"device: {device_name()}")
    if HAS_CUDA:  # which fp32-output GEMMs the loss gets from this torch (else a 16-bit round or an extra add)
        print(f"mm / addmm with out_dtype=float32: {mcl_module._mm_out_dtype_supported(torch.device(device))} / "
              f"{mcl_module._addmm_out_dtype_supported(torch.device(device))}")
    libs = available_libraries() if HAS_CUDA else []
    meta = run_meta()
    meta.update(backend=backend, dtype=str(dtype), smoke=not HAS_CUDA, libraries=libs)
    rows_out, table, ours_mismatch = [], [], []
    for name, K, B, T, n_sup, H, V in regimes:
        hidden, weight, labels = make_inputs(K, B, T, n_sup, H, V, device, dtype)
        R = B * K
        tgt = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE)], 1).repeat_interleave(K, 0).reshape(-1)
        positions = (tgt != IGNORE).nonzero().squeeze(1)
        targets = tgt[positions]
        counts = (tgt.view(R, T) != IGNORE).sum(1).clamp(min=1).float()
        n = int((tgt != IGNORE).sum()) // K
        fwd = 2 * K * n * H * V
        floors = {"wta": (fwd + 4 * n * H * V) / PEAK_TFLOPS / 1e9,
                  "soft": 2 * fwd / PEAK_TFLOPS / 1e9}
        for mode, kw in modes:
            floor_ms = floors["wta" if mode == "wta" else "soft"]
            ours = lambda: mcl_loss(hidden, weight, labels, num_hypotheses=K, mode=mode,  # noqa: E731
                                    backend=backend, **kw).loss
            chunked, recompute = {"LORAMCL_MCL_PASS1": "chunked"}, {"LORAMCL_MCL_SOFT_BACKWARD": "recompute"}
            torch_rows = lambda: supervised_rows_step(  # noqa: E731
                hidden, weight, labels, K, mode, kw, positions, targets, counts)
            try:  # the d hidden every row is compared with
                fwd_bwd(torch_rows, hidden)()
                reference_grad = hidden.grad.float()
            except Exception as exc:  # out of memory on a smaller card: the rows go on, unchecked
                reference_grad = None
                print(f"{name} {mode}: no reference d hidden ({error_chain(exc)[:200]})", flush=True)
            hidden.grad = None
            cases = [("ours", ours, {})]  # auto: on Hopper, hard WTA takes the fused pass 1
            if mode != "wta":  # soft weights: the pass-2 recompute next to the default one-pass gradient
                cases.append(("ours, chunked pass 1 + recompute", ours, {**chunked, **recompute}))
            if HAS_CUDA and mode == "wta":  # pass 1 (and so pass 2) as cuBLAS logits chunks + Triton row kernels
                cases.append(("ours, chunked pass 1", ours, chunked))
                # pass 2 alone: the gradient formed from fp32 logits chunks instead of the GEMM's epilogue
                cases.append(("ours, chunked pass 2", ours, {"LORAMCL_MCL_PASS2": "chunked"}))
            elif HAS_CUDA:  # pass 1 as one fused Triton GEMM + log-sum-exp, then pass 2
                cases.append(("ours, fused pass 1 + recompute", ours, {"LORAMCL_MCL_PASS1": "fused", **recompute}))
            if mode == "wta" or not HAS_CUDA:
                cases += [
                    ("official (full fp32 logits)", lambda: official_step(hidden, weight, labels, K, mode, kw), {}),
                    ("torch, supervised rows", torch_rows, {}),
                ]
                for label, lib, lib_kw in LIBRARY_ROWS:
                    if lib in libs:
                        cases.append((label, lambda lib=lib, lib_kw=lib_kw: library_step(
                            lib, hidden, weight, labels, K, mode, kw, positions, targets, counts, lib_kw), {}))
            for method, step, settings in cases:
                try:
                    run = fwd_bwd(step, hidden, settings)
                    ms = time_ms(run, **timing)
                    gib = step_peak_gib(run, hidden)  # on a GPU its step leaves its d hidden
                    if hidden.grad is None:
                        run()
                    grad_diff = grad_difference(hidden.grad, reference_grad)
                    err = None
                except Exception as exc:  # a row that fails (out of memory, a library's error) is recorded
                    ms, gib, grad_diff, err = float("nan"), float("nan"), float("nan"), error_chain(exc)[:240]
                    print(f"{name} {mode} {method}: {err}", flush=True)
                hidden.grad = None
                if method.startswith("ours") and err is not None:
                    ours_mismatch.append(f"{name} {mode} {method}: failed: {err}")
                elif method.startswith("ours") and reference_grad is not None and not grad_diff <= 2e-2:
                    ours_mismatch.append(f"{name} {mode} {method}: d hidden differs from torch's by {grad_diff:.1e}")
                ratio = ms / floor_ms if HAS_CUDA else float("nan")
                row = dict(regime=name, K=K, B=B, T=T, supervised_per_seq=n_sup, H=H, V=V, mode=mode,
                           method=method, ms=ms, peak_extra_gib=gib, grad_vs_torch=grad_diff, floor_ms=floor_ms,
                           ratio_to_floor=ratio, error=err)
                rows_out.append(row)
                table.append([name, mode, method, ms, gib, f"{grad_diff:.1e}", floor_ms, ratio])
                print(f"{name:24s} {mode:9s} {method:40s} {ms:9.3f} ms  {gib:7.3f} GiB  d hidden {grad_diff:.1e}  "
                      f"floor {floor_ms:.3f} ms  x{ratio:.2f}", flush=True)
                gc.collect()
                if HAS_CUDA:
                    torch.cuda.empty_cache()
        # agreement check of our loss with the official one (wta)
        try:
            with torch.no_grad():
                ours = mcl_loss(hidden, weight, labels, num_hypotheses=K, backend=backend).loss.item()
                official = official_step(hidden, weight, labels, K, "wta", {}).item()
            print(f"{name}: wta loss ours {ours:.5f} vs official {official:.5f}")
        except Exception as exc:
            print(f"{name}: wta loss check failed: {error_chain(exc)[:240]}")
        write_json(rows_out, args.out, meta)  # after each regime: a run cut short keeps its rows
        del hidden, weight, labels, positions, targets, counts, reference_grad
        gc.collect()
        if HAS_CUDA:
            torch.cuda.empty_cache()
    print_table(f"MCL loss fwd+bwd, lm_head frozen ({device_name()})",
                ["regime", "mode", "method", "ms", "peak extra GiB (d hidden incl.)", "d hidden vs torch",
                 "floor ms", "x floor"], table)
    write_json(rows_out, args.out, meta)
    print(f"wrote {args.out}")
    for line in ours_mismatch:
        print(f"MISMATCH {line}")
    return 1 if ours_mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
