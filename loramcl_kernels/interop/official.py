"""Interop with the official LoRA-MCL layer ("GroupLinear", DESIGN section 1).

The official layer is a PEFT LoraLayer whose adapter (named "lora0") holds all K hypotheses as
two grouped 1x1 convolutions (groups = K):
    lora_A["lora0"].weight  [K*r, d_in, 1]    rows k*r .. k*r+r-1    are A_k (r, d_in)
    lora_B["lora0"].weight  [K*d_out, r, 1]   rows k*d_out .. +d_out-1 are B_k (d_out, r)
so weight.view(K, r, d_in) and weight.view(K, d_out, r) are exactly our lora_A / lora_B layouts
(views: gradients flow into the conv weights). Rows of the model batch are batch-major
(row n -> hypothesis n % K). Its scaling convention differs from ours:
    multi-hypothesis path   y = base(x) + (dropout(x) A_k^T) B_k^T          (NO alpha/r)
    single-adapter path     y = base(x) + alpha/r * (dropout(x) A_k^T) B_k^T (hypothesis k alone)

This module provides
  * patch_group_linear(cls): swaps `cls.forward` for one that runs those two paths, with that
    scaling, on the fused multi_lora_linear op (unpatch_group_linear(cls) undoes it). It selects the
    path as the official layer does, by the number of active PEFT adapters: more than one (the
    official training sets "lora0" .. "lora{K-1}") runs all K hypotheses, exactly one, "lora{k}",
    runs hypothesis k alone ("lora0" included), none runs the base layer only. The layer's
    `active_hypothesis` attribute, when an int k, selects hypothesis k alone too.
  * official_state_dict / load_official_state_dict (and save_official / load_official for
    safetensors files): our patched model <-> the official parameter layout. The official weights
    carry no alpha/r in the multi-hypothesis path, so with convention="multi" (default) loading
    divides B by our scaling and saving multiplies it back, so both models compute the same
    training-time outputs; convention="single" copies B as is (the same single-adapter outputs).
  * official_loss_hook(...): a Trainer-style compute_loss(model, inputs) that replaces the official
    full-logits loss by the fused MCL loss on the model's final hidden states.
"""
from __future__ import annotations

import os
import re
import warnings

import torch
import torch.nn as nn

from loramcl_kernels.hf.patching import multi_lora_modules
from loramcl_kernels.modules import _check_positive_int, _multi_lora_linear, is_conv1d
from loramcl_kernels.ops._autocast import autocast_enabled

GROUP_ADAPTER = "lora0"
_PREFIX = "base_model.model."
_SINGLE_ADAPTER = re.compile(r"^lora(\d+)$")
_OFFICIAL_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


