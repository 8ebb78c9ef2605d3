"""loramcl_kernels: fused kernels for LoRA-MCL (K LoRA hypotheses of one language model).

Ops:      multi_lora_linear, mcl_loss
Backends: 'reference' (pure PyTorch), 'triton'; see loramcl_kernels._backend.
"""
__version__ = "0.1.0"

from loramcl_kernels.ops.multi_lora_linear import multi_lora_linear, multi_lora_linear_ref  # noqa: E402

__all__ = ["multi_lora_linear", "multi_lora_linear_ref"]
