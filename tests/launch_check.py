"""launch() (ops/_triton_utils.py) launches exactly what Triton's own launch would, without a GPU.

Run as a script in a process without TRITON_INTERPRET (tests/ops/test_triton_utils.py does). A
stand-in driver reports an sm_90 target; compiling is replaced by a stand-in kernel per Triton
cache key (so two launches share a stand-in exactly when Triton would launch the same compiled
kernel) whose launcher records the grid and the arguments; the autotuner's benchmark is replaced
by timings that depend on the config and on M, so that different M pick different configs.

Every launch of both ops' launchers over a set of calls (meta tensors; aligned and misaligned
operands, M = 1 and M % 16 == 0 and not, each dtype, every path) is recorded three times: through
Triton (LORAMCL_TRITON_LAUNCH=triton), then through launch(): cache misses, hits, and again with a
cache that keeps 7 keys and starts over. Prints
one JSON line: the number of launches, of cache hits, of distinct compiled kernels and configs,
and the mismatches (none when launch() is right).
"""
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from sm90_compile import Sm90Driver, mcl_on_meta_tensors  # noqa: E402  (tests/, this script's folder)
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

RECORDED = []


class StandInKernel:
    """What Triton compiles for one cache key: launching it records the launch."""

    function = 0
    packed_metadata = None

    def __init__(self, name, key):
        self.name, self.key = name, key

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
            exit_hook, *args):
        described = tuple((str(a.dtype), a.data_ptr(), tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor)
                          else a for a in args)
        RECORDED.append((self, (grid_x, grid_y, grid_z), described))


def _stand_in_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = StandInKernel(self.__name__, key)
    self.device_caches[device][0][key] = kernel
    return kernel


def _stand_in_bench(self, *args, config, **meta):
    """A config's 'time': depends on M, so that the best config changes with it."""
    return [float((self.configs.index(config) + self.nargs["M"]) % len(self.configs))]


def calls():
    """Both ops' Triton launchers over meta tensors (the launchers treat them as GPU tensors)."""
    from loramcl_kernels.ops import mcl_loss as mcl
    from loramcl_kernels.ops import multi_lora_linear as mll

    meta = torch.device("meta")

    def empty(*shape, dtype=torch.bfloat16, offset=0):
        flat = torch.empty(offset + torch.Size(shape).numel(), dtype=dtype, device=meta)
        return flat[offset:].view(shape)

    for path in ("fused", "cublas", "decode"):
        os.environ["LORAMCL_MULTI_LORA_PATH"] = path
        for dtype, m, offset, num_hyp, r in ((torch.bfloat16, 3900, 0, 5, 8), (torch.bfloat16, 3901, 0, 5, 8),
                                             (torch.bfloat16, 3900, 1, 5, 8), (torch.float32, 64, 0, 4, 3),
                                             (torch.bfloat16, 1, 0, 1, 8), (torch.float16, 48, 8, 3, 16)):
            x = empty(m, 256, dtype=dtype, offset=offset)
            w = empty(512, 256, dtype=dtype)
            a, b = empty(num_hyp, r, 256, dtype=dtype), empty(num_hyp, 512, r, dtype=dtype, offset=offset)
            s = empty(num_hyp, dtype=torch.float32)
            row_div = m // num_hyp if m % num_hyp == 0 and m >= 64 else 1  # runs of rows: per-run shrink tiles
            y, shrink = mll.multi_lora_linear_triton(x, w, None, a, b, s, None, row_div)
            if path == "decode":
                continue
            mll.multi_lora_linear_triton_backward(y, x, w, a, b, s, None, row_div, shrink)
            seed = empty(1, dtype=torch.int64)
            y, shrink = mll.multi_lora_linear_triton(x, w, None, a, b, s, None, 1, seed, 0.1)
            mll.multi_lora_linear_triton_backward(y, x, w, a, b, s, None, 1, shrink, seed, 0.1)
            if m % num_hyp == 0:
                y, shrink = mll.multi_lora_linear_shared_triton(x, w, None, a, b, s, 1)
                mll.multi_lora_linear_shared_triton_backward(y, x, w, a, b, s, shrink, 1)

    # (pass 1, mode, lm_head gradients): a frozen lm_head after the fused pass 1 takes the fused pass 2
    for path, mode, lm_head_grads in (("chunked", "wta", True), ("fused", "wta", True), ("fused", "wta", False),
                                      ("chunked", "annealed", False)):
        os.environ["LORAMCL_MCL_PASS1"] = path
        for dtype in (torch.bfloat16, torch.float32):
            hidden, weight = empty(10, 40, 256, dtype=dtype), empty(1000, 256, dtype=dtype)
            bias, labels = empty(1000, dtype=dtype), empty(2, 40, dtype=torch.int64)
            out = mcl._mcl_loss_forward_triton(hidden, weight, bias, labels, 5, "batch_major", mode, 0.0, 1.0,
                                               "mean", -100, True, keep_nll_grad=mode == "annealed")
            mcl._mcl_loss_backward_triton(out[0], hidden, weight, bias, labels, *out[3:8], 5, "batch_major", "mean",
                                          -100, True, mode == "wta", lm_head_grads, lm_head_grads)


