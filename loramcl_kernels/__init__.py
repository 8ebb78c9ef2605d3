"""loramcl_kernels: fused kernels for LoRA-MCL (K LoRA hypotheses of one language model).

Ops:      multi_lora_linear, mcl_loss (+ mcl_loss_from_logits)
Modules:  MultiLoRALinear, patch_model / unpatch_model, MCLModel, generate_hypotheses
Interop:  PEFT adapters (from_peft, save_hypothesis) and the official LoRA-MCL layer
Backends: 'reference' (pure PyTorch), 'triton'; see loramcl_kernels._backend.
"""
__version__ = "0.1.0"

from loramcl_kernels.hf import (  # noqa: E402
    AnnealingSchedule,
    MCLModel,
    MCLOutput,
    MultiLoRAConfig,
    active_hypothesis,
    generate_hypotheses,
    lora_attributes,
    multi_lora_modules,
    patch_model,
    unpatch_model,
)
from loramcl_kernels.interop import (  # noqa: E402
    from_peft,
    load_official,
    load_official_state_dict,
    official_loss_hook,
    official_state_dict,
    patch_group_linear,
    save_hypothesis,
    save_official,
    unpatch_group_linear,
)
from loramcl_kernels.modules import MultiLoRALinear  # noqa: E402
from loramcl_kernels.ops.mcl_loss import MCLLoss, MCLLossOutput, mcl_loss, mcl_loss_from_logits  # noqa: E402
from loramcl_kernels.ops.multi_lora_linear import multi_lora_linear, multi_lora_linear_ref  # noqa: E402

__all__ = [
    "multi_lora_linear",
    "multi_lora_linear_ref",
    "mcl_loss",
    "mcl_loss_from_logits",
    "MCLLoss",
    "MCLLossOutput",
    "MultiLoRALinear",
    "patch_model",
    "unpatch_model",
    "MultiLoRAConfig",
    "multi_lora_modules",
    "active_hypothesis",
    "lora_attributes",
    "MCLModel",
    "MCLOutput",
    "AnnealingSchedule",
    "generate_hypotheses",
    "from_peft",
    "save_hypothesis",
    "patch_group_linear",
    "unpatch_group_linear",
    "official_state_dict",
    "load_official_state_dict",
    "save_official",
    "load_official",
    "official_loss_hook",
]
