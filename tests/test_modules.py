"""MultiLoRALinear: init, routing (layouts, inner, ids, single adapter, shared input), dropout,
merge, Conv1D bases, gradients and torch.compile, against explicit per-row math."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loramcl_kernels.modules import MultiLoRALinear, repeat_rows
from loramcl_kernels.ops import multi_lora_linear as mll
from loramcl_kernels.ops.multi_lora_linear import dropout_keep_mask

K, R, D_IN, D_OUT = 3, 4, 16, 12


def _module(bias=True, conv1d=False, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(D_OUT, D_IN).to(dtype)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(D_IN, D_OUT, bias=bias).to(dtype)
    m = MultiLoRALinear(base, K, R, lora_alpha=kw.pop("lora_alpha", 8), **kw)
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def _per_row(m, x, hyp, scaling=None):
    """Explicit y[n] = x[n] W^T + b + s (x[n] A_h^T) B_h^T, row by row (h = -1: base only)."""
    s = m.scaling if scaling is None else scaling
    W = m.weight
    out = []
    for n in range(x.shape[0]):
        y = F.linear(x[n], W, m.bias)
        h = int(hyp[n])
        if h >= 0:
            y = y + s * (x[n] @ m.lora_A[h].t()) @ m.lora_B[h].t()
        out.append(y)
    return torch.stack(out)


def test_init_matches_peft_kaiming_and_zero_b():
    torch.manual_seed(0)
    m = MultiLoRALinear(nn.Linear(256, 64), 4, 8, lora_alpha=16)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on (r, d_in): fan_in = d_in
    assert m.lora_A.shape == (4, 8, 256) and m.lora_B.shape == (4, 64, 8)
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.95 * bound
    assert abs(m.lora_A.std().item() - bound / math.sqrt(3)) < 0.03 * bound
    assert torch.count_nonzero(m.lora_B) == 0
    assert m.scaling == 2.0 and m.lora_A.requires_grad and m.lora_B.requires_grad
    assert not any(p.requires_grad for p in m.base_layer.parameters())
    x = torch.randn(8, 5, 256)
    torch.testing.assert_close(m(x), m.base_layer(x))
    assert MultiLoRALinear(nn.Linear(8, 8), 2, 4, lora_alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("layout,inner", [("batch_major", 1), ("batch_major", 2), ("hypothesis_major", 1)])
def test_forward_and_grads_match_per_row_math(conv1d, layout, inner):
    m = _module(conv1d=conv1d, layout=layout, inner=inner)
    N = K * inner * 2
    x = torch.randn(N, 5, D_IN, dtype=torch.float64, requires_grad=True)
    n = torch.arange(N)
    hyp = (n // inner) % K if layout == "batch_major" else n // (N // K)
    y = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _per_row(m, x_ref, hyp)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, m.lora_A, m.lora_B), g)
    dx_ref, dA_ref, dB_ref = torch.autograd.grad(y_ref, (x_ref, m.lora_A, m.lora_B), g)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dA, dA_ref)
    torch.testing.assert_close(dB, dB_ref)


def test_hypothesis_ids_single_adapter_and_shared_input():
    m = _module()
    x = torch.randn(5, 3, D_IN, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 1, 2])
    m.hypothesis_ids = ids
    torch.testing.assert_close(m(x), _per_row(m, x, ids))
    m.hypothesis_ids = None
    m.active_hypothesis = 1
    torch.testing.assert_close(m(x), _per_row(m, x, torch.ones(5, dtype=torch.long)))
    m.active_hypothesis = None
    m.shared_input = True
    y = m(x)  # (5*K, 3, D_OUT), batch-major: row b*K + k is input b under hypothesis k
    torch.testing.assert_close(y, _per_row(m, x.repeat_interleave(K, 0), torch.arange(5 * K) % K))


def test_dropout_masks_per_hypothesis():
    m = _module(bias=False, lora_dropout=0.5)
    with torch.no_grad():  # identical adapters: outputs differ only through dropout masks
        m.lora_A.copy_(m.lora_A[:1].expand_as(m.lora_A))
        m.lora_B.copy_(m.lora_B[:1].expand_as(m.lora_B))
    x = torch.randn(K * 2, 4, D_IN, dtype=torch.float64)
    m.train()
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)  # the op draws one seed from torch's generator; its mask is dropout_keep_mask's
    keep = dropout_keep_mask(mll._dropout_seed("cpu"), K * 2 * 4, D_IN, 0.5).view(x.shape)
    x_drop = torch.where(keep, x * 2.0, 0.0)
    assert 0.4 < keep.double().mean() < 0.6
    y_ref = F.linear(x, m.weight) + m.scaling * (x_drop @ m.lora_A[0].t()) @ m.lora_B[0].t()
    torch.testing.assert_close(y, y_ref)
    # one fused call: the base GEMM and the dropped-out LoRA path in the same op
    calls = []
    real = mll.multi_lora_linear
    mll.multi_lora_linear = lambda *a, **kw: calls.append(kw.get("lora_dropout")) or real(*a, **kw)
    try:
        m(x)
    finally:
        mll.multi_lora_linear = real
    assert calls == [0.5]
    # Shared input: every hypothesis draws its own mask.
    m.shared_input = True
    x1 = torch.randn(1, 4, D_IN, dtype=torch.float64)
    y = m(x1)
    assert y.shape == (K, 4, D_OUT)
    assert (y[0] - y[1]).abs().max() > 1e-3 and (y[1] - y[2]).abs().max() > 1e-3
    m.eval()
    y = m(x1)
    torch.testing.assert_close(y[0], y[1])
    torch.testing.assert_close(y[0], _per_row(m, x1, [0])[0])


@pytest.mark.parametrize("layout, inner", [("batch_major", 1), ("batch_major", 2), ("batch_major", 3),
                                          ("hypothesis_major", 1)])
def test_repeat_rows_is_the_shared_input_order(layout, inner):
    """repeat_rows(x) through distinct rows equals the op's shared input: training with dropout on a
    shared input repeats the rows first, then every row is a hypothesis's own."""
    x = torch.randn(2 * inner, 3, D_IN, dtype=torch.float64)
    m = _module(layout=layout, inner=inner)
    m.shared_input = True
    shared = m(x)
    m.shared_input = False
    torch.testing.assert_close(m(repeat_rows(x, K, layout, inner)), shared)
    with pytest.raises(ValueError, match="divisible by inner"):
        repeat_rows(x[:1], K, "batch_major", 2)


