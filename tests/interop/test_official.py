"""Official LoRA-MCL layer interop. The official package is not on the registries, so its layer
is rebuilt here from its documented structure: a PEFT LoraLayer whose adapter "lora0" holds the
K hypotheses as grouped 1x1 convolutions (lora_A [K*r, d_in, 1], lora_B [K*d_out, r, 1]); with
several active adapters (training sets "lora0" .. "lora{K-1}") all K run, rows batch-major, no
alpha/r; with one, "lora{k}", hypothesis k alone, scaled by alpha/r; with none, the base layer."""
import math
import re

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("peft")
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

from loramcl_kernels.hf.patching import active_hypothesis, multi_lora_modules, patch_model  # noqa: E402
from loramcl_kernels.interop.official import (  # noqa: E402
    load_official,
    load_official_state_dict,
    official_loss_hook,
    official_state_dict,
    official_to_multi_lora,
    patch_group_linear,
    save_official,
    unpatch_group_linear,
)

from loramcl_kernels.ops import multi_lora_linear as mll  # noqa: E402
from tests.hf.helpers import VOCAB, assert_close_to_scale, reference_mcl_loss, tiny_llama  # noqa: E402

K, R, ALPHA = 3, 4, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class GroupLinear(nn.Module, LoraLayer):
    """The official layer's structure and math (grouped-conv forward), rebuilt for the tests."""

    def __init__(self, base_layer, num_hypotheses, r, lora_alpha, lora_dropout=0.0, adapter_name="lora0"):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.num_hypotheses = num_hypotheses
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        Kn = num_hypotheses
        self.lora_A[adapter_name] = nn.Conv1d(Kn * self.in_features, Kn * r, 1, groups=Kn, bias=False)
        self.lora_B[adapter_name] = nn.Conv1d(Kn * r, Kn * self.out_features, 1, groups=Kn, bias=False)
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def forward(self, x):
        name = "lora0"
        result = self.base_layer(x)
        if self.disable_adapters or not self.active_adapters:
            return result
        conv_A, conv_B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        Kn, r, d_in, d_out = self.num_hypotheses, self.r[name], self.in_features, self.out_features
        if len(self.active_adapters) == 1:  # single-adapter path: hypothesis k alone, alpha / r
            k = int(re.fullmatch(r"lora(\d+)", self.active_adapters[0])[1])
            A = conv_A.weight[k * r : (k + 1) * r, :, 0]
            B = conv_B.weight[k * d_out : (k + 1) * d_out, :, 0]
            # the official layer reads the active adapter's own scaling (update_layer sets one per "lora{k}")
            scaling = self.scaling.get(self.active_adapters[0], self.scaling[name])
            return result + scaling * F.linear(F.linear(drop(x), A), B)
        N, T, _ = x.shape  # multi-hypothesis path: rows batch-major, no alpha / r; dropout on the conv's input
        h = drop(x.permute(0, 2, 1).reshape(N // Kn, Kn * d_in, T))
        h = conv_B(conv_A(h)).reshape(N // Kn, Kn, d_out, T).permute(0, 1, 3, 2).reshape(N, T, d_out)
        return result + h


def official_model(dropout=0.0, seed=0):
    model = tiny_llama(seed).double()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 11)
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            layer = GroupLinear(mod, K, R, ALPHA, dropout).double()
            with torch.no_grad():
                layer.lora_B["lora0"].weight.copy_(torch.randn(layer.lora_B["lora0"].weight.shape, generator=g) * 0.2)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    set_all_hypotheses(model)
    return model


def set_all_hypotheses(model):
    """All K adapters active, as the official wrapper sets them for training: the multi path."""
    for layer in group_layers(model).values():
        layer.set_adapter([f"lora{k}" for k in range(K)])


def group_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, GroupLinear)}


@pytest.fixture
def patched_class():
    patch_group_linear(GroupLinear)
    yield GroupLinear
    unpatch_group_linear(GroupLinear)


def _ids(B=2, T=6):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))


