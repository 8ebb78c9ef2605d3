"""PEFT interop: K standard PEFT LoRA adapters <-> one model patched with MultiLoRALinear.

A PEFT LoRA adapter on module m holds lora_A.weight (r, d_in) and lora_B.weight (d_out, r) and
computes y = base(x) + s * B A x with s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
Hypothesis k of a MultiLoRALinear holds the same pair as lora_A[k], lora_B[k].

save_hypothesis(model, k, dir) writes hypothesis k as a standard adapter directory:
    adapter_model.safetensors  keys "base_model.model.<module>.lora_{A,B}.weight" (PEFT's)
    adapter_config.json        a minimal LoRA config (keys every PEFT >= 0.13 knows)
so that `peft.PeftModel.from_pretrained(base_model, dir)` reproduces hypothesis k.

from_peft(sources, base_model=None) loads K adapters (adapter directories, PeftModels, or one
PeftModel holding K adapters) into one patched model. Adapters may differ in rank and alpha:
the module rank is the largest r_k (smaller adapters are zero-padded, which leaves B_k A_k
unchanged), and when the scalings differ each s_k is folded into B_k under a common scaling of 1.
Unknown config keys are ignored; features whose math differs from plain LoRA (DoRA, trained
biases, modules_to_save, embedding or parameter targets, rank/alpha patterns) are refused.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from loramcl_kernels.hf.patching import get_config, multi_lora_modules, patch_model, unpatch_model
from loramcl_kernels.modules import MultiLoRALinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_LORA_ALPHA = 8  # peft.LoraConfig's, for a config that omits lora_alpha
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # init_lora_weights that rewrite W
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_BASE_WEIGHT_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if not hasattr(model, "loramcl_config") and inner is not None and hasattr(inner, "loramcl_config"):
        return inner  # an MCLModel
    return model


# -- save ---------------------------------------------------------------------------------------
def save_hypothesis(
    model: nn.Module,
    k: int,
    save_directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write hypothesis k of a patched model as a standard PEFT LoRA adapter directory."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    config = get_config(model)
    modules = multi_lora_modules(model)
    if not modules:
        raise ValueError("the model has no MultiLoRALinear modules")
    modules[0][1]._check_hypothesis(k)
    ranks = {m.r for _, m in modules}
    alphas = {m.lora_alpha for _, m in modules}
    rslora = {m.use_rslora for _, m in modules}
    if len(ranks) != 1 or len(alphas) != 1 or len(rslora) != 1:
        raise ValueError(
            "save_hypothesis needs one r, lora_alpha and use_rslora across modules, "
            f"got r={sorted(ranks)}, lora_alpha={sorted(alphas)}, use_rslora={sorted(rslora)}"
        )
    tensors = {}
    for name, module in modules:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A[k].detach().cpu().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B[k].detach().cpu().contiguous().clone()
    names = [n for n, _ in modules]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "use_rslora": rslora.pop(),
        "lora_dropout": config.lora_dropout,
        "target_modules": _target_modules_for(model, names),
        "fan_in_fan_out": all(m.fan_in_fan_out for _, m in modules),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    os.makedirs(save_directory, exist_ok=True)
    save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(save_directory, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)


def _target_modules_for(model: nn.Module, names: list[str]) -> list[str]:
    """Suffixes (PEFT style) when they select exactly the patched modules, else full names."""
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    selected = {
        n
        for n, m in model.named_modules()
        if n and not n.endswith(".base_layer") and any(n == s or n.endswith("." + s) for s in suffixes)
    }
    return suffixes if selected == set(names) else sorted(names)


# -- load ---------------------------------------------------------------------------------------
class _Adapter:
    """One LoRA adapter: its config (a dict) and {module name: (A (r, d_in), B (d_out, r))}."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor], origin: str):
        self.origin = origin
        _check_supported(config, origin)
        self.changes_the_base = _changes_the_base(config)
        self.r = int(config["r"])
        self.lora_alpha = float(config.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA))
        self.use_rslora = bool(config.get("use_rslora", False))
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        self.lora_dropout = float(config.get("lora_dropout", 0.0) or 0.0)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        # PEFT saves an adapted lm_head's (or embedding's) base weight beside its LoRA
        # (save_embedding_layers="auto"): checked against the base model's, never loaded
        self.base_weights: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            base = _BASE_WEIGHT_KEY.match(name)
            if base is not None:
                self.base_weights[base["module"]] = value
                continue
            match = _LORA_KEY.match(name)
            if match is None:
                raise ValueError(
                    f"{origin}: unsupported adapter tensor {key!r}: only lora_A / lora_B weights of "
                    "linear layers are supported (no embedding LoRA, DoRA magnitudes or trained biases)"
                )
            pairs.setdefault(match["module"], {})[match["which"]] = value
        self.modules = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{origin}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
            A, B = ab["A"], ab["B"]
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"{origin}: module {module!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                    "expected (r, d_in) and (d_out, r) of a linear LoRA"
                )
            self.modules[module] = (A, B)
        if not self.modules:
            raise ValueError(f"{origin}: the adapter holds no LoRA weights")