@pytest.mark.parametrize("layout, inner", [("batch_major", 2), ("hypothesis_major", 1)])
@pytest.mark.parametrize("token_rows", [False, True])
def test_shared_input_with_dropout_keeps_the_layout_order(layout, inner, token_rows):
    """Training on a shared input with dropout (repeat, then the fused op): with p so small that
    nothing is dropped it is the eval-mode result row for row. Also for a layer fed flattened token
    rows (N*T, d), whose hypotheses come in runs of T * inner rows."""
    from loramcl_kernels.modules import BatchShape

    m = _module(layout=layout, inner=inner, lora_dropout=1e-9)
    m.shared_input = True
    x = torch.randn(2 * inner, 3, D_IN, dtype=torch.float64)
    if token_rows:
        m.batch_shape = BatchShape()
        m.batch_shape.sequences, m.batch_shape.tokens = x.shape[:2]
        x = x.reshape(-1, D_IN)
    m.eval()
    expected = m(x)
    m.train()
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge(conv1d):
    m = _module(conv1d=conv1d)
    x = torch.randn(4, 3, D_IN, dtype=torch.float64)
    merged = m.merge(2)
    # the base layer's type: a merged GPT-2 keeps its Conv1D (d_in, d_out) weights, so it reloads
    assert type(merged) is type(m.base_layer) and merged.weight.shape == m.base_layer.weight.shape
    assert not merged.weight.requires_grad and merged.weight.data_ptr() != m.base_layer.weight.data_ptr()
    m.active_hypothesis = 2
    torch.testing.assert_close(merged(x), m(x))
    with pytest.raises(ValueError, match=r"hypothesis must be an int in \[0, 3\)"):
        m.merge(3)
    for bad in (-1, -2, 3, 1.0):
        m.active_hypothesis = bad
        with pytest.raises(ValueError, match=r"active_hypothesis must be an int in \[0, 3\)"):
            m(x)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_rounds_once_to_a_16_bit_base(conv1d):
    """The merged weight is W + s B_k A_k computed in fp32 and rounded once to the base dtype
    (rounding the delta to bf16 first, then the sum, is off by an ulp in a quarter of the entries)."""
    base = _module(conv1d=conv1d)
    m = MultiLoRALinear(base.base_layer.to(torch.bfloat16), 3, 4, lora_alpha=8, init_lora_weights=False,
                        adapter_dtype=torch.float32)
    merged = m.merge(1)
    w = m.weight.double()
    once = (w + m.lora_B[1].double() @ m.lora_A[1].double() * m.scaling).to(torch.bfloat16)
    got = merged.weight.t() if conv1d else merged.weight
    assert merged.weight.dtype == torch.bfloat16
    assert (got != once).float().mean().item() < 0.01  # fp32 vs fp64 accumulation may flip a tie