def _run(model, ids, seed=0):
    torch.manual_seed(seed)
    out = model(input_ids=ids).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(out.dtype)
    model.zero_grad()
    (out * w).sum().backward()
    grads = {n: (m.lora_A["lora0"].weight.grad.clone(), m.lora_B["lora0"].weight.grad.clone())
             for n, m in group_layers(model).items()}
    return out.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patch_group_linear_matches_grouped_conv(patched_class, dropout):
    model = official_model(dropout).train()
    ids = _ids().repeat_interleave(K, 0)
    unpatch_group_linear(GroupLinear)
    want, want_grads = _run(model, ids)
    patch_group_linear(GroupLinear)
    got, got_grads = _run(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert len(got_grads) == 10
    for n in want_grads:
        for g, w in zip(got_grads[n], want_grads[n]):
            assert_close_to_scale(g, w)


class HashDropout(nn.Module):
    """Dropout with the op's own masks (one seed draw per call, dropout_keep_mask over x's (N*T, d_in)
    rows), applied where the official multi-hypothesis path drops: on the grouped convolution's
    input (N / K, K * d_in, T)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, h):
        if not self.training:
            return h
        groups, kd, T = h.shape
        x = h.reshape(groups * K, kd // K, T).permute(0, 2, 1)  # (N, T, d_in)
        seed = mll._dropout_seed(x.device)
        keep = mll.dropout_keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], self.p).view(x.shape)
        return torch.where(keep, x / (1 - self.p), 0.0).permute(0, 2, 1).reshape(h.shape)


def test_patch_group_linear_fused_dropout():
    """fused_dropout=True: in training the layer's nn.Dropout runs inside the op, one fused call,
    with the op's masks: the official grouped-conv math with those masks gives the same output and
    gradients; eval mode uses no dropout."""
    model = official_model(0.2).train()
    ids = _ids().repeat_interleave(K, 0)
    layers = group_layers(model)
    patch_group_linear(GroupLinear, fused_dropout=True)
    try:
        calls = []
        real = mll.multi_lora_linear
        mll.multi_lora_linear = lambda *a, **kw: calls.append(kw.get("lora_dropout")) or real(*a, **kw)
        try:
            got, got_grads = _run(model, ids, seed=3)
        finally:
            mll.multi_lora_linear = real
        assert calls == [0.2] * len(layers)  # one fused call per layer, the dropout inside
    finally:
        unpatch_group_linear(GroupLinear)
    for layer in layers.values():  # the official math, with the op's masks drawn in the same order
        layer.lora_dropout["lora0"] = HashDropout(0.2)
    want, want_grads = _run(model, ids, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for n in want_grads:
        for g, w in zip(got_grads[n], want_grads[n]):
            assert_close_to_scale(g, w)
    without, _ = _run(model.eval(), ids)
    assert (without - got).abs().max() > 1e-6


def test_patch_group_linear_fp32_adapters_on_a_bf16_base(patched_class):
    """PEFT keeps adapters in fp32 on a 16-bit base: the patched layer runs one fused call in the
    base dtype, and the fp32 adapters get their gradients, close to the fp64 computation."""
    model = official_model(0.0).train()
    ids = _ids().repeat_interleave(K, 0)
    unpatch_group_linear(GroupLinear)
    want, want_grads = _run(model, ids)
    patch_group_linear(GroupLinear)
    model.to(torch.bfloat16)
    for layer in group_layers(model).values():
        layer.lora_A["lora0"].float()
        layer.lora_B["lora0"].float()
    got, got_grads = _run(model, ids)
    assert got.dtype == torch.bfloat16
    assert_close_to_scale(got.double(), want, rel=5e-2)
    for n in want_grads:
        for g, w in zip(got_grads[n], want_grads[n]):
            assert g.dtype == torch.float32
            assert_close_to_scale(g.double(), w, rel=5e-2)


@pytest.mark.parametrize("active", [["lora2"], ["lora0"], [], "attribute"])
def test_patch_group_linear_follows_the_official_adapter_selection(patched_class, active):
    """One active adapter "lora{k}" runs hypothesis k alone, scaled by alpha/r ("lora0" included),
    none runs the base layer, several run all K (the other tests); our active_hypothesis
    attribute k runs hypothesis k alone too."""
    model = official_model().eval()
    ids = _ids()
    multi = model(input_ids=ids.repeat_interleave(K, 0)).logits
    for layer in group_layers(model).values():
        layer.scaling["lora2"] = 0.7  # hypothesis 2's own alpha / r, not lora0's
        if active == "attribute":
            layer.active_hypothesis = 2
        else:
            layer._active_adapter = active
    got = model(input_ids=ids).logits
    unpatch_group_linear(GroupLinear)
    for layer in group_layers(model).values():
        layer._active_adapter = ["lora2"] if active == "attribute" else active
    want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Neither is a hypothesis of the multi path (alpha/r = 2 here; none: no LoRA at all).
    k = 0 if active == ["lora0"] else 2
    assert (multi[k::K] - want).abs().max() > 1e-3


def test_official_loss_hook_refuses_a_single_hypothesis_model(patched_class):
    """The hook repeats the rows for the K hypotheses: a model left with one active adapter (the
    official layer's state after construction) would give every copy the same hypothesis."""
    model, ids = official_model(), _ids()
    for layer in group_layers(model).values():
        layer._active_adapter = "lora0"
    with pytest.raises(ValueError, match="run one hypothesis"):
        official_loss_hook(K)(model, {"input_ids": ids, "labels": ids})


def test_state_dict_conventions_and_round_trip(tmp_path):
    official = official_model().eval()
    ours = patch_model(tiny_llama().double(), K, R, ALPHA)  # scaling alpha / r = 2
    # Official -> ours, convention "multi": our batched outputs equal the official multi path.
    loaded = load_official_state_dict(ours, official.state_dict(), strict=False)
    assert len(loaded) == 10
    ids = _ids()
    rows = ids.repeat_interleave(K, 0)
    torch.testing.assert_close(ours(input_ids=rows).logits, official(input_ids=rows).logits, rtol=1e-10, atol=1e-10)
    # Ours -> official keys and back is exact.
    sd = official_state_dict(ours)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert sd[key].shape == (K * R, 32, 1)
    assert sd[key.replace("lora_A", "lora_B")].shape == (K * 32, R, 1)
    save_official(ours, tmp_path / "official.safetensors")
    other = patch_model(tiny_llama().double(), K, R, ALPHA)
    load_official(other, tmp_path / "official.safetensors")
    for (_, a), (_, b) in zip(multi_lora_modules(ours), multi_lora_modules(other)):
        torch.testing.assert_close(a.lora_A, b.lora_A, rtol=0, atol=0)
        torch.testing.assert_close(a.lora_B, b.lora_B, rtol=1e-15, atol=0)
    # Convention "single": our single-adapter mode equals the official single-adapter path.
    load_official_state_dict(ours, official_state_dict_of(official), convention="single")
    for layer in group_layers(official).values():
        layer.set_adapter("lora1")  # the official single-adapter path of hypothesis 1
    with active_hypothesis(ours, 1):
        torch.testing.assert_close(ours(input_ids=ids).logits, official(input_ids=ids).logits, rtol=1e-10,
                                   atol=1e-10)
    with pytest.raises(ValueError, match="mismatch"):
        load_official_state_dict(ours, {"base_model.model.nothing.lora_A.weight": torch.zeros(1)})
    wrong_k = patch_model(tiny_llama().double(), 2, R, ALPHA)
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj': official lora_B has rank 4"):
        load_official_state_dict(wrong_k, official_state_dict(ours))


def test_load_official_state_dict_checks_everything_first_and_keeps_fp64():
    ours = patch_model(tiny_llama().double(), K, R, ALPHA)  # scaling 2
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) / 3 for k, v in official_state_dict(ours).items()}
    load_official_state_dict(ours, sd)
    for name, m in multi_lora_modules(ours):  # B / 2 in fp64: exact
        conv_B = sd[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(m.lora_B, conv_B.view(m.lora_B.shape) / 2)
    before = {n: m.lora_B.clone() for n, m in multi_lora_modules(ours)}
    partial = {k: v * 5 for k, v in sd.items() if not k.endswith("layers.1.mlp.down_proj.lora_B.weight")}
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        load_official_state_dict(ours, partial, strict=False)
    assert all(torch.equal(m.lora_B, before[n]) for n, m in multi_lora_modules(ours))  # nothing written
    with pytest.raises(TypeError, match="must be a tensor"):
        load_official_state_dict(ours, {k: v.numpy() for k, v in sd.items()})
    for bad_k in (0, 3.0):
        with pytest.raises(ValueError, match="num_hypotheses must be an integer >= 1"):
            official_to_multi_lora(torch.zeros(6, 4), torch.zeros(6, 2), bad_k)


def official_state_dict_of(model):
    """The official model's adapters as PEFT would save them (adapter name dropped)."""
    return {f"base_model.model.{k.replace('.lora0', '')}": v for k, v in model.state_dict().items() if "lora_" in k}


def test_official_loss_hook_arguments_checked(patched_class):
    with pytest.raises(ValueError, match="needs temperature= or an AnnealingSchedule"):
        official_loss_hook(K, mode="annealed")
    with pytest.raises(ValueError, match="mode must be one of"):
        official_loss_hook(K, mode="best")
    with pytest.raises(ValueError, match="temperature=0.5 applies to mode='annealed'"):
        official_loss_hook(K, mode="wta", temperature=0.5)  # wta would ignore it
    with pytest.raises(ValueError, match="epsilon=0.1 applies to mode='relaxed'"):
        official_loss_hook(K, mode="annealed", temperature=0.5, epsilon=0.1)
    with pytest.raises(ValueError, match="num_hypotheses must be an integer >= 1"):
        official_loss_hook(0)
    model, ids = official_model(), _ids()
    with pytest.raises(ValueError, match="built for num_hypotheses=2, but the model's LoRA layers hold 3"):
        official_loss_hook(2)(model, {"input_ids": ids, "labels": ids})
    with pytest.raises(ValueError, match="no 'labels'"):
        official_loss_hook(K)(model, {"input_ids": ids})
    # HF Trainer's num_items_in_batch: it will not divide this mean by the accumulation steps; said once
    hook = official_loss_hook(K)
    with pytest.warns(UserWarning, match="model_accepts_loss_kwargs = False"):
        first = hook(model, {"input_ids": ids, "labels": ids}, num_items_in_batch=torch.tensor(30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = hook(model, {"input_ids": ids, "labels": ids}, num_items_in_batch=torch.tensor(30))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, hook(model, {"input_ids": ids, "labels": ids}), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["wta", "relaxed", "annealed", "schedule", "ignore_index", "mode_from_schedule",
                                  "mode_from_epsilon"])
def test_official_loss_hook(patched_class, case):
    from loramcl_kernels.hf.mcl_model import AnnealingSchedule

    model = official_model().train()
    ids = _ids(B=3, T=7)
    ignore = -1 if case == "ignore_index" else -100
    labels = ids.clone()
    labels[:, :3] = ignore
    hook_kw, ref_kw = {
        "wta": ({}, {}),
        "relaxed": ({"mode": "relaxed", "epsilon": 0.1}, {"mode": "relaxed", "epsilon": 0.1}),
        "annealed": ({"mode": "annealed", "temperature": 0.5}, {"mode": "annealed", "temperature": 0.5}),
        "schedule": ({"mode": "annealed", "schedule": AnnealingSchedule(0.8, 0.5)},
                     {"mode": "annealed", "temperature": 0.8}),
        "ignore_index": ({"ignore_index": -1}, {"ignore_index": -1}),
        # mode=None (the default) picks as MCLModel does: a schedule or temperature anneals, epsilon relaxes
        "mode_from_schedule": ({"schedule": AnnealingSchedule(0.8, 0.5)}, {"mode": "annealed", "temperature": 0.8}),
        "mode_from_epsilon": ({"epsilon": 0.1}, {"mode": "relaxed", "epsilon": 0.1}),
    }[case]
    hook = official_loss_hook(K, **hook_kw)
    loss, out = hook(model, {"input_ids": ids, "labels": labels}, return_outputs=True)
    loss.backward()
    got = {n: m.lora_B["lora0"].weight.grad.clone() for n, m in group_layers(model).items()}
    model.zero_grad()
    unpatch_group_linear(GroupLinear)
    ref_loss, L, winners, _ = reference_mcl_loss(model(input_ids=ids.repeat_interleave(K, 0)).logits, labels, K,
                                                 **ref_kw)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(out.nll, L)
    assert torch.equal(out.winners, winners)
    for n, m in group_layers(model).items():
        assert_close_to_scale(got[n], m.lora_B["lora0"].weight.grad)


def test_patch_group_linear_returns_the_official_dtype_under_autocast():
    """Under autocast the official layer returns its base layer's output dtype (autocast's): so does
    the patched layer's fused call; close to the unpatched layer's values."""
    torch.manual_seed(0)
    layer = GroupLinear(nn.Linear(32, 24), K, R, ALPHA).eval()
    with torch.no_grad():
        layer.lora_B["lora0"].weight.normal_(0, 0.2)
    layer.set_adapter([f"lora{k}" for k in range(K)])
    x = torch.randn(2 * K, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        patch_group_linear(GroupLinear)
        try:
            got = layer(x)
        finally:
            unpatch_group_linear(GroupLinear)
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    patch_group_linear(GroupLinear)
    try:
        assert layer(x).dtype == torch.float32  # no autocast: x's dtype
    finally:
        unpatch_group_linear(GroupLinear)