def _check_supported(config: dict, origin: str) -> None:
    peft_type = config.get("peft_type", "LORA")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()  # PeftType enum or its string
    if peft_type != "LORA":
        raise ValueError(f"{origin}: only LoRA adapters are supported, got peft_type={peft_type!r}")
    if "r" not in config:
        raise ValueError(f"{origin}: adapter config has no 'r'")
    refused = {
        "use_dora": "DoRA adapters (use_dora=True) are not supported: their magnitude vector changes the math",
        "modules_to_save": "adapters with modules_to_save are not supported: they train full copies of modules",
        "lora_bias": "adapters with lora_bias=True (a trained bias on lora_B) are not supported",
        "target_parameters": "adapters on parameters (target_parameters) are not supported",
        "trainable_token_indices": "adapters with trainable_token_indices are not supported",
        "layer_replication": "adapters with layer_replication are not supported",
        "rank_pattern": "adapters with a rank_pattern are not supported",
        "alpha_pattern": "adapters with an alpha_pattern are not supported",
        "alora_invocation_tokens": "activated LoRA adapters (alora_invocation_tokens) are not supported: they "
                                   "apply the adapter only from the invocation tokens on",
    }
    for key, message in refused.items():
        if config.get(key):
            raise ValueError(f"{origin}: {message}")
    bias = config.get("bias", "none")
    if getattr(bias, "value", bias) not in ("none", None):
        raise ValueError(f"{origin}: adapters with bias={config['bias']!r} (trained biases) are not supported")


def _changes_the_base(config: dict) -> bool:
    """PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA initialise from the base weight and replace it by a
    residual W - s B0 A0 (or a quantisation's): such an adapter is only right on that residual."""
    init = config.get("init_lora_weights", True)
    return (isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS)) or bool(config.get("loftq_config"))


def _same_weight(weight: torch.Tensor, saved: torch.Tensor) -> bool:
    """Equal at the narrower of the two precisions: an adapter trained on a bf16 load of a checkpoint
    carries a bf16 copy, which the fp32 load of the same checkpoint rounds to exactly."""
    saved = saved.to(weight.device)
    if saved.dtype.itemsize < weight.dtype.itemsize:
        return torch.equal(weight.to(saved.dtype), saved)
    return torch.equal(weight, saved.to(weight.dtype))


def _read_adapter_dir(path: str | os.PathLike) -> _Adapter:
    path = os.fspath(path)
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    with open(config_file) as f:
        config = json.load(f)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        state_dict = load_file(weights)
    elif os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS_BIN)):
        state_dict = torch.load(os.path.join(path, ADAPTER_WEIGHTS_BIN), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}")
    return _Adapter(config, state_dict, path)


def _is_peft_model(obj) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, PeftModel)


def _read_peft_model(peft_model, adapter_names) -> list[_Adapter]:
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = [n for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer) and m.merged]
    if merged:  # its base weights hold W + s B A: unloading it and adding s B A would apply the delta twice
        raise ValueError(f"the PeftModel has adapters merged into its base weights ({merged[0]}, ...): call "
                         "peft_model.unmerge_adapter() first")

    names = list(adapter_names) if adapter_names is not None else list(peft_model.peft_config)
    adapters = []
    for name in names:
        if name not in peft_model.peft_config:
            raise ValueError(f"the PeftModel has no adapter {name!r}; it has {list(peft_model.peft_config)}")
        config = peft_model.peft_config[name].to_dict()
        state_dict = get_peft_model_state_dict(peft_model, adapter_name=name)
        adapters.append(_Adapter(config, state_dict, f"adapter {name!r}"))
    return adapters


