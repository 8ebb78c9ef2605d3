"""Patching HuggingFace (or any torch) models with MultiLoRALinear, and undoing it.

patch_model replaces every module whose name matches `target_modules` (PEFT's rules: a string is
a regular expression matched against the full module name, a list matches a name equal to an
entry or ending in "." + entry) by a MultiLoRALinear around it, freezes every other parameter,
and records what it did in `model.loramcl_config`. unpatch_model puts the original modules (or
hypothesis k merged into them) back and restores the requires_grad flags it changed.

The modules' routing attributes (active_hypothesis, layout, inner, hypothesis_ids) are set for
the whole model with `set_lora_attributes` or, restored on exit, with the `lora_attributes`
context manager; `active_hypothesis(model, k)` is the single-adapter mode of every module.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from loramcl_kernels.modules import (LAYOUTS, BatchShape, MultiLoRALinear, _check_positive_int, check_init_lora_weights,
                                     supported_base_layer)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer
ROUTING_ATTRIBUTES = ("active_hypothesis", "layout", "inner", "hypothesis_ids", "shared_input")


@dataclass
class MultiLoRAConfig:
    """What patch_model did to a model (stored as `model.loramcl_config`)."""

    num_hypotheses: int
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    layout: str
    target_modules: str | tuple[str, ...]
    module_names: list[str] = field(default_factory=list)
    # requires_grad of every parameter before patching, restored by unpatch_model.
    requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)


def _name_matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def multi_lora_modules(model: nn.Module) -> list[tuple[str, MultiLoRALinear]]:
    """(name, module) for every MultiLoRALinear in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def get_config(model: nn.Module) -> MultiLoRAConfig:
    config = getattr(model, "loramcl_config", None)
    if not isinstance(config, MultiLoRAConfig):
        raise ValueError("the model is not patched: call loramcl_kernels.patch_model(model, ...) first")
    return config


def _warn_on_vision_tower_targets(model: nn.Module, matches: list) -> None:
    """A vision-language model whose vision tower the targets match (the official suffix targets do):
    an image may reach that tower as several crops (LLaVA-1.6's anyres), P rows of the tower's batch
    per sequence, where row n takes hypothesis n % K (batch_major), as in the official layer's
    training, not its sequence's: say so, and how to adapt the language model alone."""
    if getattr(getattr(model, "config", None), "vision_config", None) is None:
        return
    vision = [n for n, _ in matches if any(part in n.lower() for part in ("vision", "visual", "image"))]
    if vision:
        warnings.warn(
            f"target_modules match {len(vision)} layers of the vision tower (e.g. {vision[0]}), as the official "
            "code's suffix targets do. Where an image reaches the vision tower as several crops "
            "(LLaVA-1.6), crop row n of the tower's batch takes hypothesis n % K, as in the official layer's "
            "training, not its sequence's hypothesis (generate_hypotheses does the same). To adapt the language "
            "model alone, pass target_modules naming its layers, e.g. r'.*language_model.*\\.(q|k|v|up|down)_proj'.",
            stacklevel=3)


