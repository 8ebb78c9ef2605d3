"""multi_lora_linear: reference vs an fp64 oracle, Triton (interpreter on CPU, native on GPU) vs
the oracle within 2x plain PyTorch's error, gradients, opcheck, gradcheck, torch.compile, errors.

The oracle is written independently of the package: a loop over rows, y[n] = x[n] W^T + b +
s[h] (x[n] A_h^T) B_h^T, differentiated by autograd in fp64.
"""
import pytest
import torch

from loramcl_kernels import _backend
from loramcl_kernels.ops import _triton_utils as triton_utils
from loramcl_kernels.ops import multi_lora_linear as mll
from loramcl_kernels.ops.multi_lora_linear import multi_lora_linear
from tests.utils import (
    HOST_READS, TRITON_DEVICE, CountingKernel, ZerosRecorder, assert_within_budget, emulate_fp32_output_gemms,
    requires_cuda,
)


def hypotheses_of_rows(n, num_hyp, layout="batch_major", inner=1, ids=None):
    if ids is not None:
        return [int(i) for i in ids]
    if layout == "batch_major":
        return [(i // inner) % num_hyp for i in range(n)]
    return [i // (n // num_hyp) for i in range(n)]


def shared_source_rows(n, num_hyp, layout="batch_major", inner=1):
    """For shared input: (source row, hypothesis) of every output row, in the layout's order."""
    rows = []
    if layout == "batch_major":
        for g in range(n // inner):
            for k in range(num_hyp):
                rows += [(g * inner + j, k) for j in range(inner)]
    else:
        for k in range(num_hyp):
            rows += [(i, k) for i in range(n)]
    return rows


def naive(x, weight, bias, lora_A, lora_B, scaling, hyps, sources=None, x_lora=None):
    """Row loop in the dtype of its inputs. hyps[i] is output row i's hypothesis (-1: base only);
    sources[i] the input row it reads (identity when None); x_lora: what the LoRA path reads
    (dropout(x)), x when None."""
    outs = []
    x_lora = x if x_lora is None else x_lora
    for i, h in enumerate(hyps):
        src = i if sources is None else sources[i]
        xi = x[src]
        yi = xi @ weight.t() if weight is not None else xi.new_zeros(lora_B.shape[1])
        if bias is not None:
            yi = yi + bias
        if h >= 0:
            yi = yi + scaling[h] * ((x_lora[src] @ lora_A[h].t()) @ lora_B[h].t())
        outs.append(yi)
    return torch.stack(outs)


def make_inputs(n, tokens, d_in, d_out, r, num_hyp, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, *tokens, d_in)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if bias else None
    lora_A = torch.randn(num_hyp, r, d_in, generator=g) / d_in**0.5
    lora_B = torch.randn(num_hyp, d_out, r, generator=g) / r**0.5
    scaling = torch.rand(num_hyp, generator=g) + 0.5
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(weight), cast(b), cast(lora_A), cast(lora_B), scaling.to(device)


def copy_keeping_strides(t):
    """A copy with t's exact strides (clone() makes gappy views contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())


def strided(t):
    """The same values as a non-contiguous view: every other element of a wider tensor."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def forward_and_grads(fn, x, weight, bias, lora_A, lora_B, grad_seed=1, train_weight=True):
    """Output and the gradients of <y, G> for a fixed random G w.r.t. every input (the inputs'
    strides kept)."""
    leaves = [copy_keeping_strides(t).requires_grad_(t is not weight or train_weight) if t is not None else None
              for t in (x, weight, bias, lora_A, lora_B)]
    y = fn(*leaves)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wrt, grad_out)
    return [y.detach()] + [g.detach() for g in grads]


def check_case(n, tokens, d_in, d_out, r, num_hyp, dtype, backend, *, layout="batch_major", inner=1, ids=None,
               shared=False, bias=True, scalar_scaling=False, non_contiguous=False, delta_only=False, atol=1e-5,
               device="cpu", dropout=0.0):
    x, weight, b, lora_A, lora_B, scaling = make_inputs(n, tokens, d_in, d_out, r, num_hyp, dtype, device, bias)
    if delta_only:
        weight, b = None, None
    if non_contiguous == "operands":  # strided views of x, bias, A, B and the scaling vector
        x, b, lora_A, lora_B, scaling = (strided(t) if t is not None else None for t in (x, b, lora_A, lora_B, scaling))
        assert not any(t.is_contiguous() for t in (x, lora_A, lora_B, scaling) + ((b,) if b is not None else ()))
    elif non_contiguous == "weight":  # a column-major W, as a GPT-2 Conv1D base passes it
        weight = weight.t().contiguous().t()
    elif non_contiguous == "transposed":  # A and B stored transposed: (K, d_in, r), (K, r, d_out)
        lora_A, lora_B = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (lora_A, lora_B))
    scale_arg = 0.75 if scalar_scaling else scaling
    scale_vec = torch.full((num_hyp,), 0.75, device=device) if scalar_scaling else scaling
    ids_t = None if ids is None else torch.tensor(ids, device=device)
    if ids_t is not None and non_contiguous == "operands":
        ids_t = strided(ids_t)

    def ours(x, weight, bias, lora_A, lora_B):
        torch.manual_seed(DROPOUT_SEED)  # the op's one draw for its dropout mask
        return multi_lora_linear(x, weight, bias, lora_A, lora_B, scale_arg, num_hypotheses=num_hyp, layout=layout,
                                 inner=inner, hypothesis_ids=ids_t, shared_input=shared, backend=backend,
                                 lora_dropout=dropout)

    keep = None
    if dropout:  # the same mask, drawn the way the op draws it
        torch.manual_seed(DROPOUT_SEED)
        keep = mll.dropout_keep_mask(mll._dropout_seed(device), x[..., 0].numel(), d_in, dropout).cpu().view(x.shape)
        assert 0 < keep.sum() < keep.numel()

    if shared:
        pairs = shared_source_rows(n, num_hyp, layout, inner)
        sources, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        sources, hyps = None, hypotheses_of_rows(n, num_hyp, layout, inner, ids)

    def reference_rows(dtype_):
        def fn(x, weight, bias, lora_A, lora_B):
            x2 = x.reshape(n, -1, d_in).transpose(0, 1)  # (tokens, N, d_in): loop rows per token
            if keep is None:
                xl2 = x2
            else:
                x_lora = torch.where(keep.to(x.device), x * (1.0 / (1.0 - dropout)), 0.0)
                xl2 = x_lora.reshape(n, -1, d_in).transpose(0, 1)
            ys = [naive(xt, weight, bias, lora_A, lora_B, scale_vec.to(dtype_), hyps, sources, x_lora=xlt)
                  for xt, xlt in zip(x2, xl2)]
            y = torch.stack(ys, 1)
            return y.reshape(len(hyps), *tokens, d_out)
        return fn

    def cast(t, dt):
        return None if t is None else t.to(dt)

    got = forward_and_grads(ours, x, weight, b, lora_A, lora_B)
    oracle = forward_and_grads(reference_rows(torch.float64), *[cast(t, torch.float64)
                               for t in (x.detach().cpu(), weight, b, lora_A, lora_B)])
    plain = forward_and_grads(reference_rows(dtype), x, weight, b, lora_A, lora_B)
    names = ["y", "dx"] + (["dW"] if weight is not None else []) + (["dbias"] if b is not None else []) + ["dA", "dB"]
    assert len(got) == len(oracle) == len(names)
    for name, g, o, p in zip(names, got, oracle, plain):
        assert g.shape == o.shape, name
        assert g.dtype == dtype, name
        assert_within_budget(g.cpu(), o.cpu(), p.cpu(), atol=atol, name=name)


# ----------------------------------------------------------------------------------------------
# Reference backend vs the fp64 oracle (fp32 data: the plain fp32 loop sets the budget)
# ----------------------------------------------------------------------------------------------

CASES = [
    dict(n=6, tokens=(4,), d_in=32, d_out=24, r=4, num_hyp=3),
    dict(n=6, tokens=(4,), d_in=32, d_out=24, r=4, num_hyp=3, layout="hypothesis_major"),
    dict(n=8, tokens=(3,), d_in=16, d_out=20, r=5, num_hyp=2, inner=2),  # beams: (n // inner) % K
    dict(n=7, tokens=(2,), d_in=100, d_out=36, r=3, num_hyp=3, ids=[0, 2, -1, 1, 1, -1, 0]),
    dict(n=4, tokens=(3,), d_in=24, d_out=16, r=3, num_hyp=1),  # K = 1
    dict(n=6, tokens=(), d_in=20, d_out=12, r=2, num_hyp=3, bias=False),  # 2-D x
    dict(n=4, tokens=(2, 3), d_in=16, d_out=8, r=4, num_hyp=2, scalar_scaling=True),  # 4-D x
    dict(n=6, tokens=(3,), d_in=16, d_out=8, r=4, num_hyp=3, non_contiguous="operands"),
    dict(n=6, tokens=(3,), d_in=16, d_out=8, r=4, num_hyp=3, non_contiguous="weight"),
    dict(n=6, tokens=(3,), d_in=16, d_out=8, r=4, num_hyp=3, non_contiguous="transposed"),
    dict(n=7, tokens=(2,), d_in=40, d_out=36, r=3, num_hyp=3, ids=[2, 0, -1, 1, 0, -1, 1], non_contiguous="operands"),
    dict(n=3, tokens=(4,), d_in=24, d_out=16, r=3, num_hyp=3, shared=True, non_contiguous="operands"),
    dict(n=6, tokens=(3,), d_in=16, d_out=8, r=4, num_hyp=3, delta_only=True),
    dict(n=3, tokens=(4,), d_in=24, d_out=16, r=3, num_hyp=3, shared=True),
    dict(n=4, tokens=(2,), d_in=24, d_out=16, r=4, num_hyp=3, shared=True, inner=2),
    dict(n=3, tokens=(4,), d_in=24, d_out=16, r=3, num_hyp=2, shared=True, layout="hypothesis_major"),
    dict(n=2, tokens=(3,), d_in=20, d_out=12, r=3, num_hyp=4, shared=True, delta_only=True, bias=False),
    dict(n=6, tokens=(2,), d_in=16, d_out=8, r=1, num_hyp=3, ids=[0, 2, -1, 1, 1, 0]),  # rank 1
    # r = 16, its own padding: the backward's shrink reads B^T in place (lora_B's strides)
    dict(n=4, tokens=(5,), d_in=40, d_out=36, r=16, num_hyp=2),
    dict(n=4, tokens=(5,), d_in=40, d_out=36, r=16, num_hyp=2, non_contiguous="operands"),
    dict(n=4, tokens=(), d_in=16, d_out=8, r=1, num_hyp=3, shared=True),  # rank 1: dS_all's reshape is a column view
    # runs of >= 16 rows per hypothesis (a sequence's tokens): the per-run shrink tiles on the CPU
    dict(n=6, tokens=(20,), d_in=24, d_out=16, r=3, num_hyp=3),  # a full and a partial tile per run
    dict(n=4, tokens=(9,), d_in=20, d_out=12, r=4, num_hyp=2, layout="hypothesis_major"),  # runs of 18
    dict(n=5, tokens=(17,), d_in=24, d_out=8, r=5, num_hyp=3, ids=[2, -1, 0, 1, 1]),  # -1: a run of zeros
    dict(n=4, tokens=(8,), d_in=16, d_out=12, r=2, num_hyp=2, inner=2, non_contiguous="operands"),
]


DROPOUT_SEED = 1234
DROPOUT_CASES = [  # LoRA dropout (distinct rows: the op refuses it with shared input)
    dict(n=6, tokens=(4,), d_in=32, d_out=24, r=4, num_hyp=3, dropout=0.25),
    dict(n=8, tokens=(3,), d_in=16, d_out=20, r=5, num_hyp=2, inner=2, dropout=0.5),
    dict(n=6, tokens=(4,), d_in=32, d_out=24, r=4, num_hyp=3, layout="hypothesis_major", dropout=0.25),
    dict(n=7, tokens=(2,), d_in=100, d_out=36, r=3, num_hyp=3, ids=[0, 2, -1, 1, 1, -1, 0], dropout=0.1),
    dict(n=4, tokens=(3,), d_in=24, d_out=16, r=3, num_hyp=1, dropout=0.3, delta_only=True),
    dict(n=6, tokens=(3,), d_in=16, d_out=8, r=4, num_hyp=3, non_contiguous="operands", dropout=0.2),
    dict(n=4, tokens=(18,), d_in=24, d_out=16, r=3, num_hyp=2, ids=[1, 0, -1, 1], dropout=0.25),  # per-run tiles
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items() if k not in ("d_in", "d_out"))


@pytest.mark.parametrize("case", CASES + DROPOUT_CASES, ids=_case_id)
def test_reference_matches_fp64_oracle(case):
    check_case(dtype=torch.float32, backend="reference", **case)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_fp64_is_exact(case):
    check_case(dtype=torch.float64, backend="reference", atol=1e-12, **case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reference_backward_keeps_the_fp32_output_gemm_for_16_bit(dtype, monkeypatch):
    """Where torch.mm(out_dtype=float32) exists (CUDA), the reference's dB takes it for 16-bit
    gradients only: fp64 (the GPU tests' oracle) and fp32 keep their own dtype. The CPU has no such
    GEMM, so pretending it does makes any call of it raise here."""
    monkeypatch.setattr(mll, "_mm_out_dtype_supported", lambda device: True)
    check_case(dtype=dtype, backend="reference", atol=1e-12 if dtype == torch.float64 else 1e-5, **CASES[0])


# ----------------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU): both paths, fp32 and fp16
# ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["fused", "cublas", "decode"])
def triton_path(request, monkeypatch):
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", request.param)
    return request.param


def expected_forward_path(case, dtype, path):
    """The path the forward takes when LORAMCL_MULTI_LORA_PATH asks for `path`: the designed
    fallbacks to cublas (_choose_path, _decode_applies, _gemm_with_expand)."""
    column_major_w = case.get("non_contiguous") == "weight"
    if path == "decode" and (case.get("shared") or case.get("dropout") or column_major_w):
        return "cublas"  # decode: distinct rows, no LoRA dropout, W read along d_in
    unaligned = case["d_in"] * torch.finfo(dtype).bits // 8 % 16
    if path == "fused" and (case.get("delta_only") or column_major_w or unaligned):
        return "cublas"  # fused: a base GEMM whose x and W rows are 16-byte aligned (TMA descriptors)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES + DROPOUT_CASES, ids=_case_id)
def test_triton_matches_fp64_oracle(case, dtype, triton_path, monkeypatch):
    """Every case on each path, and the path asked for is the one that ran (or its designed fallback)."""
    ran = []
    for name, path in (("_launch_decode", "decode"), ("_expand_then_base", "cublas"), ("_base_then_expand", "cublas")):
        monkeypatch.setattr(mll, name, lambda *a, _f=getattr(mll, name), _p=path, **k: (ran.append(_p), _f(*a, **k))[1])
    gemm = mll._launch_gemm_expand
    monkeypatch.setattr(mll, "_launch_gemm_expand",
                        lambda x, *a, **k: (ran.append("fused") if x is not None else None, gemm(x, *a, **k))[1])
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    check_case(dtype=dtype, backend="triton", atol=atol, device=TRITON_DEVICE, **case)
    assert ran[0] == expected_forward_path(case, dtype, triton_path), ran


@pytest.mark.parametrize("adapter", ["lora_A", "lora_B"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_non_finite_adapter_reaches_the_same_rows_on_both_backends(adapter, backend, triton_path):
    """A diverged hypothesis (NaN in adapter 1): in lora_A it stays in hypothesis 1's rows (S_bd's
    other blocks are exact zeros); in lora_B it reaches every row, base-only rows (id -1) included,
    as the block-diagonal expand multiplies those zeros by it. The same on every path."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, w, b, a, bb, s = make_inputs(8, (), 32, 24, 4, 3, torch.float32, device)
    (a if adapter == "lora_A" else bb)[1, 0, 0] = float("nan")
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1], device=device)
    with torch.no_grad():
        y = multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids, backend=backend)
    rows_with_nan = y.isnan().any(-1).cpu()
    expected = ids.cpu() == 1 if adapter == "lora_A" else torch.ones(8, dtype=torch.bool)
    assert torch.equal(rows_with_nan, expected), rows_with_nan


def test_triton_fused_path_taken_when_eligible(monkeypatch):
    x = torch.randn(8, 32)
    w = torch.randn(16, 32)
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "fused")
    assert mll._choose_path(x, w) == "fused"
    assert mll._choose_path(x, w, shared_input=True) == "fused"  # forced: the tests cover its kernels
    assert mll._choose_path(x[:, :30], w[:, :30]) == "cublas"  # rows not 16-byte aligned: no TMA
    assert mll._choose_path(x, None) == "cublas"
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "auto")
    assert mll._choose_path(x, w) == "cublas"  # auto: fused only on Hopper GPUs
    monkeypatch.setattr(mll, "_device_facts", lambda device: (132, 9))  # Hopper
    rows = torch.randn(mll.FUSED_MIN_ROWS, 32, dtype=torch.bfloat16)
    x, w = x.bfloat16(), w.bfloat16()
    assert mll._choose_path(x.float(), w.float()) == "cublas"  # fp32: cuBLAS (the fp32 tiles spill)
    assert mll._choose_path(rows.float(), w.float()) == "cublas"
    assert mll._choose_path(x.half(), w.half()) == "decode"
    assert mll._choose_path(x, w) == "decode"  # a few rows: the one-kernel decode forward
    assert mll._choose_path(rows[: mll.DECODE_AUTO_MAX_ROWS], w) == "decode"
    assert mll._choose_path(rows[: mll.DECODE_AUTO_MAX_ROWS + 1], w) == "cublas"
    assert mll._choose_path(rows[:-1], w) == "cublas"  # under two waves of the persistent GEMM
    assert mll._choose_path(rows, w) == "fused"
    assert mll._choose_path(rows, w, shared_input=True) == "cublas"  # measured faster, forward and backward
    assert mll._choose_path(x, w, shared_input=True) == "cublas"  # the decode kernel has no shared output
    assert mll._choose_path(rows[:, :30], w[:, :30]) == "cublas"  # no TMA for these rows
    monkeypatch.setattr(mll, "_device_facts", lambda device: (132, 8))
    assert mll._choose_path(rows, w) == "cublas"  # before Hopper: cublas for every size
    assert mll._choose_path(x, w) == "cublas"
    # GPU tensors (meta tensors stand for them here): TMA needs Hopper, else cublas even when asked for
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "fused")
    x_gpu, w_gpu = x.to("meta"), w.to("meta")
    monkeypatch.setattr(mll, "_device_facts", lambda device: (108, 8))  # an A100
    assert mll._choose_path(x_gpu, w_gpu) == "cublas"
    monkeypatch.setattr(mll, "_device_facts", lambda device: (132, 9))
    assert mll._choose_path(x_gpu, w_gpu) == "fused"
    monkeypatch.setattr(triton_utils, "shared_memory_per_block", lambda device: 101376)  # consumer Blackwell
    assert mll._choose_path(x_gpu, w_gpu) == "cublas"
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "auto")
    assert mll._choose_path(rows.to("meta"), w_gpu.bfloat16()) == "cublas"
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "bogus")
    with pytest.raises(ValueError, match="LORAMCL_MULTI_LORA_PATH"):
        mll._choose_path(x, w)


def test_decode_path_needs_room_for_its_expand_operands(monkeypatch):
    """The decode finish kernel holds (64 rows + 64 outputs) x the padded K*r columns of expand
    operands in shared memory: fp32 at K*r = 256 takes 128 KB, which a 99 KB card cannot give, so
    there the decode path does not apply (cublas runs); bf16, or an A100 / H100, it does."""
    from loramcl_kernels.ops import _triton_utils

    x32, w32, a32 = torch.empty(8, 64), torch.empty(32, 64), torch.empty(4, 64, 64)
    x16, w16, a16 = x32.half(), w32.half(), a32.half()
    for limit, fits_fp32 in ((101376, False), (166912, True), (232448, True)):
        monkeypatch.setattr(_triton_utils, "shared_memory_per_block", lambda device, limit=limit: limit)
        assert mll._decode_applies(x32, w32, a32) == fits_fp32
        assert mll._decode_applies(x16, w16, a16)
        assert mll._decode_applies(x32, w32, a32[:, :32])  # K*r = 128: 64 KB


@pytest.mark.parametrize("r, num_hyp, rows, w_layout, expect", [
    (3, 3, 8, "rows", True),  # K*r = 9 shrink columns -> 16
    (3, 3, 8, "conv1d", False),  # W read along d_out (GPT-2's Conv1D passes W^T's transpose): cublas
    (64, 4, 8, "rows", True),  # K*r = 256: the most the decode kernels hold
    (64, 5, 8, "rows", False),  # 320
    (4, 2, mll.DECODE_MAX_ROWS + 2, "rows", False),  # too many rows for one tile grid
])
def test_decode_path_two_launches_when_it_applies(monkeypatch, r, num_hyp, rows, w_layout, expect):
    """LORAMCL_MULTI_LORA_PATH=decode: the whole forward is the two decode kernels where it
    applies (else cublas); values and gradients as the reference, with ids including -1."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "decode")
    launches = []
    for name in ("_decode_partial_kernel", "_decode_finish_kernel", "_shrink_kernel", "_gemm_expand_kernel"):
        kernel = getattr(mll, name)
        monkeypatch.setattr(mll, name, CountingKernel(kernel, name, launches))
    x, w, b, a, bb, s = make_inputs(rows, (), 32, 24, r, num_hyp, torch.float32, TRITON_DEVICE)
    w_view = w if w_layout == "rows" else w.t().contiguous().t()  # (d_out, d_in), stride (1, d_out)
    ids = torch.arange(rows, device=TRITON_DEVICE) % (num_hyp + 1) - 1  # includes -1: base only
    fn = lambda *t, backend: multi_lora_linear(*t, s, hypothesis_ids=ids, backend=backend)  # noqa: E731
    with torch.no_grad():
        launches.clear()
        y = fn(x, w_view, b, a, bb, backend="triton")
    assert launches == (["_decode_partial_kernel", "_decode_finish_kernel"] if expect
                        else ["_shrink_kernel"])  # cublas: the shrink, then two cuBLAS GEMMs
    got = forward_and_grads(lambda *t: fn(*t, backend="triton"), x, w_view, b, a, bb)
    want = forward_and_grads(lambda *t: fn(*t, backend="reference"), x, w, b, a, bb)
    assert torch.equal(got[0], y)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("delta_only", [False, True], ids=["base", "delta_only"])
def test_decode_path_over_splits_row_blocks_and_column_tiles(monkeypatch, dtype, delta_only):
    """The decode kernels where d_in spans several splits (64 on the CPU, the last one partial),
    the rows two row blocks (64 each), d_out a partial output tile and K*r one A_all tile: as the
    fp64 oracle, within the budget of plain PyTorch in the same dtype."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "decode")
    launches = []
    for name in ("_decode_partial_kernel", "_decode_finish_kernel"):
        monkeypatch.setattr(mll, name, CountingKernel(getattr(mll, name), name, launches))
    ids = [(7 * i) % 4 - 1 for i in range(70)]  # -1 (base only) and every hypothesis
    check_case(n=70, tokens=(), d_in=200, d_out=40, r=5, num_hyp=3, dtype=dtype, backend="triton",
               ids=ids, delta_only=delta_only, atol=1e-5 if dtype == torch.float32 else 2e-3, device=TRITON_DEVICE)
    assert launches[:2] == ["_decode_partial_kernel", "_decode_finish_kernel"]
    assert mll._decode_config(70, 200, 40 + 15, 4, torch.device("cpu"))[3] == 64  # 4 splits over d_in = 200


@pytest.mark.parametrize("path", ["decode", "cublas", "fused"])
def test_rank_one_adapters_with_any_stride_of_their_rank_dim(monkeypatch, path):
    """r = 1: torch calls a (K, 1, d_in) lora_A contiguous whatever its stride over r (here 1, a
    transposed (K, d_in, 1) buffer); the decode kernel read A_all's rows with that stride (hypothesis
    k's row at k instead of k*d_in). Output and gradients as the fp64 oracle on every path."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", path)
    K, n, d_in, d_out = 3, 6, 32, 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    a = torch.randn(K, d_in, 1, generator=g).transpose(1, 2).requires_grad_()  # stride (d_in, 1, 1)
    b = torch.randn(K, d_out, 1, generator=g).transpose(1, 2).transpose(1, 2).requires_grad_()
    assert a.is_contiguous() and a.stride(1) == 1
    y = multi_lora_linear(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), None, a.to(TRITON_DEVICE), b.to(TRITON_DEVICE),
                          0.5, backend="triton")
    grad_a, grad_b = torch.autograd.grad(y.square().sum(), (a, b))
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    y64 = naive(x.double(), w.double(), None, a64, b64, torch.full((K,), 0.5, dtype=torch.float64),
                hypotheses_of_rows(n, K))
    ga64, gb64 = torch.autograd.grad(y64.square().sum(), (a64, b64))
    torch.testing.assert_close(y.double().cpu(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_a.double().cpu(), ga64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_b.double().cpu(), gb64, rtol=1e-4, atol=1e-4)


def test_auto_takes_cublas_for_shared_input_forward_and_backward(monkeypatch):
    """On Hopper, fp16, rows past FUSED_MIN_ROWS: distinct rows take the fused GEMM, shared input
    never does (neither its K-output forward nor its backward's dx), as measured faster."""
    monkeypatch.setattr(mll, "_device_facts", lambda device: (132, 9))
    monkeypatch.setattr(mll, "FUSED_MIN_ROWS", 8)
    fused_gemms = []
    launch_gemm_expand = mll._launch_gemm_expand
    monkeypatch.setattr(mll, "_launch_gemm_expand",
                        lambda x, *args, **kwargs: (fused_gemms.append(x is not None), launch_gemm_expand(x, *args,
                                                                                                          **kwargs))[1])
    K, n = 3, mll.DECODE_AUTO_MAX_ROWS + 8
    x, w, _, a, b, s = make_inputs(n, (), 32, 16, 4, K, torch.float16, TRITON_DEVICE)
    for shared, rows in ((True, n), (False, n - n % K)):
        fused_gemms.clear()
        leaves = [t.detach().requires_grad_() for t in (x[:rows], a, b)]
        y = multi_lora_linear(leaves[0], w, None, leaves[1], leaves[2], s, num_hypotheses=K, shared_input=shared,
                              backend="triton")
        y.float().sum().backward()
        assert any(fused_gemms) != shared, (shared, fused_gemms)


def test_decode_gpu_config_takes_the_splits_nearest_two_programs_per_sm(monkeypatch):
    """On a GPU the decode split-K takes the number of d_in splits nearest to two programs per SM
    (the H200 sweep's best): 65 or 68 column tiles of 64 at d = 4096 on 132 SMs -> 4 splits of 1024
    (5, rounded up, measured slower); a single column tile -> d_in in steps of two K-steps."""
    asked = []
    monkeypatch.setattr(mll, "_device_facts", lambda device: asked.append(device) or (132, 9))
    for columns, splits in [(4096 + 40, 4), (4096 + 64, 4), (4096 + 256, 4), (2 * 4096, 2), (64, 16)]:
        bm, bn, bk, d_split = mll._decode_config(40, 4096, columns, 2, torch.device("cuda", 1))
        assert asked[-1] == torch.device("cuda", 1)  # the inputs' GPU, not the current one
        assert (bm, bn, bk) == (64, mll.DECODE_GPU_BN, 128)
        assert mll.cdiv(4096, d_split) == splits and d_split % bk == 0, columns


@pytest.mark.parametrize("capability, pdl", [(9, True), (8, False)])
def test_decode_finish_is_a_programmatic_dependent_launch_on_hopper(monkeypatch, capability, pdl):
    """On Hopper the finish kernel is launched as the partial kernel's programmatic dependent
    (launch_pdl) and both kernels take their grid-dependency instructions (GDC): the partial kernel
    lets it launch, the finish kernel waits for the partial grid before reading the workspace.
    Before Hopper, on the CPU (the interpreter has no such instructions) or with DECODE_PDL off:
    two plain launches. Launches recorded on meta tensors (the launchers treat them as a GPU's)."""
    monkeypatch.setattr(mll, "_device_facts", lambda device: (132, capability))
    launches = []
    monkeypatch.setattr(mll, "launch", lambda kernel, grid, *args, **kwargs: launches.append(kwargs))
    meta = torch.device("meta")
    x, w = torch.empty(40, 256, dtype=torch.bfloat16, device=meta), torch.empty(512, 256, dtype=torch.bfloat16,
                                                                                    device=meta)
    a, b = torch.empty(5, 8, 256, dtype=torch.bfloat16, device=meta), torch.empty(5, 512, 8, dtype=torch.bfloat16,
                                                                                  device=meta)
    s = torch.empty(5, device=meta)
    for enabled in (True, False):
        monkeypatch.setattr(mll, "DECODE_PDL", enabled)
        launches.clear()
        mll._launch_decode(x, w, None, a, b, s, None, 8)
        partial, finish = launches
        expected = pdl and enabled
        assert partial["GDC"] == finish["GDC"] == finish["launch_pdl"] == expected
        assert "launch_pdl" not in partial  # the partial kernel waits for its predecessors as usual
    launches.clear()
    x_cpu, w_cpu, a_cpu, b_cpu = (torch.zeros(t.shape, dtype=torch.float32) for t in (x, w, a, b))
    mll._launch_decode(x_cpu, w_cpu, None, a_cpu, b_cpu, torch.ones(5), None, 8)
    assert [kwargs["GDC"] for kwargs in launches] == [False, False]


def test_grad_B_rounds_once_with_the_fp32_output_gemm(monkeypatch):
    """Where torch has the fp32-output GEMM (CUDA), dB_k = s_k (dy^T S_bd) is scaled in fp32 and
    rounded once to fp16: within half an ulp (+ the fp32 sums' error) of the value formed from the
    same fp16 dy and S_bd in fp64. The CPU has no such GEMM, so it is emulated here by an fp32
    product; without it dB is rounded twice (product, then scaled)."""
    emulate_fp32_output_gemms(monkeypatch, mll)
    torch.manual_seed(0)
    num_hyp, r, m, d_out = 3, 4, 64, 48
    shrink_bd = (torch.randn(m, num_hyp * r) * 3).half()
    grad_y = (torch.randn(m, d_out) * 3).half()
    scaling = torch.tensor([0.37, 1.9, 5.3])
    lora_A, lora_B = torch.empty(num_hyp, r, 8).half(), torch.empty(num_hyp, d_out, r).half()
    _, grad_B = mll._lora_weight_grads(torch.zeros(m, num_hyp * r).half(), shrink_bd, torch.zeros(m, 8).half(),
                                       grad_y, scaling, lora_A, lora_B)
    exact = (shrink_bd.double().t() @ grad_y.double()).view(num_hyp, r, d_out).transpose(1, 2)
    exact = exact * scaling.double()[:, None, None]
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp(min=2.0**-14)  # one ulp of each value, at most
    assert ((grad_B.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()


_BK = mll._gemm_configs()[0].kwargs["BK"]  # the fused GEMM's K-step: 32 in the interpreter, 64 on the GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_hyp, r, expect_tma", [
    (3, _BK // 4, True),  # K*r = 3/4 BK: 16-bit operands take the expand in one straight-line step
    (4, _BK // 4, True),  # K*r = BK: still one step
    (3, _BK // 2, True),  # K*r = 1.5 BK: two K-steps of the expand loop, the second one partial
    (3, 3, False),  # K*r*2 bytes not a multiple of 16: no TMA, the per-hypothesis epilogue
])
def test_fused_path_loads_expand_through_tma_when_aligned(monkeypatch, num_hyp, r, expect_tma, dtype):
    """S and E_all rows 16-byte aligned: they go through TMA descriptors as extra K-steps (for 16-bit
    operands one straight-line step up to BK columns, a loop beyond; fp32 keeps the loop); otherwise
    the per-hypothesis epilogue. dx's E_all^T is lora_A's own rows, read in place (E_KN: no copy);
    the forward's B_all is a scaled copy. Each must give the reference's values."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "fused")
    calls = []
    launch = mll._launch_gemm_expand

    def spy(*args, **kwargs):
        expand = args[5]  # E: the operand the expand reads
        calls.append((kwargs.get("expand_tma", False), kwargs.get("e_kn", False), tuple(expand.shape)))
        return launch(*args, **kwargs)

    monkeypatch.setattr(mll, "_launch_gemm_expand", spy)
    x, w, b, a, bb, s = make_inputs(2 * num_hyp, (5,), 32, 16, r, num_hyp, dtype, TRITON_DEVICE)
    got = forward_and_grads(lambda *t: multi_lora_linear(*t, s, backend="triton"), x, w, b, a, bb)
    want = forward_and_grads(lambda *t: multi_lora_linear(*t, s, backend="reference"), x, w, b, a, bb)
    assert [call[:2] for call in calls] == [(expect_tma, False), (expect_tma, expect_tma)]  # forward, dx
    if expect_tma:  # dx's expand reads A_all (K*r, d_in), lora_A's rows; the forward B_all (d_out, K*r)
        assert calls[1][2] == (num_hyp * r, 32) and calls[0][2] == (16, num_hyp * r)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # fp16: both round the same fp32 sums, in other orders
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, r, shared, fused", [
    (torch.float32, 65, True, False),  # r_pad = 128: 512 bytes a row of the per-hypothesis expand
    (torch.float32, 33, True, True),  # r_pad = 64: 256 bytes
    (torch.float16, 129, False, False),  # K*r*2 bytes unaligned: the per-hypothesis expand, r_pad = 256
    (torch.float16, 65, False, True),  # r_pad = 128: 256 bytes
])
def test_fused_path_takes_cublas_where_the_per_hypothesis_expand_is_too_wide(monkeypatch, dtype, r, shared, fused):
    """The fused GEMM's per-hypothesis expand (shared input's K outputs, S rows not 16-byte aligned)
    has no tile configuration within Hopper's shared memory past 256 bytes of r_pad a row
    (tests/sm90_compile.py): there LORAMCL_MULTI_LORA_PATH=fused runs the cublas path's GEMMs,
    with the reference's values."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "fused")
    fused_launches = []
    launch = mll._launch_gemm_expand
    monkeypatch.setattr(mll, "_launch_gemm_expand", lambda x, *a, **k: (fused_launches.append(x is not None),
                                                                         launch(x, *a, **k))[1])
    num_hyp = 3
    x, w, b, a, bb, s = make_inputs(num_hyp if shared else 2 * num_hyp, (5,), 32, 16, r, num_hyp, dtype,
                                    TRITON_DEVICE)
    got = forward_and_grads(lambda *t: multi_lora_linear(*t, s, shared_input=shared, backend="triton"),
                            x, w, b, a, bb)
    want = forward_and_grads(lambda *t: multi_lora_linear(*t, s, shared_input=shared, backend="reference"),
                             x, w, b, a, bb)
    assert (True in fused_launches) == fused, fused_launches  # a launch with x: the fused GEMM
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, d_out, aligned", [
    (torch.float16, 40, True),  # 80-byte rows; 40 = one full and one partial 32-column tile in the interpreter
    (torch.float16, 36, False),  # 72-byte rows: the forward's masked pointer store (dy's rows: dx on cuBLAS)
    (torch.float32, 36, True),
])
def test_fused_gemm_stores_its_tiles_through_tma_when_aligned(monkeypatch, dtype, d_out, aligned):
    """The fused GEMM writes out through a TMA descriptor (two half tiles, clipped at the matrix's
    edges) where out's rows are 16-byte aligned, else through masked pointers: both give the same
    values, with partial row and column tiles (50 rows: one full and one partial 32-row tile)."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "fused")
    stores = []
    launch = mll.launch

    def spy(kernel, grid, *args, **kwargs):
        if "TMA_STORE" in kwargs:
            stores.append(kwargs["TMA_STORE"])
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(mll, "launch", spy)
    x, w, b, a, bb, s = make_inputs(10, (5,), 32, d_out, 4, 2, dtype, TRITON_DEVICE)
    results = {}
    for tma_store in (True, False):
        monkeypatch.setattr(mll, "GEMM_TMA_STORE", tma_store)
        stores.clear()
        results[tma_store] = forward_and_grads(lambda *t: multi_lora_linear(*t, s, backend="triton"), x, w, b, a, bb)
        # the forward's GEMM, and with aligned rows the backward's dx (32 columns)
        assert stores == ([tma_store] * 2 if aligned else [False]), stores
    want = forward_and_grads(lambda *t: multi_lora_linear(*t, s, backend="reference"), x, w, b, a, bb)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for tma, pointers, reference in zip(results[True], results[False], want):
        assert torch.equal(tma, pointers)
        torch.testing.assert_close(tma, reference, rtol=tol, atol=tol)


def test_triton_is_deterministic(triton_path):
    x, w, b, a, bb, s = make_inputs(6, (5,), 32, 32, 4, 3, torch.float32, TRITON_DEVICE)
    runs = [forward_and_grads(lambda *t: multi_lora_linear(*t, s, backend="triton"), x, w, b, a, bb)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("tokens, shared, expect_runs", [
    (20, False, True),  # runs of 20 rows: per-run tiles (16 rows on the CPU)
    (4, False, False),  # runs shorter than a tile: every block, masked
    (20, True, False),  # shared input keeps every block of every row
])
def test_shrink_per_run_tiles_when_runs_cover_a_tile(monkeypatch, tokens, shared, expect_runs):
    """Block-diagonal shrinks whose runs of rows (one hypothesis each) span a tile read only their
    hypothesis's P_k; the forward and backward shrinks both take that path, and agree with the
    reference (the oracle cases above check the values in every layout)."""
    seen = []
    real_launch = mll.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        if kernel is mll._shrink_kernel:
            seen.append(kwargs["RUNS"])
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(mll, "launch", recording_launch)
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "cublas")
    x, w, b, a, bb, s = make_inputs(6 if not shared else 2, (tokens,), 16, 8, 3, 3, torch.float32, TRITON_DEVICE)
    fn = lambda *t, backend: multi_lora_linear(*t, s, shared_input=shared, backend=backend)  # noqa: E731
    got = forward_and_grads(lambda *t: fn(*t, backend="triton"), x, w, b, a, bb)
    want = forward_and_grads(lambda *t: fn(*t, backend="reference"), x, w, b, a, bb)
    assert seen == [expect_runs] * (1 if shared else 2)  # the shared backward forms dS by bmm
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_shrink_kernel_tiles_many_hypotheses():
    """K * R_PAD beyond one program's column tile, explicit ids with -1, and the dense mode."""
    num_hyp, r, d, m = 20, 3, 24, 37
    x = torch.randn(m, d, device=TRITON_DEVICE)
    lora_A = torch.randn(num_hyp, r, d, device=TRITON_DEVICE)
    ids = torch.randint(-1, num_hyp, (m,), device=TRITON_DEVICE)
    full = (x.double() @ lora_A.double().reshape(-1, d).t()).view(m, num_hyp, r)
    keep = (ids[:, None] == torch.arange(num_hyp, device=TRITON_DEVICE)).double()
    want = (full * keep[:, :, None]).reshape(m, -1)
    got = mll._launch_shrink(x, lora_A, None, ids, 1, block_diag=True)
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    by_layout = mll._launch_shrink(x, lora_A, None, None, 2, block_diag=True)  # h = (m // 2) % K
    keep = ((torch.arange(m, device=TRITON_DEVICE) // 2 % num_hyp)[:, None] ==
            torch.arange(num_hyp, device=TRITON_DEVICE)).double()
    torch.testing.assert_close(by_layout.double().cpu(), (full * keep[:, :, None]).reshape(m, -1).cpu(),
                               rtol=1e-5, atol=1e-5)
    dense = mll._launch_shrink(x, lora_A, None, None, 1, block_diag=False)
    torch.testing.assert_close(dense.double().cpu(), full.reshape(m, -1).cpu(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# gradcheck (fp64, reference), opcheck, torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_reference_fp64(shared):
    x, w, b, a, bb, s = make_inputs(4, (2,), 6, 5, 2, 2, torch.float64, "cpu")
    ids = None if shared else torch.tensor([1, -1, 0, 1])
    leaves = [t.requires_grad_() for t in (x, w, b, a, bb)]

    def fn(*t):
        return multi_lora_linear(*t, s, hypothesis_ids=ids, shared_input=shared, backend="reference")

    assert torch.autograd.gradcheck(fn, leaves)
    if not shared:  # LoRA dropout, its seed fixed: the registered op is then a deterministic function
        seed = torch.tensor([77])

        def dropped(x, w, b, a, bb):
            y, _ = mll._multi_lora_linear_op(x.reshape(-1, 6), w, b, a, bb, s.double(), ids, 2, seed, 0.4,
                                             "reference")
            return y

        assert torch.autograd.gradcheck(dropped, leaves)


def _op_samples(backend, device):
    x, w, b, a, bb, s = make_inputs(6, (), 16, 16, 4, 3, torch.float32, device)
    ids = torch.tensor([0, 1, 2, -1, 1, 0], device=device)
    s = s.float()
    for t in (x, a, bb):
        t.requires_grad_()
    yield mll._multi_lora_linear_op, (x, w, b, a, bb, s, ids, 1, None, 0.0, backend)
    yield mll._multi_lora_linear_op, (x, None, None, a, bb, s, None, 2, None, 0.0, backend)
    seed = torch.tensor([11], device=device)  # LoRA dropout
    yield mll._multi_lora_linear_op, (x, w, b, a, bb, s, ids, 1, seed, 0.3, backend)
    yield mll._multi_lora_linear_shared_op, (x, w, b, a, bb, s, 2, backend)
    # the backward ops, which the registered autograd formulas call (and torch.compile traces)
    frozen = [t.detach() for t in (x, a, bb)]
    grad_y = torch.randn(6, 16, device=device)
    for ids_, dropout in ((ids, (None, 0.0)), (None, (seed, 0.3))):
        _, shrink_bd = mll._multi_lora_linear_op(frozen[0], w, b, frozen[1], frozen[2], s, ids_, 1, *dropout, backend)
        yield mll._multi_lora_linear_backward_op, (grad_y, frozen[0], w, frozen[1], frozen[2], s, ids_, 1, shrink_bd,
                                                   *dropout, backend)
    _, shrink_all = mll._multi_lora_linear_shared_op(frozen[0], w, b, frozen[1], frozen[2], s, 2, backend)
    yield mll._multi_lora_linear_shared_backward_op, (torch.randn(18, 16, device=device), frozen[0], w, frozen[1],
                                                      frozen[2], s, shrink_all, 2, backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    for op, args in _op_samples(backend, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, shared):
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(6, (3,), 16, 16, 4, 3, torch.float32, device)

    def fn(x, w, b, a, bb):
        return multi_lora_linear(x, w, b, a, bb, s, shared_input=shared, backend=backend)

    torch._dynamo.reset()
    eager = forward_and_grads(fn, x, w, b, a, bb)
    compiled = forward_and_grads(torch.compile(fn, fullgraph=True), x, w, b, a, bb)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_changing_float_scaling_does_not_recompile(backend):
    from torch._dynamo.utils import counters

    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, _ = make_inputs(6, (3,), 16, 16, 4, 3, torch.float32, device)

    def fn(x, scaling):
        return multi_lora_linear(x, w, b, a, bb, scaling, backend=backend)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for i in range(10):
        torch.testing.assert_close(compiled(x, 0.25 * (i + 1)), fn(x, 0.25 * (i + 1)), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dropout_under_torch_compile_and_its_seeds(backend):
    """LoRA dropout draws one seed from torch's generator per call: the same manual_seed gives the
    same result eagerly and under torch.compile (aot_eager), another seed another mask."""
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(6, (3,), 16, 16, 4, 3, torch.float32, device)

    def fn(x, w, b, a, bb):
        return multi_lora_linear(x, w, b, a, bb, s, lora_dropout=0.3, backend=backend)

    torch._dynamo.reset()
    torch.manual_seed(5)
    eager = forward_and_grads(fn, x, w, b, a, bb)
    torch.manual_seed(5)
    compiled = forward_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, w, b, a, bb)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    without = multi_lora_linear(x, w, b, a, bb, s, backend=backend)
    torch.manual_seed(6)
    other = multi_lora_linear(x, w, b, a, bb, s, lora_dropout=0.3, backend=backend)
    assert (eager[0] - without).abs().max() > 1e-3 and (other - eager[0]).abs().max() > 1e-3
    torch.manual_seed(5)
    assert torch.equal(multi_lora_linear(x, w, b, a, bb, s, lora_dropout=0.3, backend=backend), eager[0])
    assert torch.equal(multi_lora_linear(x, w, b, a, bb, s, lora_dropout=0.0, backend=backend), without)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_triton_equals_reference_and_keeps_1_minus_p(p):
    seed = torch.tensor([987654321], device=TRITON_DEVICE)
    mask = mll.dropout_keep_mask(seed, 300, 1000, p)
    assert abs(mask.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5
    ones = torch.ones(37, 300, device=TRITON_DEVICE)
    dropped = mll._launch_dropout_rows(ones, (seed, p))
    assert torch.equal(dropped != 0, mll.dropout_keep_mask(seed, 37, 300, p))
    torch.testing.assert_close(dropped[dropped != 0], torch.full_like(dropped[dropped != 0], 1 / (1 - p)))
    assert not torch.equal(mll.dropout_keep_mask(seed + 1, 37, 300, p), dropped != 0)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_makes_no_zeros_for_the_saved_shrink(backend, shared):
    """S (the forward's second output, kept for the backward) has no gradient: the backward must
    not be handed an (M, K*r) zero tensor for it."""
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(6, (3,), 16, 12, 4, 3, torch.float32, device)
    x, a, bb = (t.clone().requires_grad_(True) for t in (x, a, bb))
    y = multi_lora_linear(x, w, b, a, bb, s, shared_input=shared, backend=backend)
    with ZerosRecorder() as zeros:
        grads = torch.autograd.grad(y, (x, a, bb), torch.ones_like(y))
    assert zeros.shapes == [] and all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eager_path_equals_registered_op(backend, shared):
    """Eagerly the public function skips the dispatcher (autograd.Function, or a direct call when
    nothing needs a gradient); it must give bit-identical outputs and gradients to the registered op."""
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(6, (3,), 16, 12, 4, 3, torch.float32, device)
    x2 = x.reshape(-1, 16)

    def via_public(x2, w, b, a, bb):
        return multi_lora_linear(x2.view(6, 3, 16), w, b, a, bb, s, shared_input=shared, backend=backend)

    def via_op(x2, w, b, a, bb):
        if shared:
            y, _ = mll._multi_lora_linear_shared_op(x2, w, b, a, bb, s.float(), 6, backend)
            return y.view(18, 3, 12)
        y, _ = mll._multi_lora_linear_op(x2, w, b, a, bb, s.float(), None, 3, None, 0.0, backend)
        return y.view(6, 3, 12)

    public = forward_and_grads(via_public, x2, w, b, a, bb)
    op = forward_and_grads(via_op, x2, w, b, a, bb)
    assert len(public) == len(op) == 6
    for p_, o in zip(public, op):
        assert torch.equal(p_, o)
    with torch.no_grad():
        y = via_public(x2, w, b, a, bb)
    assert y.grad_fn is None and torch.equal(y, public[0])


def test_float_scaling_is_cached_and_usable_after_inference_mode():
    x, w, b, a, bb, _ = make_inputs(4, (), 8, 8, 2, 2, torch.float32, "cpu")
    with torch.inference_mode():  # the first call may come from generation
        y_inf = multi_lora_linear(x, w, b, a, bb, 0.75 + 1e-3, backend="reference")
    first = mll._scaling_vector(0.75 + 1e-3, 2, x)
    assert first is mll._scaling_vector(0.75 + 1e-3, 2, x)
    assert not first.is_inference() and torch.equal(first, torch.full((2,), 0.75 + 1e-3))
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    y = multi_lora_linear(leaves[0], w, b, leaves[1], leaves[2], 0.75 + 1e-3, backend="reference")
    y.sum().backward()  # the cached vector is saved for backward: it must not be an inference tensor
    assert torch.equal(y.detach(), y_inf)
    expected = naive(x.double(), w.double(), b.double(), a.double(), bb.double(),
                     torch.full((2,), 0.75 + 1e-3, dtype=torch.float64), hypotheses_of_rows(4, 2))
    torch.testing.assert_close(y.detach().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "cublas", "decode"])
@pytest.mark.parametrize("routing", ["layout", "ids", "shared", "dropout"])
def test_no_host_reads_in_forward_or_backward(path, routing, monkeypatch):
    """No tensor value reaches the host from Python in a fwd+bwd (item, tolist, int(), bool(), ...
    counted, the kernel launches stubbed out), once explicit ids have been checked (once per ids
    tensor). Syncs inside torch ops (nonzero) are the GPU tests' CUDA sync-debug check's."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", path)
    monkeypatch.setattr(mll, "launch", lambda *args, **kwargs: None)
    x, w, b, a, bb, _ = make_inputs(6, (4,), 16, 16, 4, 3, torch.float16, TRITON_DEVICE)
    ids = torch.tensor([2, 0, -1, 1, 0, 2], device=TRITON_DEVICE) if routing == "ids" else None
    kw = dict(hypothesis_ids=ids, shared_input=routing == "shared", lora_dropout=0.2 if routing == "dropout" else 0.0,
              backend="triton")
    leaves = [t.detach().requires_grad_() for t in (x, a, bb)]

    def step():
        multi_lora_linear(leaves[0], w, b, leaves[1], leaves[2], 0.5, **kw).float().sum().backward()

    step()  # the ids' range check reads them once
    reads = []
    for name in HOST_READS + ("numpy",):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *args, _name=name, _original=original, **kwargs: (
                                reads.append(_name), _original(self, *args, **kwargs))[1])
    step()
    monkeypatch.undo()
    assert reads == []


def test_fake_tensor_tracing_takes_the_registered_op_and_leaves_no_fake_tensor_behind():
    """Under a dispatch mode (FakeTensorMode, make_fx) the public function goes through the
    registered op and its fake implementation; the float-scaling cache is not written there, so a
    later eager call with the same scaling gets a real tensor (a cached fake one broke every call)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, b, a, bb, _ = make_inputs(4, (3,), 8, 6, 2, 2, torch.float32, "cpu")
    scaling = 0.5 + 1e-4  # not used by any other test: not in the cache yet
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) for t in (x, w, b, a, bb)]
        y_fake = multi_lora_linear(*fake_args, scaling)
        y_shared = multi_lora_linear(*fake_args, scaling, shared_input=True)
    assert type(y_fake).__name__ == "FakeTensor" and y_fake.shape == (4, 3, 6)
    assert y_shared.shape == (8, 3, 6)
    y = multi_lora_linear(x, w, b, a, bb, scaling, backend="reference")
    assert type(y) is torch.Tensor
    expected = naive(x.double(), w.double(), b.double(), a.double(), bb.double(),
                     torch.full((2,), scaling, dtype=torch.float64), hypotheses_of_rows(4, 2))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    graph = make_fx(lambda *t: multi_lora_linear(*t, scaling), tracing_mode="fake")(x, w, b, a, bb)
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.loramcl.multi_lora_linear.default in targets


def test_scaling_cache_is_bounded_and_keeps_what_it_cached():
    """A schedule that changes the scaling every step fills the cache; past it new vectors are not
    cached, and the cached ones stay alive (a CUDA graph captured with one may still read it)."""
    import weakref

    x = torch.zeros(2, 4)
    mll._SCALING_VECTORS.clear()
    first = weakref.ref(mll._scaling_vector(0.5, 2, x))
    for i in range(mll._MAX_SCALING_VECTORS + 5):
        assert mll._scaling_vector(1.0 + i * 1e-3, 2, x)[1].item() == pytest.approx(1.0 + i * 1e-3)
    assert len(mll._SCALING_VECTORS) == mll._MAX_SCALING_VECTORS
    assert first() is not None and first() is mll._scaling_vector(0.5, 2, x)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_double_backward_raises(backend, shared):
    """create_graph=True would give a gradient without the op's part of its graph (a gradient
    penalty silently missing it): refused; a plain gradient is unchanged."""
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(4, (3,), 8, 6, 2, 2, torch.float32, device)
    for t in (x, a, bb):
        t.requires_grad_()
    y = multi_lora_linear(x, w, b, a, bb, s, shared_input=shared, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    y = multi_lora_linear(x, w, b, a, bb, s, shared_input=shared, backend=backend)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x)
    args64 = [t.detach().double().cpu() for t in (x, w, b, a, bb, s)]
    x64 = args64[0].requires_grad_()
    multi_lora_linear(*args64, shared_input=shared, backend="reference").square().sum().backward()
    torch.testing.assert_close(grad_x.double().cpu(), x64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transform", ["vmap", "grad", "functionalize"])
def test_torch_func_transforms_raise_a_clear_error(transform):
    x, w, b, a, bb, s = make_inputs(4, (3,), 8, 6, 2, 2, torch.float32, "cpu")

    def f(x):
        return multi_lora_linear(x, w, b, a, bb, s, backend="reference").sum()

    wrapped = {"vmap": torch.func.vmap(f), "grad": torch.func.grad(f), "functionalize": torch.func.functionalize(f)}
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        wrapped[transform](x.unsqueeze(0) if transform == "vmap" else x)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.bfloat16), ("triton", torch.float16)])
def test_autocast_runs_in_the_autocast_dtype(backend, dtype):
    """Under autocast fp32 operands (fp32 master adapters included) run in the autocast dtype, as
    F.linear does: the same values and gradients as casting them by hand, also when backward runs
    inside the autocast region."""
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(6, (3,), 16, 12, 4, 3, torch.float32, device)

    def by_hand(x, w, b, a, bb):
        return multi_lora_linear(x.to(dtype), w.to(dtype), b.to(dtype), a.to(dtype), bb.to(dtype), s,
                                 backend=backend)

    def autocast(x, w, b, a, bb):
        with torch.autocast(torch.device(device).type, dtype=dtype):
            return multi_lora_linear(x, w, b, a, bb, s, backend=backend)

    def autocast_with_backward_inside(x, w, b, a, bb):
        with torch.autocast(torch.device(device).type, dtype=dtype):
            y = multi_lora_linear(x, w, b, a, bb, s, backend=backend)
            grads = torch.autograd.grad(y, (x, a, bb), torch.ones_like(y))
        return y, grads

    expected = forward_and_grads(by_hand, x, w, b, a, bb)
    got = forward_and_grads(autocast, x, w, b, a, bb)
    assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[1:])
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    y, grads_inside = autocast_with_backward_inside(leaves[0], w, b, leaves[1], leaves[2])
    grads_by_hand = torch.autograd.grad(by_hand(leaves[0], w, b, leaves[1], leaves[2]), leaves,
                                        torch.ones_like(y))
    for e, g in zip(grads_by_hand, grads_inside):
        assert torch.equal(e, g)


def test_float64_operands_are_not_autocast():
    """Autocast leaves float64 tensors alone (F.linear under CPU bf16 autocast stays fp64)."""
    x, w, b, a, bb, s = make_inputs(6, (3,), 16, 12, 4, 3, torch.float64, "cpu")
    expected = multi_lora_linear(x, w, b, a, bb, s, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = multi_lora_linear(x, w, b, a, bb, s, backend="reference")
    assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_meta_tensors_on_the_reference_backend():
    """Shape inference on meta tensors (e.g. building a model before loading it): no autocast on meta."""
    x, w, b, a, bb, s = make_inputs(6, (3,), 16, 12, 4, 3, torch.float32, "cpu")
    real = multi_lora_linear(x, w, b, a, bb, s, backend="reference")
    meta = [t.to("meta") for t in (x, w, b, a, bb)]
    y = multi_lora_linear(*meta, s.to("meta"), backend="reference")
    assert y.device.type == "meta" and y.shape == real.shape and y.dtype == real.dtype


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hypothesis_ids_made_in_inference_mode(backend):
    """Inference tensors have no version counter: their values are checked on every call."""
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(4, (2,), 8, 6, 2, 2, torch.float32, device)
    with torch.inference_mode():
        ids, bad = torch.tensor([0, 1, -1, 1], device=device), torch.tensor([0, 5, -1, 1], device=device)
        y = multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids, backend=backend)
        with pytest.raises(ValueError, match=r"\[-1, K\)"):
            multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=bad, backend=backend)
    expected = multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids.clone(), backend=backend)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids, backend=backend), expected,
                               rtol=0, atol=0)