# -- layout conversion ------------------------------------------------------------------------
def official_to_multi_lora(conv_A: torch.Tensor, conv_B: torch.Tensor, num_hypotheses: int):
    """Grouped-conv weights [K*r, d_in(, 1)], [K*d_out, r(, 1)] -> views A (K, r, d_in), B (K, d_out, r)."""
    K = _check_positive_int("num_hypotheses", num_hypotheses)
    for name, t in (("lora_A", conv_A), ("lora_B", conv_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"official {name} must be a tensor, got {type(t).__name__}")
    if conv_A.dim() == 3:
        conv_A = conv_A.squeeze(-1)
    if conv_B.dim() == 3:
        conv_B = conv_B.squeeze(-1)
    if conv_A.dim() != 2 or conv_B.dim() != 2 or conv_A.shape[0] % K or conv_B.shape[0] % K:
        raise ValueError(
            f"official lora_A / lora_B must be [K*r, d_in, 1] / [K*d_out, r, 1] with K={K}, "
            f"got {tuple(conv_A.shape)} / {tuple(conv_B.shape)}"
        )
    r = conv_A.shape[0] // K
    if conv_B.shape[1] != r:
        raise ValueError(f"official lora_B has rank {conv_B.shape[1]} but lora_A has rank {r} (K={K})")
    return conv_A.reshape(K, r, conv_A.shape[1]), conv_B.reshape(K, conv_B.shape[0] // K, r)


def multi_lora_to_official(lora_A: torch.Tensor, lora_B: torch.Tensor):
    """A (K, r, d_in), B (K, d_out, r) -> grouped-conv weights [K*r, d_in, 1], [K*d_out, r, 1]."""
    K, r, d_in = lora_A.shape
    return lora_A.reshape(K * r, d_in, 1), lora_B.reshape(K * lora_B.shape[1], r, 1)


# -- state dicts --------------------------------------------------------------------------------
CONVENTIONS = ("multi", "single")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def official_state_dict(
    model: nn.Module, *, prefix: str = _PREFIX, adapter_name: str | None = None, convention: str = "multi"
) -> dict[str, torch.Tensor]:
    """Our patched model's adapters in the official layout, keyed like a saved PEFT adapter:
    "<prefix><module>.lora_A[.<adapter_name>].weight" -> [K*r, d_in, 1] (and lora_B [K*d_out, r, 1])."""
    _check_convention(convention)
    modules = multi_lora_modules(model)
    if not modules:
        raise ValueError("the model has no MultiLoRALinear modules")
    infix = f".{adapter_name}" if adapter_name else ""
    out = {}
    with torch.no_grad():
        for name, m in modules:
            B = m.lora_B * m.scaling if convention == "multi" else m.lora_B
            conv_A, conv_B = multi_lora_to_official(m.lora_A, B)
            out[f"{prefix}{name}.lora_A{infix}.weight"] = conv_A.detach().contiguous().clone()
            out[f"{prefix}{name}.lora_B{infix}.weight"] = conv_B.detach().contiguous().clone()
    return out


def load_official_state_dict(model: nn.Module, state_dict: dict, *, strict: bool = True, convention: str = "multi"):
    """Load official-layout adapters (keys with or without the "base_model.model." prefix and
    the adapter name) into our patched model. strict: every patched module must be covered and
    every key must name one. Returns the names of the modules loaded."""
    _check_convention(convention)
    modules = dict(multi_lora_modules(model))
    if not modules:
        raise ValueError("the model has no MultiLoRALinear modules: patch_model(...) it first")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in state_dict.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        match = _OFFICIAL_KEY.match(name)
        if match is None or match["module"] not in modules:
            unexpected.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["which"]] = value
    missing = [n for n in modules if n not in pairs]
    if strict and (unexpected or missing):
        raise ValueError(f"official state dict mismatch: unexpected keys {unexpected[:8]}, missing modules {missing[:8]}")
    converted = {}  # every module checked before any is written
    for name, ab in pairs.items():
        m = modules[name]
        if set(ab) != {"A", "B"}:
            raise ValueError(f"module {name!r} needs both lora_A and lora_B, got lora_{''.join(sorted(ab))}")
        try:
            A, B = official_to_multi_lora(ab["A"], ab["B"], m.num_hypotheses)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"module {name!r}: {exc}") from None
        if A.shape != m.lora_A.shape or B.shape != m.lora_B.shape:
            raise ValueError(
                f"module {name!r}: official weights give A {tuple(A.shape)}, B {tuple(B.shape)}; "
                f"the patched module has {tuple(m.lora_A.shape)}, {tuple(m.lora_B.shape)}"
            )
        converted[name] = A, B
    with torch.no_grad():
        for name, (A, B) in converted.items():
            m = modules[name]
            m.lora_A.copy_(A)
            if convention == "multi":  # the official B carries no alpha/r: divided in fp32 at least
                B = B.to(torch.promote_types(B.dtype, torch.float32)) / m.scaling
            m.lora_B.copy_(B)
    return sorted(pairs)


def save_official(model: nn.Module, path: str | os.PathLike, **kwargs) -> None:
    """official_state_dict(model, **kwargs) written to a safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in official_state_dict(model, **kwargs).items()}, os.fspath(path))


def load_official(model: nn.Module, path: str | os.PathLike, **kwargs):
    """load_official_state_dict from a safetensors file (or a directory holding adapter_model.safetensors)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "adapter_model.safetensors")
    return load_official_state_dict(model, load_file(path), **kwargs)


# -- running official layers on our op ------------------------------------------------------------
def _active_adapters(layer: nn.Module) -> list:
    active = getattr(layer, "active_adapters", None) or []
    return [active] if isinstance(active, str) else list(active)


def _single_hypothesis(layer: nn.Module) -> int | None:
    """k when the layer runs hypothesis k alone, None when it runs all K (the official rule: one
    active adapter "lora{k}" -> k; several -> all K; an int `active_hypothesis` attribute -> k)."""
    k = getattr(layer, "active_hypothesis", None)
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    active = _active_adapters(layer)
    if len(active) != 1:
        return None
    match = _SINGLE_ADAPTER.match(active[0])
    if match is None:
        raise ValueError(f"an official LoRA-MCL layer with one active adapter runs hypothesis k of an adapter "
                         f"named 'lora<k>', got {active[0]!r}")
    return int(match[1])