def test_extra_repr_and_bad_arguments():
    m = _module(backend="reference")
    text = repr(m)
    for piece in ("num_hypotheses=3", "r=4", "lora_alpha=8", "scaling=2", "backend=reference", "layout=batch_major"):
        assert piece in text
    with pytest.raises(ValueError, match="num_hypotheses must be an integer >= 1"):
        MultiLoRALinear(nn.Linear(4, 4), 0, 2)
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        MultiLoRALinear(nn.Linear(4, 4), 2, 0)
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            MultiLoRALinear(nn.Linear(4, 4), 2, 2, lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_dropout"):
        MultiLoRALinear(nn.Linear(4, 4), 2, 2, lora_dropout=-0.1)
    with pytest.raises(ValueError, match="layout"):
        MultiLoRALinear(nn.Linear(4, 4), 2, 2, layout="rows")
    with pytest.raises(TypeError, match="wraps nn.Linear or transformers' Conv1D"):
        MultiLoRALinear(nn.Conv1d(4, 4, 1), 2, 2)
    # forward: x of the wrong width (also in single-adapter mode), ids with shared input (also with dropout)
    m.active_hypothesis = 1
    with pytest.raises(ValueError, match=r"x must have shape \(N, ..., in_features=16\), got \(6, 7\)"):
        m(torch.randn(6, 7))
    m.active_hypothesis = None
    m.lora_dropout_p, m.shared_input, m.hypothesis_ids = 0.1, True, torch.zeros(2, dtype=torch.long)
    for training in (False, True):
        with pytest.raises(ValueError, match="hypothesis_ids cannot be combined with shared_input=True"):
            m.train(training)(torch.randn(2, D_IN, dtype=torch.float64))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = _module(dtype=torch.float32)
    x = torch.randn(K * 2, 5, D_IN, requires_grad=True)
    y = m(x)
    dx, dA = torch.autograd.grad(y.square().sum(), (x, m.lora_A))
    compiled = torch.compile(m, fullgraph=True)
    y_c = compiled(x)
    dx_c, dA_c = torch.autograd.grad(y_c.square().sum(), (x, m.lora_A))
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_c, dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dA_c, dA, rtol=1e-4, atol=1e-4)


def test_triton_backend_through_the_module():
    """The module on the Triton kernels (the interpreter on CPU): fp32, values and gradients."""
    from tests.utils import TRITON_DEVICE

    m = _module(dtype=torch.float32, backend="triton").to(TRITON_DEVICE)
    x = torch.randn(K * 2, 3, D_IN, device=TRITON_DEVICE, requires_grad=True)
    y = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _per_row(m, x_ref, torch.arange(K * 2) % K)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, m.lora_A, m.lora_B), g),
                         torch.autograd.grad(y_ref, (x_ref, m.lora_A, m.lora_B), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_master_adapters_on_a_16_bit_base(dropout):
    """adapter_dtype=float32 keeps the trainable adapters in fp32 on a bf16 base (as PEFT does): the
    forward casts them to bf16, and their gradients arrive in fp32."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    m = MultiLoRALinear(base, K, R, lora_alpha=8, lora_dropout=dropout, adapter_dtype=torch.float32,
                        backend="reference", init_lora_weights=False)
    assert m.lora_A.dtype == m.lora_B.dtype == torch.float32
    m16 = MultiLoRALinear(base, K, R, lora_alpha=8, lora_dropout=dropout, backend="reference")
    with torch.no_grad():
        m16.lora_A.copy_(m.lora_A)
        m16.lora_B.copy_(m.lora_B)
    x = torch.randn(2 * K, 5, D_IN, dtype=torch.bfloat16)
    g = torch.randn(2 * K, 5, D_OUT, dtype=torch.bfloat16)
    torch.manual_seed(1)
    y = m(x)
    y.backward(g)
    torch.manual_seed(1)
    y16 = m16(x)
    y16.backward(g)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y16)
    assert m.lora_A.grad.dtype == torch.float32
    assert torch.equal(m.lora_A.grad, m16.lora_A.grad.float())
    assert torch.equal(m.lora_B.grad, m16.lora_B.grad.float())
    hyp = [n % K for n in range(2 * K)]
    if dropout == 0.0:
        expected = _per_row(m16.double(), x.double(), hyp)
        torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="adapter_dtype"):
        MultiLoRALinear(base, K, R, adapter_dtype=torch.int32)



def test_meta_module_and_inference_mode_ids():
    """A module moved to the meta device infers shapes (no autocast on meta); ids made under
    inference_mode route like any other ids."""
    m = _module(backend="reference")
    x = torch.randn(6, 3, D_IN, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 1, 2, 0])
    with torch.inference_mode():
        m.hypothesis_ids = torch.tensor([2, -1, 0, 1, 2, 0])
        y = m(x)
    torch.testing.assert_close(y, _per_row(m, x, ids))
    m.hypothesis_ids = None
    meta = _module(backend="reference").to("meta")
    y = meta(x.to("meta"))
    assert y.device.type == "meta" and y.shape == (6, 3, D_OUT) and y.dtype == torch.float64
