"""Exit 0 when both ops run forward and backward on the GPU with the default launch path."""
import sys

import torch

import loramcl_kernels as lk

if not torch.cuda.is_available():
    print("no GPU: nothing to check")
    sys.exit(0)
dev, dt = "cuda", torch.bfloat16
x = torch.randn(40, 256, device=dev, dtype=dt, requires_grad=True)
w = torch.randn(128, 256, device=dev, dtype=dt) / 16
a = torch.randn(4, 8, 256, device=dev, dtype=dt, requires_grad=True)
b = torch.randn(4, 128, 8, device=dev, dtype=dt, requires_grad=True)
y = lk.multi_lora_linear(x, w, None, a, b, 2.0, num_hypotheses=4)
y.float().square().sum().backward()
hidden = torch.randn(8, 16, 64, device=dev, dtype=dt, requires_grad=True)
head = torch.randn(1000, 64, device=dev, dtype=dt)
labels = torch.randint(0, 1000, (2, 16), device=dev)
for mode, temperature in (("wta", None), ("annealed", 1.0)):
    out = lk.mcl_loss(hidden, head, labels, num_hypotheses=4, mode=mode, temperature=temperature)
    out.loss.backward()
torch.cuda.synchronize()
print("launch smoke ok:", float(y.detach().float().abs().mean()), float(out.loss.detach()))
