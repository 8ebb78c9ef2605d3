"""The README's Python examples run as written and compute what they say."""
import os
import re

import torch

from loramcl_kernels.ops.mcl_loss import mcl_loss as mcl_loss_op

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


def tiny_llama(vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_readme_has_the_three_examples():
    assert len(python_blocks()) == 3


def test_multi_lora_linear_example():
    ns = {}
    exec(python_blocks()[0], ns)
    x, W, A, Bm, K = ns["x"], ns["W"], ns["A"], ns["Bm"], ns["K"]
    hyp = torch.arange(x.shape[0]) % K  # batch-major
    want = x @ W.t() + 2.0 * torch.einsum("ntr,nor->nto", torch.einsum("ntd,nrd->ntr", x, A[hyp]), Bm[hyp])
    torch.testing.assert_close(ns["y"], want, rtol=1e-4, atol=1e-4)
    xs = x[: ns["B"]]
    want_all = torch.stack([xs @ W.t() + 2.0 * (xs @ A[k].t()) @ Bm[k].t() for k in range(K)], 1)
    torch.testing.assert_close(ns["y_all"], want_all.reshape(-1, *xs.shape[1:-1], W.shape[0]), rtol=1e-4, atol=1e-4)


def test_mcl_loss_example():
    K, B, T = 3, 2, 6
    model = tiny_llama()
    hidden = torch.randn(B * K, T, 32, requires_grad=True)
    labels = torch.randint(3, 64, (B, T))
    ns = {"model": model, "hidden": hidden, "labels": labels, "K": K}
    exec(python_blocks()[1], ns)
    out = ns["out"]
    assert out.nll.shape == (K, B) and out.winners.shape == (B,)
    torch.testing.assert_close(out.winners, out.nll.argmin(0))
    torch.testing.assert_close(out.weights.sum(0), torch.ones(B))
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    ref = mcl_loss_op(hidden.detach(), model.lm_head.weight, labels, num_hypotheses=K, backend="reference")
    torch.testing.assert_close(out.loss.detach(), ref.loss)


def test_hf_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 8))
    labels = ids.clone()
    labels[:, :4] = -100
    ns = {"model": model, "ids": ids, "mask": torch.ones_like(ids), "labels": labels, "prompt": ids[:, :4]}
    exec(python_blocks()[2], ns)
    assert torch.isfinite(ns["out"].loss)
    assert ns["hyps"].shape[:2] == (2, 5) and ns["hyps"].dtype == torch.long
    assert (tmp_path / "adapter_k2" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter_k2" / "adapter_config.json").exists()
