"""Test configuration shared by every test module.

Without a CUDA device the Triton kernels are exercised on CPU tensors through the Triton
interpreter, which must be switched on before anything imports triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
