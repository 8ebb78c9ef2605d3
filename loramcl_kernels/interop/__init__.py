"""Interop: standard PEFT LoRA adapters and the official LoRA-MCL (grouped-conv) layer."""
from loramcl_kernels.interop.official import (
    load_official,
    load_official_state_dict,
    official_loss_hook,
    official_state_dict,
    official_to_multi_lora,
    multi_lora_to_official,
    patch_group_linear,
    save_official,
    unpatch_group_linear,
)
from loramcl_kernels.interop.peft_adapters import from_peft, save_hypothesis

__all__ = [
    "from_peft",
    "load_official",
    "load_official_state_dict",
    "multi_lora_to_official",
    "official_loss_hook",
    "official_state_dict",
    "official_to_multi_lora",
    "patch_group_linear",
    "save_hypothesis",
    "save_official",
    "unpatch_group_linear",
]