def from_peft(
    sources,
    base_model: nn.Module | None = None,
    *,
    adapter_names: Sequence[str] | None = None,
    lora_dropout: float | None = None,
    layout: str = "batch_major",
    backend: str | None = None,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load K PEFT LoRA adapters as the K hypotheses of one patched model; returns the model.

    sources: a PeftModel holding K adapters (all, in order, or those in adapter_names), or a
    sequence of adapter directories and/or PeftModels (each contributes its active adapter).
    base_model: the model to patch; by default the base of the (first) PeftModel, whose LoRA
    layers are removed with PeftModel.unload() (so that PeftModel is consumed). lora_dropout
    defaults to the first adapter's. adapter_dtype: the dtype of lora_A / lora_B; by default the
    adapters' own (their promoted dtype if they differ), so that fp32 adapters on a 16-bit base, as
    PEFT keeps them, stay fp32 master weights (the forward casts them to the base dtype); pass the
    base dtype for inference, where that cast per call is not wanted.
    """
    if _is_peft_model(sources):
        adapters = _read_peft_model(sources, adapter_names)
        peft_models = [sources]
    else:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        if adapter_names is not None:
            raise ValueError("adapter_names applies only when sources is a single PeftModel")
        adapters, peft_models = [], []
        for source in sources:
            if _is_peft_model(source):
                adapters.extend(_read_peft_model(source, [source.active_adapter]))
                peft_models.append(source)
            elif isinstance(source, (str, os.PathLike)):
                adapters.append(_read_adapter_dir(source))
            else:
                raise TypeError(f"sources must hold adapter directories or PeftModels, got {type(source).__name__}")
    if not adapters:
        raise ValueError("from_peft needs at least one adapter")
    changing = [a.origin for a in adapters if a.changes_the_base]
    # such an adapter is right only on the residual base its PeftModel holds (kept by unload()), and
    # K of them would each need their own base
    if changing and (base_model is not None or len(peft_models) != 1 or len(adapters) > 1):
        raise ValueError(
            f"{changing[0]}: its init_lora_weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) replaced the base weight "
            "by a residual, which the hypotheses would have to share: convert it to a plain LoRA adapter first "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...)), or load a single one "
            "from its PeftModel (from_peft(peft_model), which keeps the residual)")
    if base_model is None:
        if not peft_models:
            raise ValueError("base_model is required when every source is an adapter directory")
        base_model = peft_models[0].unload()

    if adapter_dtype is None:  # the adapters' own precision, never rounded silently
        adapter_dtype = functools.reduce(torch.promote_types, (t.dtype for a in adapters
                                                               for pair in a.modules.values() for t in pair))
    module_names = sorted(set().union(*(a.modules for a in adapters)))
    available = dict(base_model.named_modules())
    missing = [n for n in module_names if n not in available]
    if missing:
        raise ValueError(f"the adapters target modules that {type(base_model).__name__} lacks: {missing[:8]}")
    for adapter in adapters:
        for name, saved in adapter.base_weights.items():
            weight = getattr(available.get(name), "weight", None)
            if not (isinstance(weight, torch.Tensor) and weight.shape == saved.shape
                    and _same_weight(weight.detach(), saved)):
                raise ValueError(
                    f"{adapter.origin}: it carries a copy of {name}'s base weight (PEFT saves one for an adapted "
                    f"lm_head or a resized vocabulary) that differs from the base model's: load it onto the model "
                    "it was trained on (resize its embeddings first)")
    dropouts = sorted({a.lora_dropout for a in adapters})
    if lora_dropout is None and len(dropouts) > 1:  # one p for every hypothesis of a layer
        warnings.warn(f"the adapters' lora_dropout differ ({dropouts}): every hypothesis trains with the first "
                      f"adapter's, {adapters[0].lora_dropout}; pass lora_dropout to choose", stacklevel=2)
    num_hypotheses = len(adapters)
    r = max(a.r for a in adapters)
    same = len({(a.r, a.lora_alpha, a.use_rslora) for a in adapters}) == 1
    # Identical adapters keep their own (r, alpha, rsLoRA); otherwise every s_k is folded into B_k.
    lora_alpha, use_rslora = (adapters[0].lora_alpha, adapters[0].use_rslora) if same else (float(r), False)
    patch_model(
        base_model,
        num_hypotheses,
        r,
        lora_alpha,
        target_modules="|".join(re.escape(n) for n in module_names),
        lora_dropout=adapters[0].lora_dropout if lora_dropout is None else lora_dropout,
        layout=layout,
        use_rslora=use_rslora,
        backend=backend,
        adapter_dtype=adapter_dtype,
    )
    try:
        _load_adapters(base_model, module_names, adapters)
    except BaseException:
        unpatch_model(base_model)  # the caller's model as it was
        raise
    return base_model


def _load_adapters(base_model: nn.Module, module_names: list[str], adapters: list[_Adapter]) -> None:
    with torch.no_grad():
        for name in module_names:
            module = base_model.get_submodule(name)
            assert isinstance(module, MultiLoRALinear)
            # A_k = B_k = 0 where adapter k has no LoRA: the module unchanged for hypothesis k, and
            # both gradients 0, so training does not grow an adapter PEFT's adapter k does not have
            module.lora_A.zero_()
            module.lora_B.zero_()
            for k, adapter in enumerate(adapters):
                if name not in adapter.modules:
                    continue
                A, B = adapter.modules[name]
                if A.shape[1] != module.in_features or B.shape[0] != module.out_features:
                    raise ValueError(
                        f"{adapter.origin}: module {name!r} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}, "
                        f"but the base layer maps {module.in_features} -> {module.out_features}"
                    )
                fold = adapter.scaling / module.scaling
                module.lora_A[k, : adapter.r].copy_(A)
                # the fold in fp32 at least (fp64 adapters keep fp64)
                module.lora_B[k, :, : adapter.r].copy_(B.to(torch.promote_types(B.dtype, torch.float32)) * fold
                                                       if fold != 1.0 else B)
