"""HuggingFace integration: patch a model with K LoRA hypotheses, train it with the MCL loss,
decode all K hypotheses in one batched generate call."""
from loramcl_kernels.hf.generation import generate_hypotheses
from loramcl_kernels.hf.mcl_model import AnnealingSchedule, MCLModel, MCLOutput, final_hidden_states, mcl_forward
from loramcl_kernels.hf.patching import (
    DEFAULT_TARGET_MODULES,
    MultiLoRAConfig,
    active_hypothesis,
    lora_attributes,
    multi_lora_modules,
    patch_model,
    unpatch_model,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AnnealingSchedule",
    "MCLModel",
    "MCLOutput",
    "MultiLoRAConfig",
    "active_hypothesis",
    "final_hidden_states",
    "generate_hypotheses",
    "lora_attributes",
    "mcl_forward",
    "multi_lora_modules",
    "patch_model",
    "unpatch_model",
]
