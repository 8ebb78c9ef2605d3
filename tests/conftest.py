"""Test configuration shared by every test module.

Without a CUDA device the Triton kernels are exercised on CPU tensors through the Triton
interpreter, which must be switched on before anything imports triton. Compiled graphs go to a
fresh inductor cache.
"""
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh on-disk inductor / AOTAutograd cache per test session: those caches key an entry on the
# Dynamo graph, which names the custom ops but not their schemas, so an entry compiled before an
# edit of an op's schema would be handed back after it.
_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="loramcl-inductor-")


def pytest_sessionfinish(session, exitstatus):
    if _INDUCTOR_CACHE is not None:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