def patch_model(
    model: nn.Module,
    num_hypotheses: int,
    r: int,
    lora_alpha: float | None = None,
    target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
    lora_dropout: float = 0.0,
    layout: str = "batch_major",
    *,
    use_rslora: bool = False,
    backend: str | None = None,
    init_lora_weights: bool | str = True,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Put K LoRA adapters on every module of `model` matching `target_modules`; returns `model`.

    target_modules: a list of names or suffixes, a regex matched against full names, or PEFT's
    "all-linear" (every linear layer but the output layer). Matching modules must be nn.Linear or
    transformers' Conv1D. lora_alpha defaults to r (scaling 1). init_lora_weights: True (Kaiming A,
    zero B), "gaussian" or False (see MultiLoRALinear.reset_lora_parameters). Every parameter of the
    model except the new lora_A / lora_B is frozen.
    adapter_dtype: dtype of lora_A / lora_B (default: each base layer's); torch.float32 keeps fp32
    master adapters on a bf16/fp16 base, as PEFT does: they are cast to the base dtype in the forward.
    """
    num_hypotheses = _check_positive_int("num_hypotheses", num_hypotheses)
    r = _check_positive_int("r", r)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    check_init_lora_weights(init_lora_weights)
    if target_modules == ALL_LINEAR:
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        target_modules = tuple(n for n, m in model.named_modules()
                               if n and supported_base_layer(m) and m is not output_layer)
        if not target_modules:
            raise ValueError(f"target_modules='all-linear': {type(model).__name__} has no linear layer but its output")
    elif isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {exc}") from None
    elif not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise TypeError("target_modules must be a regex string or a list of names, "
                        f"got {type(target_modules).__name__}")
    else:
        target_modules = tuple(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be a regex or a non-empty list of names, got {target_modules!r}")
    if isinstance(getattr(model, "loramcl_config", None), MultiLoRAConfig) or multi_lora_modules(model):
        raise ValueError("the model is already patched with MultiLoRALinear modules: unpatch_model(model) first")

    matches = [(n, m) for n, m in model.named_modules() if n and _name_matches(n, target_modules)]
    if not matches:
        some = [n for n, m in model.named_modules() if supported_base_layer(m)][:8]
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={target_modules!r}; "
            f"linear modules it has include {some}"
        )
    if target_modules == DEFAULT_TARGET_MODULES:  # the official targets: say which this model lacks
        missing = [t for t in target_modules if not any(_name_matches(n, (t,)) for n, _ in matches)]
        if missing:
            suffixes = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if supported_base_layer(m)})
            warnings.warn(
                f"the default target_modules {missing} match no module of {type(model).__name__} (fused projections, "
                f"or other names), so only {sorted(set(target_modules) - set(missing))} get adapters; its linear "
                f"layers are named {suffixes[:12]}: pass target_modules to choose", stacklevel=2)
    _warn_on_vision_tower_targets(model, matches)
    unsupported = [f"{n} ({type(m).__name__})" for n, m in matches if not supported_base_layer(m)]
    if unsupported:
        raise TypeError(
            "target_modules match modules that are not nn.Linear or transformers Conv1D: "
            + ", ".join(unsupported[:8])
        )

    occurrences: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        occurrences[id(p)] = occurrences.get(id(p), 0) + 1
    tied = [n for n, m in matches if occurrences.get(id(m.weight), 0) > 1]
    if tied:
        raise ValueError(
            f"target_modules match {tied[:4]}, whose weight is tied to another module's (an lm_head tied to the "
            "input embeddings): LoRA on a tied layer is not supported (HF's tying, resizing and saving would "
            "break); leave it out of target_modules")
    lora_alpha = float(r if lora_alpha is None else lora_alpha)
    if not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    config = MultiLoRAConfig(
        num_hypotheses=num_hypotheses,
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=float(lora_dropout),
        use_rslora=bool(use_rslora),
        layout=layout,
        target_modules=target_modules,
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )
    model.requires_grad_(False)
    batch_shape = BatchShape()  # (N, T) of each forward, for layers that see flattened token rows
    for name, base in matches:
        module = MultiLoRALinear(
            base,
            num_hypotheses,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora=use_rslora,
            layout=layout,
            backend=backend,
            init_lora_weights=init_lora_weights,
            adapter_dtype=adapter_dtype,
        )
        module.train(base.training)  # an eval-mode model stays in eval mode (no LoRA dropout)
        module.batch_shape = batch_shape
        _set_submodule(model, name, module)
        config.module_names.append(name)
    model.register_forward_pre_hook(batch_shape, with_kwargs=True)
    for inner in _batch_shape_owners(model)[1:]:
        inner.register_forward_pre_hook(_InnerBatchShape(batch_shape), with_kwargs=True)
    model.loramcl_config = config
    return model


def _batch_shape_owners(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward records (N, T): the model, and its decoder (an encoder-decoder's
    encoder too) where distinct, so that calling one directly (model.model(...)) records its own."""
    owners = [model]
    getters = ["get_decoder"]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        getters.append("get_encoder")
    for getter in getters:
        try:
            inner = getattr(model, getter)()
        except (AttributeError, NotImplementedError, ValueError):  # no such part, or HF cannot tell it
            continue
        if isinstance(inner, nn.Module) and all(inner is not owner for owner in owners):
            owners.append(inner)
    return owners


class _InnerBatchShape:
    """The pre-hook on a model's decoder (or encoder): records (N, T) as the model's does, so that an
    eager direct call (model.model(...)) routes by its own batch. Inside a compiled graph it records
    nothing (a host-side hook there would break the graph): a compiled model's own hook, run eagerly
    before its graph, has recorded the batch; a compiled function that calls the decoder directly
    routes by the last top-level forward's shape, so compile the model itself."""

    def __init__(self, batch_shape: BatchShape):
        self.batch_shape = batch_shape

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.compiler.is_compiling():
            self.batch_shape(module, args, kwargs)


def _remove_batch_shape_hooks(model: nn.Module) -> None:
    """Remove the pre-hooks patch_model installed (found by their type: a deep copy of the model
    holds copies of them)."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, (BatchShape, _InnerBatchShape)):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def unpatch_model(model: nn.Module, merge_hypothesis: int | None = None) -> nn.Module:
    """Undo patch_model: the original modules come back (with hypothesis k merged into each when
    merge_hypothesis=k, as plain nn.Linear modules), requires_grad flags are restored."""
    modules = multi_lora_modules(model)
    if not modules:
        raise ValueError("the model has no MultiLoRALinear modules to unpatch")
    for name, module in modules:
        replacement = module.base_layer if merge_hypothesis is None else module.merge(merge_hypothesis)
        _set_submodule(model, name, replacement)
    _remove_batch_shape_hooks(model)
    config = getattr(model, "loramcl_config", None)
    if isinstance(config, MultiLoRAConfig):
        for n, p in model.named_parameters():
            if n in config.requires_grad:
                p.requires_grad_(config.requires_grad[n])
        del model.loramcl_config
    return model


def set_lora_attributes(model: nn.Module, **attributes) -> dict:
    """Set routing attributes (ROUTING_ATTRIBUTES) on every MultiLoRALinear; returns the old values
    keyed by module name, for restore_lora_attributes."""
    unknown = set(attributes) - set(ROUTING_ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown MultiLoRALinear attributes {sorted(unknown)}; expected {ROUTING_ATTRIBUTES}")
    modules = multi_lora_modules(model)
    if not modules:
        raise ValueError("the model has no MultiLoRALinear modules: call loramcl_kernels.patch_model first")
    if attributes.get("active_hypothesis") is not None:
        modules[0][1]._check_hypothesis(attributes["active_hypothesis"])
    if "layout" in attributes and attributes["layout"] not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {attributes['layout']!r}")
    if "inner" in attributes:
        _check_positive_int("inner", attributes["inner"])
    saved = {}
    for name, module in modules:
        saved[name] = {a: getattr(module, a) for a in attributes}
        for a, v in attributes.items():
            setattr(module, a, v)
    return saved


def restore_lora_attributes(model: nn.Module, saved: dict) -> None:
    for name, module in multi_lora_modules(model):
        for a, v in saved.get(name, {}).items():
            setattr(module, a, v)


@contextlib.contextmanager
def lora_attributes(model: nn.Module, **attributes) -> Iterator[nn.Module]:
    """Context manager: routing attributes set on every MultiLoRALinear, restored on exit."""
    saved = set_lora_attributes(model, **attributes)
    try:
        yield model
    finally:
        restore_lora_attributes(model, saved)


def active_hypothesis(model: nn.Module, k: int | None):
    """Context manager: every row through adapter k (single-adapter mode), or all K for None."""
    return lora_attributes(model, active_hypothesis=k)
