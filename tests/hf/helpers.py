"""Shared test helpers: tiny HF models built from configs, and an unfused re-implementation of
the official LoRA-MCL math (grouped 1x1 convolutions over batch-major rows) to compare against."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from loramcl_kernels.hf.patching import multi_lora_modules

VOCAB = 61


def tiny_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed=0, layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed=0, layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


def randomize_lora(model, seed=1, scale=0.3):
    """Non-zero lora_B (a fresh B is zero, which would hide every LoRA bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in multi_lora_modules(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * scale)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


class OfficialMathLinear(nn.Module):
    """y = base(x) + scaling * grouped-conv LoRA, rows batch-major (n -> n % K) or hypothesis-major.

    conv_A: [K*r, d_in, 1], conv_B: [K*d_out, r, 1] as in the official GroupLinear layer."""

    def __init__(self, base, num_hypotheses, conv_A, conv_B, scaling, layout="batch_major"):
        super().__init__()
        self.base = base
        self.K = num_hypotheses
        self.conv_A = nn.Parameter(conv_A.detach().clone())
        self.conv_B = nn.Parameter(conv_B.detach().clone())
        self.scaling = scaling
        self.layout = layout

    def forward(self, x):
        K = self.K
        N, T, d_in = x.shape
        G = N // K
        if self.layout == "batch_major":
            xg = x.reshape(G, K, T, d_in)
        else:
            xg = x.reshape(K, G, T, d_in).transpose(0, 1)
        h = xg.permute(0, 1, 3, 2).reshape(G, K * d_in, T)
        h = F.conv1d(F.conv1d(h, self.conv_A, groups=K), self.conv_B, groups=K)  # (G, K*d_out, T)
        d_out = h.shape[1] // K
        h = h.reshape(G, K, d_out, T).permute(0, 1, 3, 2)  # (G, K, T, d_out)
        if self.layout != "batch_major":
            h = h.transpose(0, 1)
        return self.base(x) + self.scaling * h.reshape(N, T, d_out)


def official_math_copy(patched_model, layout="batch_major"):
    """A deep copy of a patched model whose MultiLoRALinear modules are OfficialMathLinear ones
    holding the same adapters in the official grouped-conv layout."""
    ref = copy.deepcopy(patched_model)
    for name, m in multi_lora_modules(ref):
        K, r, d_in = m.lora_A.shape
        conv_A = m.lora_A.detach().reshape(K * r, d_in, 1)
        conv_B = m.lora_B.detach().reshape(K * m.out_features, r, 1)
        new = OfficialMathLinear(m.base_layer, K, conv_A, conv_B, m.scaling, layout)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, new)
    for p in ref.parameters():
        p.requires_grad_(False)
    for mod in ref.modules():
        if isinstance(mod, OfficialMathLinear):
            mod.conv_A.requires_grad_(True)
            mod.conv_B.requires_grad_(True)
    return ref


def official_math_grads(ref):
    """{module name: (dA (K, r, d_in), dB (K, d_out, r))} of an official_math_copy."""
    out = {}
    for name, mod in ref.named_modules():
        if isinstance(mod, OfficialMathLinear):
            K = mod.K
            out[name] = (
                mod.conv_A.grad.reshape(K, -1, mod.conv_A.shape[1]),
                mod.conv_B.grad.reshape(K, -1, mod.conv_B.shape[1]),
            )
    return out


def reference_mcl_loss(logits, labels, K, layout="batch_major", mode="wta", epsilon=0.0, temperature=None,
                       sequence_reduction="mean", ignore_index=-100):
    """Official loss from full logits (B*K, T, V): shifted CE, per-sequence token mean (or sum), weights."""
    BK, T, V = logits.shape
    B = BK // K
    lab = labels.repeat_interleave(K, 0) if layout == "batch_major" else labels.repeat(K, 1)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).to(torch.promote_types(logits.dtype, torch.float32)),
                         lab[:, 1:].reshape(-1), reduction="none", ignore_index=ignore_index)
    ce = ce.view(BK, T - 1)
    mask = (lab[:, 1:] != ignore_index).to(ce.dtype)
    per_row = (ce * mask).sum(1)
    if sequence_reduction == "mean":
        per_row = per_row / mask.sum(1).clamp(min=1)
    L = per_row.view(B, K).t() if layout == "batch_major" else per_row.view(K, B)
    winners = L.detach().argmin(0)
    if mode == "wta":
        w = F.one_hot(winners, K).t().to(L.dtype)
    elif mode == "relaxed":
        w = torch.full_like(L, epsilon / (K - 1))
        w.scatter_(0, winners[None], 1 - epsilon)
    else:
        w = torch.softmax(-L.detach() / temperature, dim=0)
    return (w * L).sum(0).mean(), L.detach(), winners, w


def assert_close_to_scale(value, expected, rel=1e-6):
    """max |value - expected| <= rel * max |expected|. For fp64 HF models, whose RMSNorm / softmax
    still run in fp32: summation-order differences flip an fp32 rounding now and then, which
    shows as ~1e-8 of the tensor's scale, however small a single element is."""
    err = (value - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} exceeds {rel:g} x scale {scale:.3e}"


def tiny_qwen2_audio(seed=0):
    """A tiny Qwen2-Audio (audio encoder + Qwen2 decoder); audio token id 63 marks 4 positions
    per 16-frame clip."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          num_mel_bins=8, max_source_positions=8),
        text_config=dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=40,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                         eos_token_id=2),
        audio_token_index=63,
    )
    return Qwen2AudioForConditionalGeneration(cfg).eval()


def audio_inputs(B=2, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (B, T), generator=g)
    ids[:, 1:5] = 63
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": torch.randn(B, 8, 16, generator=g),
        "feature_attention_mask": torch.ones(B, 16, dtype=torch.long),
    }