def _group_linear_forward(self, x: torch.Tensor, *args, _adapter_name: str = GROUP_ADAPTER,
                          _fused_dropout: bool = False, **kwargs):
    name = _adapter_name
    base = self.get_base_layer() if hasattr(self, "get_base_layer") else self.base_layer
    if (getattr(self, "disable_adapters", False) or getattr(self, "merged", False) or name not in self.lora_A
            or not _active_adapters(self)):
        return self.base_layer(x, *args, **kwargs)
    conv_A, conv_B = self.lora_A[name], self.lora_B[name]
    K = conv_A.groups
    lora_A, lora_B = official_to_multi_lora(conv_A.weight, conv_B.weight, K)
    k = _single_hypothesis(self)
    if k is not None:
        if not 0 <= k < K:
            raise ValueError(f"single-adapter hypothesis {k} out of range [0, {K})")
        # the official single-adapter path scales by the active adapter's own alpha / r
        scaling = float(self.scaling.get(f"lora{k}", self.scaling[name]))
        lora_A, lora_B, num = lora_A[k : k + 1], lora_B[k : k + 1], 1
    else:
        scaling, num = 1.0, K  # the official multi-hypothesis path applies no alpha/r
    kw = dict(num_hypotheses=num, layout="batch_major", inner=getattr(self, "inner", 1))
    dropout = self.lora_dropout[name] if name in self.lora_dropout else nn.Identity()
    fused_base = isinstance(base, nn.Linear) or is_conv1d(base)
    dropping = self.training and not isinstance(dropout, nn.Identity)
    # with fused_dropout, an nn.Dropout runs inside the op's kernels (its own masks, same distribution)
    fused_p = float(dropout.p) if dropping and _fused_dropout and type(dropout) is nn.Dropout else None
    if fused_base and not args and not kwargs and (not dropping or fused_p is not None):
        # One fused call in the base layer's dtype (PEFT keeps adapters in fp32 on a 16-bit base).
        weight = base.weight.t() if is_conv1d(base) else base.weight
        dtype = weight.dtype
        y = _multi_lora_linear(x.to(dtype), weight, base.bias, lora_A.to(dtype), lora_B.to(dtype), scaling,
                               lora_dropout=fused_p or 0.0, **kw)
        # the official layer returns its base layer's dtype: autocast's, where autocast runs
        return y if autocast_enabled(x.device.type) else y.to(x.dtype)
    x_lora = x.to(lora_A.dtype)
    result = self.base_layer(x, *args, **kwargs)
    if dropping and k is None and x_lora.dim() == 3:
        x_lora = _official_order_dropout(dropout, x_lora, K)
    elif dropping:
        x_lora = dropout(x_lora)
    delta = _multi_lora_linear(x_lora, None, None, lora_A, lora_B, scaling, **kw)
    return result + delta.to(result.dtype)


def _official_order_dropout(dropout: nn.Module, x: torch.Tensor, K: int) -> torch.Tensor:
    """dropout(x) as the official multi-hypothesis path draws it: on the grouped convolution's input
    x.permute(0, 2, 1).reshape(N / K, K * d_in, T), so the same module and RNG state give the same
    masks; returned as (N, T, d_in) again (a permuted view)."""
    N, T, d_in = x.shape
    dropped = dropout(x.permute(0, 2, 1).reshape(N // K, K * d_in, T))
    return dropped.reshape(N, d_in, T).permute(0, 2, 1)


def patch_group_linear(cls: type, adapter_name: str = GROUP_ADAPTER, *, fused_dropout: bool = False) -> type:
    """Make every instance of `cls` (a class with the official GroupLinear structure) run its
    forward on our fused op; returns cls. Idempotent; unpatch_group_linear(cls) undoes it.

    In training the layer's own lora_dropout module runs as it is (the unpatched layer's masks,
    exactly), with the base layer and the LoRA delta as two calls; fused_dropout=True instead runs
    an nn.Dropout inside the op's kernels (one fused call; masks drawn by the op's hash, the same
    distribution, not the same bits)."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"patch_group_linear expects an nn.Module subclass, got {cls!r}")
    if "_loramcl_original_forward" not in cls.__dict__:
        cls._loramcl_original_forward = cls.__dict__.get("forward")

    def forward(self, x, *args, **kwargs):
        return _group_linear_forward(self, x, *args, _adapter_name=adapter_name, _fused_dropout=fused_dropout,
                                     **kwargs)

    cls.forward = forward
    return cls


def unpatch_group_linear(cls: type) -> type:
    if "_loramcl_original_forward" in cls.__dict__:
        original = cls.__dict__["_loramcl_original_forward"]
        if original is None:
            del cls.forward
        else:
            cls.forward = original
        del cls._loramcl_original_forward
    return cls


# -- loss -----------------------------------------------------------------------------------------
def _model_hypotheses(model: nn.Module) -> int | None:
    """K of the model's LoRA layers: ours (patch_model), or official ones (groups of the grouped
    convolution of the group adapter); None when it has neither."""
    for _, module in multi_lora_modules(model):
        return module.num_hypotheses
    for module in _official_layers(model):
        return getattr(module.lora_A[GROUP_ADAPTER], "groups", None)
    return None


def _official_layers(model: nn.Module):
    """The modules with the official layer's structure (a group adapter in a lora_A ModuleDict)."""
    for module in model.modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict) and GROUP_ADAPTER in lora_A:
            yield module


