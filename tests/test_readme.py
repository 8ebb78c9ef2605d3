"""The README's Python examples run as written and compute what they say."""
import os
import re

import pytest
import torch

from loramcl_kernels import unpatch_model
from loramcl_kernels.hf.patching import active_hypothesis

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
    # the official recipe written out: full logits, shifted per-token CE, per-sequence mean, min over k
    logits = hidden.detach() @ model.lm_head.weight.detach().t()  # (B*K, T, V), row b*K + k
    targets = labels.repeat_interleave(K, 0)[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           reduction="none").view(B * K, T - 1)
    nll = ce.mean(1).view(B, K).t()
    torch.testing.assert_close(out.nll, nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), nll.min(0).values.mean(), rtol=1e-5, atol=1e-6)


def test_hf_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 8))
    labels = ids.clone()
    labels[:, :4] = -100
    ns = {"model": model, "ids": ids, "mask": torch.ones_like(ids), "labels": labels, "prompt": ids[:, :4]}
    exec(python_blocks()[2], ns)
    assert torch.isfinite(ns["out"].loss)
    model, hyps = ns["model"], ns["hyps"]
    assert hyps.dtype == torch.long and hyps.shape[:2] == (2, 5)
    # hypothesis 2's continuation is what the model generates with adapter 2 alone, and the saved
    # adapter is hypothesis 2 as a standard PEFT adapter: the same logits through peft
    with active_hypothesis(model, 2):
        alone = model.generate(input_ids=ns["prompt"], max_new_tokens=32, do_sample=False)[:, 4:]
        logits_k2 = model(input_ids=ids).logits
    torch.testing.assert_close(hyps[:, 2, : alone.shape[1]], alone, rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    base = unpatch_model(model)
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter_k2")).eval()(input_ids=ids).logits
    torch.testing.assert_close(via_peft, logits_k2, rtol=1e-4, atol=1e-5)
