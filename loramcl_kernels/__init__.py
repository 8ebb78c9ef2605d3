"""loramcl_kernels: fused kernels for LoRA-MCL (K LoRA hypotheses of one language model).

Ops:      multi_lora_linear, mcl_loss (+ mcl_loss_from_logits)
Backends: 'reference' (pure PyTorch), 'triton'; see loramcl_kernels._backend.
"""
__version__ = "0.1.0"

from loramcl_kernels.ops.mcl_loss import MCLLoss, MCLLossOutput, mcl_loss, mcl_loss_from_logits  # noqa: E402
from loramcl_kernels.ops.multi_lora_linear import multi_lora_linear, multi_lora_linear_ref  # noqa: E402

__all__ = [
    "multi_lora_linear",
    "multi_lora_linear_ref",
    "mcl_loss",
    "mcl_loss_from_logits",
    "MCLLoss",
    "MCLLossOutput",
]