def main():
    driver.set_active(Sm90Driver())
    JITFunction._do_compile = _stand_in_compile
    Autotuner._bench = _stand_in_bench
    triton.set_allocator(lambda size, alignment, stream: None)
    from loramcl_kernels.ops import _triton_utils
    from loramcl_kernels.ops import mcl_loss as mcl
    from loramcl_kernels.ops import multi_lora_linear as mll

    mll._device_facts = mcl.device_facts = lambda device: (132, 9)
    mcl_on_meta_tensors(supervised_rows=100)
    record_launch, through_triton = _triton_utils._record_launch, []

    def counted_record_launch(*args):
        through_triton[-1] += 1
        return record_launch(*args)

    _triton_utils._record_launch = counted_record_launch
    runs = {}
    runs_and_modes = (("triton", "triton"), ("direct, misses", "direct"), ("direct, hits", "direct"),
                      ("direct, 7 keys kept", "direct"))
    for run, mode in runs_and_modes:
        os.environ["LORAMCL_TRITON_LAUNCH"] = mode
        if run == "direct, 7 keys kept":  # the cache starts over when full
            _triton_utils._LAUNCHES.clear()
            _triton_utils._MAX_LAUNCHES = 7
        RECORDED.clear()
        through_triton.append(0)
        calls()
        runs[run] = list(RECORDED)
    reference = runs["triton"]
    mismatches = [dict(run=run, launch=i, expected=[reference[i][0].name, reference[i][1:]], got=[got[0].name, got[1:]])
                  for run, launches in runs.items() for i, got in enumerate(launches)
                  if i < len(reference) and (got[0] is not reference[i][0] or got[1:] != reference[i][1:])]
    summary = dict(launches={run: len(launches) for run, launches in runs.items()},
                   recorded_through_triton=dict(zip(runs, through_triton)),
                   cache_entries_at_end=len(_triton_utils._LAUNCHES),
                   kernels=sorted({k.name for k, _, _ in reference}),
                   compiled_variants=len({id(k) for k, _, _ in reference}),
                   autotuned_grids=sorted({g for k, g, _ in reference if k.name == "_gemm_expand_kernel"}),
                   autotuner_m_buckets=sorted({key[0] for key in mll._gemm_kernel.cache}),
                   mismatches=mismatches[:5], mismatch_count=len(mismatches))
    print(json.dumps(summary, default=str))
    ok = not mismatches and len(set(summary["launches"].values())) == 1 and through_triton[2] == 0
    ok = ok and len(_triton_utils._LAUNCHES) <= 7
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