def test_out_of_range_ids_assert_under_torch_compile():
    """Compiled graphs cannot read the ids on the host: a device-side assert refuses bad values."""
    x, w, b, a, bb, s = make_inputs(4, (2,), 8, 6, 2, 2, torch.float32, "cpu")
    torch._dynamo.reset()
    fn = torch.compile(lambda x, ids: multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids, backend="reference"),
                       backend="aot_eager", fullgraph=True)
    good = torch.tensor([0, 1, -1, 1])
    torch.testing.assert_close(fn(x, good), multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=good,
                                                              backend="reference"))
    with pytest.raises(RuntimeError, match=r"hypothesis_ids must lie in \[-1, K\)"):
        fn(x, torch.tensor([0, 5, -3, 1]))
    for dtype in (torch.uint8, torch.uint32):  # compared in int64: -1 wrapped to 255 refused uint8 ids
        torch.testing.assert_close(fn(x, good.clamp(min=0).to(dtype)),
                                   multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=good.clamp(min=0)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unsigned_hypothesis_ids(backend):
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    x, w, b, a, bb, s = make_inputs(6, (2,), 8, 6, 2, 3, torch.float32, device)
    ids = torch.tensor([2, 0, 1, 1, 0, 2], device=device)
    expected = naive(x.double().cpu(), w.double().cpu(), b.double().cpu(), a.double().cpu(), bb.double().cpu(),
                     s.double().cpu(), ids.cpu())
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.int16):
        y = multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids.to(dtype), backend=backend)
        torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input and backend selection