def _check_all_hypotheses_active(model: nn.Module) -> None:
    for module in _official_layers(model):
        if _single_hypothesis(module) is not None or not _active_adapters(module):
            raise ValueError(
                f"official_loss_hook: the model's LoRA-MCL layers run one hypothesis (active adapters "
                f"{_active_adapters(module)}): set all K active first, as the official training does: "
                f"layer.set_adapter([f'lora{{k}}' for k in range(K)]) on every layer")


def official_loss_hook(
    num_hypotheses: int,
    *,
    mode: str | None = None,
    epsilon: float = 0.0,
    temperature: float | None = None,
    schedule=None,
    ignore_index: int = -100,
    backend: str | None = None,
):
    """A Trainer-style compute_loss(model, inputs, return_outputs=False, **_) for an official
    LoRA-MCL model: `inputs` holds B un-repeated rows and labels (B, T); the rows are repeated
    batch-major, the model runs to its final hidden states and the fused MCL loss replaces the
    official full-logits loss. With a schedule (AnnealingSchedule) the temperature follows it.
    mode=None picks as MCLModel does: annealed with a temperature or a schedule, relaxed with
    epsilon > 0, else wta.

    The loss is a mean over the batch's sequences. HF Trainer passes num_items_in_batch to a
    compute_loss when the model's forward takes **kwargs (HF models do), and then does not divide
    the loss by gradient_accumulation_steps: with accumulation, set
    `trainer.model_accepts_loss_kwargs = False` (a warning says so once)."""
    from loramcl_kernels.hf.mcl_model import mode_from_settings
    from loramcl_kernels.ops.mcl_loss import _check_config, _check_ignore_index

    num_hypotheses = _check_positive_int("num_hypotheses", num_hypotheses)
    if mode is None:
        mode = mode_from_settings(epsilon, temperature, schedule)
    if mode == "annealed" and temperature is None:  # the schedule gives the temperature
        if schedule is None:
            raise ValueError("mode='annealed' needs temperature= or an AnnealingSchedule (schedule=)")
        _check_config(num_hypotheses, "batch_major", "annealed", epsilon, 1.0, "mean")
    else:
        _check_config(num_hypotheses, "batch_major", mode, epsilon, temperature, "mean")
    _check_ignore_index(ignore_index)

    warned = []

    def compute_loss(model, inputs, return_outputs: bool = False, num_items_in_batch=None, **_unused):
        from loramcl_kernels.hf.mcl_model import mcl_forward

        if num_items_in_batch is not None and not warned:
            warned.append(True)
            warnings.warn(
                "official_loss_hook: Trainer passed num_items_in_batch, so it will not divide this loss (a mean over "
                "sequences) by gradient_accumulation_steps; with gradient accumulation set "
                "trainer.model_accepts_loss_kwargs = False, or each update is that many times too large",
                stacklevel=2)
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError("official_loss_hook: the inputs have no 'labels' (B, T)")
        model_hypotheses = _model_hypotheses(model)
        if model_hypotheses is not None and model_hypotheses != num_hypotheses:
            raise ValueError(f"official_loss_hook was built for num_hypotheses={num_hypotheses}, but the model's "
                             f"LoRA layers hold {model_hypotheses}")
        _check_all_hypotheses_active(model)
        labels = inputs.pop("labels")
        run_mode, tau = mode, temperature
        if run_mode == "annealed" and tau is None:
            tau = schedule.temperature if schedule is not None else None
            if tau is None:
                run_mode = "wta"
        out = mcl_forward(
            model,
            labels,
            num_hypotheses=num_hypotheses,
            layout="batch_major",
            mode=run_mode,
            epsilon=epsilon,
            temperature=tau if run_mode == "annealed" else None,
            ignore_index=ignore_index,
            backend=backend,
            **inputs,
        )
        return (out.loss, out) if return_outputs else out.loss

    return compute_loss