# ----------------------------------------------------------------------------------------------


def _good(**over):
    x, w, b, a, bb, s = make_inputs(6, (2,), 8, 4, 2, 3, torch.float32, "cpu")
    args = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=s)
    kwargs = {}
    for k, v in over.items():
        (args if k in args else kwargs)[k] = v
    return args, kwargs


@pytest.mark.parametrize("over, err, match", [
    (dict(x=torch.randn(6, 2, 7)), ValueError, "lora_A must have shape"),
    (dict(x=torch.randn(6)), ValueError, "x must have shape"),
    (dict(weight=torch.randn(5, 8)), ValueError, "weight must have shape"),
    (dict(bias=torch.randn(3)), ValueError, "bias must have shape"),
    (dict(lora_A=torch.randn(2, 2, 8)), ValueError, "lora_B must have shape"),
    (dict(lora_A=torch.randn(3, 0, 8), lora_B=torch.randn(3, 4, 0)), ValueError, "rank r must be >= 1"),
    (dict(lora_B=torch.randn(3, 4, 5)), ValueError, "lora_B must have shape"),
    (dict(num_hypotheses=4), ValueError, "num_hypotheses=4"),
    (dict(num_hypotheses="3"), TypeError, "num_hypotheses must be an int, got str"),
    (dict(x=torch.randn(5, 2, 8)), ValueError, "divisible by K"),
    (dict(inner=4), ValueError, "divisible by K\\*inner"),
    (dict(layout="hypothesis_major", x=torch.randn(4, 2, 8)), ValueError, "divisible by K = 3"),
    (dict(layout="sideways"), ValueError, "layout must be one of"),
    (dict(weight=torch.randn(4, 8, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(x=torch.randint(0, 3, (6, 2, 8))), TypeError, "floating-point"),
    (dict(hypothesis_ids=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, "\\[-1, K\\)"),
    (dict(hypothesis_ids=torch.tensor([0, 1, -2, 0, 0, 1])), ValueError, "\\[-1, K\\)"),
    (dict(hypothesis_ids=torch.tensor([0, 1, 2])), ValueError, "shape \\(N,\\) = \\(6,\\), got \\(3,\\)"),
    (dict(hypothesis_ids=torch.zeros(6)), TypeError, "integers"),
    (dict(hypothesis_ids=torch.zeros(6, dtype=torch.long), shared_input=True), ValueError, "shared_input"),
    (dict(scaling=torch.ones(2)), ValueError, "scaling must be"),
    (dict(scaling=torch.ones(3, requires_grad=True)), ValueError, "not differentiated"),
    (dict(scaling="big"), TypeError, "scaling must be"),
    (dict(scaling=True), TypeError, "scaling must be"),
    (dict(scaling=torch.ones(3, dtype=torch.complex64)), TypeError, "real numbers"),
    (dict(scaling=torch.ones(3, dtype=torch.bool)), TypeError, "real numbers"),
    (dict(inner=True), ValueError, "inner must be a positive int"),
    (dict(hypothesis_ids=[0, 1, 2, 0, 1, 2]), TypeError, "hypothesis_ids must be an integer tensor"),
    (dict(backend="magic"), ValueError, "backend must be one of"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout must be"),
    (dict(lora_dropout=-0.1), ValueError, "lora_dropout must be"),
    (dict(lora_dropout=0.1, shared_input=True), ValueError, "lora_dropout with shared_input"),
    (dict(lora_dropout="0.1"), ValueError, "lora_dropout must be"),
    (dict(x=[[0.0] * 8] * 6), TypeError, "x must be a torch.Tensor"),
    (dict(shared_input="False"), TypeError, "shared_input must be True or False"),  # a truthy string
    (dict(shared_input=2), TypeError, "shared_input must be True or False"),
    (dict(hypothesis_ids=torch.zeros(6, dtype=torch.uint64)), TypeError, "uint64"),
    (dict(hypothesis_ids=torch.tensor([0, 1, 2, 3, 0, 1], dtype=torch.uint32)), ValueError, "\\[-1, K\\)"),
    # explicit ids give each row's hypothesis: a layout or inner next to them would be ignored
    (dict(hypothesis_ids=torch.zeros(6, dtype=torch.long), layout="hypothesis_major"), ValueError,
     "leave layout and inner at their defaults"),
    (dict(hypothesis_ids=torch.zeros(6, dtype=torch.long), inner=2), ValueError,
     "leave layout and inner at their defaults"),
])
def test_bad_input_raises(over, err, match):
    args, kwargs = _good(**over)
    with pytest.raises(err, match=match):
        multi_lora_linear(**args, **kwargs)


def test_shared_input_none_is_false():
    args, kwargs = _good()
    assert torch.equal(multi_lora_linear(**args, shared_input=None), multi_lora_linear(**args))


def test_numpy_integers_for_num_hypotheses_and_inner():
    np = pytest.importorskip("numpy")
    args, kwargs = _good(x=torch.randn(12, 2, 8))
    expected = multi_lora_linear(**args, num_hypotheses=3, inner=2)
    got = multi_lora_linear(**args, num_hypotheses=np.int64(3), inner=np.int32(2))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scaling_as_a_float_a_0_dim_tensor_or_a_k_vector(backend):
    """A float, a 0-dim tensor (of another dtype) and the (K,) vector of that value give the same bits."""
    x, w, b, a, bb, _ = make_inputs(6, (2,), 8, 4, 2, 3, torch.float32, "cpu")
    y = [multi_lora_linear(x, w, b, a, bb, scaling, backend=backend)
         for scaling in (0.75, torch.tensor(0.75, dtype=torch.float64), torch.full((3,), 0.75))]
    assert torch.equal(y[0], y[1]) and torch.equal(y[0], y[2])
    expected = naive(x.double(), w.double(), b.double(), a.double(), bb.double(),
                     torch.full((3,), 0.75, dtype=torch.float64), hypotheses_of_rows(6, 3))
    torch.testing.assert_close(y[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_numpy_float_lora_dropout_is_a_float():
    """lora_dropout takes any real number (a numpy float from a config), as scaling does: the same
    mask and values as the Python float."""
    np = pytest.importorskip("numpy")
    args, kwargs = _good()
    torch.manual_seed(3)
    expected = multi_lora_linear(**args, lora_dropout=0.25)
    torch.manual_seed(3)
    got = multi_lora_linear(**args, lora_dropout=np.float32(0.25))
    assert torch.equal(got, expected)


def test_bf16_under_the_interpreter_is_refused_by_name_and_auto_keeps_the_reference(monkeypatch):
    """Triton's CPU interpreter multiplies bf16 tiles wrongly (a 16 x 16 tl.dot off by ~1e10 with
    triton 3.9): backend='triton' on bf16 CPU tensors raises and says why, instead of returning
    those numbers; auto (the reference on the CPU anyway) computes it. The reason is the backend
    resolution's, for the interpreter's bf16 only."""
    if not _backend.triton_interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    args, kwargs = _good()
    bf16 = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scaling" else v
            for k, v in args.items()}
    with pytest.raises(RuntimeError, match="interpreter computes bf16 matrix products wrongly"):
        multi_lora_linear(**bf16, backend="triton")
    monkeypatch.setenv("LORAMCL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="interpreter computes bf16"):
        multi_lora_linear(**bf16)
    monkeypatch.setenv("LORAMCL_BACKEND", "auto")
    assert torch.equal(multi_lora_linear(**bf16), multi_lora_linear(**bf16, backend="reference"))
    cpu = torch.device("cpu")
    assert "bf16" in _backend.unavailable_reason("triton", cpu, torch.bfloat16)
    assert _backend.unavailable_reason("triton", cpu, torch.float16) is None
    assert _backend.unavailable_reason("triton", torch.device("cuda"), torch.bfloat16) is None


def test_scaling_as_a_numpy_scalar_or_a_parameter_without_grad():
    """A numpy float scales like the Python float; a trainable (K,) scaling is refused only where a
    gradient could be asked of it (it is not differentiated), not under torch.no_grad."""
    np = pytest.importorskip("numpy")
    args, kwargs = _good()
    expected = multi_lora_linear(**{**args, "scaling": 0.5}, **kwargs)
    assert torch.equal(multi_lora_linear(**{**args, "scaling": np.float32(0.5)}, **kwargs), expected)
    trainable = torch.nn.Parameter(torch.full((3,), 0.5))
    with torch.no_grad():
        assert torch.equal(multi_lora_linear(**{**args, "scaling": trainable}, **kwargs), expected)


def test_hypothesis_ids_values_read_once_per_tensor(monkeypatch):
    """Checking ids reads them on the host (a sync): once per ids tensor and version, not per layer."""
    x, w, b, a, bb, s = make_inputs(6, (), 8, 4, 2, 3, torch.float32, "cpu")
    ids = torch.tensor([0, 1, 2, -1, 1, 0])
    reads = []
    real_min = torch.Tensor.min
    monkeypatch.setattr(torch.Tensor, "min", lambda self, *args, **kw: reads.append(1) or real_min(self, *args, **kw))
    y1 = multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids, backend="reference")
    y2 = multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids, backend="reference")
    assert len(reads) == 1 and torch.equal(y1, y2)
    expected = naive(x.double(), w.double(), b.double(), a.double(), bb.double(), s.double(),
                     hypotheses_of_rows(6, 3, ids=ids))
    torch.testing.assert_close(y1.double(), expected, rtol=1e-5, atol=1e-5)
    ids[3] = 3  # changed in place: its version moves on and the values are read again
    with pytest.raises(ValueError, match=r"hypothesis_ids must lie in \[-1, K\)"):
        multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=ids, backend="reference")
    with pytest.raises(ValueError, match=r"hypothesis_ids must lie in \[-1, K\)"):
        multi_lora_linear(x, w, b, a, bb, s, hypothesis_ids=torch.tensor([0, 1, 2, 5, 1, 0]), backend="reference")
    assert len(reads) == 3


@pytest.mark.parametrize("shared", [False, True], ids=["distinct", "shared"])
@pytest.mark.parametrize("shape", [(0, 5), (6, 0)], ids=["no_rows", "no_tokens"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_input(backend, shape, shared, triton_path):
    """An empty batch or zero tokens: an empty output of the right shape, zero adapter gradients."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, weight, bias, lora_A, lora_B, scaling = make_inputs(6, (5,), 16, 12, 3, 3, torch.float32, device)
    x = torch.randn(*shape, 16, device=device, requires_grad=True)
    lora_A.requires_grad_(True), lora_B.requires_grad_(True)
    y = multi_lora_linear(x, weight, bias, lora_A, lora_B, scaling, num_hypotheses=3, shared_input=shared,
                          backend=backend)
    assert y.shape == (shape[0] * (3 if shared else 1), shape[1], 12)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(lora_A.grad, torch.zeros_like(lora_A)) and torch.equal(lora_B.grad, torch.zeros_like(lora_B))


@pytest.mark.parametrize("shared", [False, True], ids=["distinct", "shared"])
@pytest.mark.parametrize("d_in, d_out", [(0, 5), (4, 0)], ids=["no_inputs", "no_outputs"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_feature_dims(backend, d_in, d_out, shared):
    """d_in = 0 gives the bias (as F.linear), d_out = 0 an empty output; gradients are zeros."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(6, 3, d_in, device=device, requires_grad=True)
    weight, bias = torch.randn(d_out, d_in, device=device), torch.randn(d_out, device=device)
    lora_A = torch.randn(3, 2, d_in, device=device, requires_grad=True)
    lora_B = torch.randn(3, d_out, 2, device=device, requires_grad=True)
    y = multi_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, shared_input=shared, backend=backend)
    rows = 18 if shared else 6
    assert y.shape == (rows, 3, d_out)
    torch.testing.assert_close(y, bias.expand(rows, 3, d_out), rtol=0, atol=0)
    y.sum().backward()
    for t in (x, lora_A, lora_B):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_device_mismatch_raises():
    args, kwargs = _good(weight=torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match="weight is on meta"):
        multi_lora_linear(**args, **kwargs)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LORAMCL_BACKEND", raising=False)
    assert _backend.resolve_backend(None, cpu) == "reference"  # auto keeps CPU users on PyTorch
    # auto on a GPU: the Triton kernels (the cuda extension is not built); decided by the device type
    assert _backend.resolve_backend(None, torch.device("cuda")) == "triton"
    # ... and its compute capability: Triton supports 8.0 and newer, so a V100 or T4 gets the reference
    monkeypatch.setattr(_backend, "_cuda_capability", lambda index: (7, 5))
    assert _backend.resolve_backend(None, torch.device("cuda", 0)) == "reference"
    with pytest.raises(RuntimeError, match="compute capability 8.0 and newer; cuda:0 has 7.5"):
        _backend.resolve_backend("triton", torch.device("cuda", 0))
    monkeypatch.setattr(_backend, "_cuda_capability", lambda index: (8, 6))
    assert _backend.resolve_backend(None, torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("LORAMCL_BACKEND", "reference")
    assert _backend.resolve_backend(None, cpu) == "reference"
    with pytest.raises(RuntimeError, match="'cuda' was requested but cannot run"):
        _backend.resolve_backend("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv("LORAMCL_BACKEND", "triton")
    args, _ = _good()
    y = multi_lora_linear(**args)  # env var selects triton (interpreter)
    ref = multi_lora_linear(**args, backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    x64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(TypeError, match="backend 'triton' supports"):
        multi_lora_linear(**x64, backend="triton")
    with pytest.raises(TypeError, match="backend 'triton' supports"):  # asked for by LORAMCL_BACKEND
        multi_lora_linear(**x64)
    monkeypatch.setenv("LORAMCL_BACKEND", "auto")
    torch.testing.assert_close(multi_lora_linear(**x64), multi_lora_linear(**x64, backend="reference"))


def test_env_report_lists_backends():
    from loramcl_kernels.env import describe

    text = describe()
    assert "torch" in text and "[cpu] auto -> reference" in text
    assert "reference available" in text
    assert "LORAMCL_MULTI_LORA_PATH=" in text and "LORAMCL_MCL_SOFT_BACKWARD=" in text


# ----------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at d = 4096, both paths, error within 2x plain PyTorch's
# ----------------------------------------------------------------------------------------------

GPU_CASES = [
    dict(n=5, tokens=(96,), d_in=4096, d_out=4096, r=8, num_hyp=5),
    dict(n=4, tokens=(64,), d_in=4096, d_out=4096, r=64, num_hyp=4, layout="hypothesis_major"),
    dict(n=2, tokens=(100,), d_in=4096, d_out=4096, r=16, num_hyp=4, shared=True),
    dict(n=15, tokens=(1,), d_in=4096, d_out=4096, r=8, num_hyp=5, inner=3),  # decode, beams
    dict(n=7, tokens=(33,), d_in=4096, d_out=1000, r=3, num_hyp=3, ids=[0, 2, -1, 1, 1, -1, 0]),
    dict(n=5, tokens=(96,), d_in=4096, d_out=4096, r=8, num_hyp=5, dropout=0.1),  # LoRA dropout (training)
    # the widest shrink tiles (r_pad = 128, 256) in runs of 64+ rows: B^T copied (r = 96), read in place (256)
    dict(n=2, tokens=(128,), d_in=4096, d_out=2048, r=96, num_hyp=2),
    dict(n=2, tokens=(64,), d_in=2048, d_out=4096, r=256, num_hyp=2),
]


def gpu_check(case, dtype, path, monkeypatch):
    """Oracle: fp64 on the GPU through the reference backend, itself checked against the row loop above."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", path)
    case = dict(case)
    n, tokens, d_in, d_out, r, num_hyp = (case.pop(k) for k in ("n", "tokens", "d_in", "d_out", "r", "num_hyp"))
    shared = case.get("shared", False)
    x, w, b, a, bb, s = make_inputs(n, tokens, d_in, d_out, r, num_hyp, dtype, "cuda")
    ids = case.get("ids")
    kwargs = dict(layout=case.get("layout", "batch_major"), inner=case.get("inner", 1), shared_input=shared,
                  hypothesis_ids=None if ids is None else torch.tensor(ids, device="cuda"))

    def run(backend, dt):
        def fn(*t):
            return multi_lora_linear(*t, s, backend=backend, **kwargs)
        return forward_and_grads(fn, *[t.to(dt) for t in (x, w, b, a, bb)])

    got = run("triton", dtype)
    oracle = run("reference", torch.float64)
    plain = _plain_torch(x, w, b, a, bb, s, n, num_hyp, kwargs)
    for name, g, o, p in zip(["y", "dx", "dW", "dbias", "dA", "dB"], got, oracle, plain):
        assert_within_budget(g, o, p, atol=1e-2 * o.abs().max().item() / 64, name=name)


def _plain_torch(x, w, b, a, bb, s, n, num_hyp, kwargs):
    """What a user writes today in the same dtype: gather each row's adapter, bmm-free einsum."""
    def fn(x, w, b, a, bb):
        if kwargs["shared_input"]:
            pairs = shared_source_rows(n, num_hyp, kwargs["layout"], kwargs["inner"])
            src = torch.tensor([p[0] for p in pairs], device=x.device)
            hyp = torch.tensor([p[1] for p in pairs], device=x.device)
            x = x[src]
        else:
            ids = kwargs["hypothesis_ids"]
            hyp = ids if ids is not None else torch.tensor(
                hypotheses_of_rows(n, num_hyp, kwargs["layout"], kwargs["inner"]), device=x.device)
        keep = (hyp >= 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        h = hyp.clamp(min=0)
        shrink = torch.einsum("n...d,nrd->n...r", x, a[h])
        delta = torch.einsum("n...r,nor->n...o", shrink, bb[h]) * s.to(x.dtype)[h].view_as(keep) * keep
        return torch.nn.functional.linear(x, w, b) + delta
    return forward_and_grads(fn, x, w, b, a, bb)


@requires_cuda
@pytest.mark.parametrize("path", ["fused", "cublas", "decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_matches_fp64_within_2x_plain_torch(case, dtype, path, monkeypatch):
    gpu_check(case, dtype, path, monkeypatch)


@requires_cuda
def test_gpu_decode_replayed_from_a_cuda_graph_gives_eagers_bits(monkeypatch):
    """The decode pair replayed from a CUDA graph, where on Hopper the finish kernel is the partial
    kernel's programmatic dependent launch (its programs wait for the partial grid before reading
    the workspace), gives eager's bits at every replay, the input switched between two batches
    before each (a finish kernel reading the previous replay's workspace would give the other
    batch's output); so does the pair without the dependent launch."""
    monkeypatch.setenv("LORAMCL_MULTI_LORA_PATH", "decode")
    x, w, b, a, bb, s = make_inputs(40, (), 4096, 4096, 8, 5, torch.bfloat16, "cuda")
    batches = [x, torch.randn_like(x)]
    outputs = {}
    for pdl in (True, False):
        monkeypatch.setattr(mll, "DECODE_PDL", pdl)
        with torch.no_grad():
            eager = [multi_lora_linear(xb, w, b, a, bb, s, backend="triton") for xb in batches]  # compiles
            static_x = batches[0].clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                multi_lora_linear(static_x, w, b, a, bb, s, backend="triton")
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = multi_lora_linear(static_x, w, b, a, bb, s, backend="triton")
            for i in range(10):
                static_x.copy_(batches[i % 2])
                graph.replay()
                assert torch.equal(replayed, eager[i % 2]), (pdl, i)
        outputs[pdl] = eager
    assert all(torch.equal(p, q) for p, q in zip(outputs[True], outputs[False]))


@requires_cuda
@pytest.mark.parametrize("routing", ["batch_major", "ids", "shared", "float_scaling"])
def test_gpu_deterministic_and_free_of_host_syncs(routing):
    x, w, b, a, bb, s = make_inputs(5, (200,), 4096, 4096, 8, 5, torch.bfloat16, "cuda")
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    kwargs = {"ids": dict(hypothesis_ids=torch.tensor([4, -1, 0, 2, 1], device="cuda")),
              "shared": dict(shared_input=True)}.get(routing, {})
    scaling = 0.5 if routing == "float_scaling" else s
    grad_out = torch.randn(25 if routing == "shared" else 5, 200, 4096, device="cuda", dtype=torch.bfloat16)

    def step():
        y = multi_lora_linear(x, w, b, a, bb, scaling, backend="triton", **kwargs)
        return [y.detach(), *torch.autograd.grad(y, (x, a, bb), grad_out)]

    first = step()  # compiles, autotunes and checks the ids once (those sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward/backward now raises
    try:
        second = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for f, g in zip(first, second):
        assert torch.equal(f, g)



@requires_cuda
def test_gpu_float_scaling_vectors_are_kept_per_stream():
    """The cached (K,) vector of a float scaling is filled on the stream that made it; a call on
    another stream gets its own, so it never reads one whose fill it did not wait for."""
    x = torch.zeros(4, 8, device="cuda", dtype=torch.bfloat16)
    first = mll._scaling_vector(0.123, 3, x)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = mll._scaling_vector(0.123, 3, x)
    side.synchronize()
    assert other is not first and first is mll._scaling_vector(0.123, 3, x)
    assert torch.equal(first, other) and torch.equal(first, torch.full_like(first, 0.123))
