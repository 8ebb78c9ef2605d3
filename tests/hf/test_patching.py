"""patch_model / unpatch_model on tiny Llama, Qwen2 and GPT-2 models, against an unfused
re-implementation of the official LoRA-MCL math (grouped 1x1 convolutions)."""
import pytest
import torch

from loramcl_kernels.hf.patching import (
    active_hypothesis,
    lora_attributes,
    multi_lora_modules,
    patch_model,
    unpatch_model,
)

from tests.hf.helpers import (
    TARGETS,
    TINY_MODELS,
    VOCAB,
    assert_close_to_scale,
    official_math_copy,
    official_math_grads,
    randomize_lora,
    tiny_llama,
)

K, R, ALPHA = 3, 4, 8


def _batch(B=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layout", ["batch_major", "hypothesis_major"])
def test_patched_matches_official_math(arch, layout):
    # fp64 so that the comparison is exact up to summation order.
    model = patch_model(TINY_MODELS[arch]().double(), K, R, ALPHA, target_modules=TARGETS[arch], layout=layout)
    randomize_lora(model)
    ref = official_math_copy(model, layout)
    ids = _batch().repeat_interleave(K, 0) if layout == "batch_major" else _batch().repeat(K, 1)
    ids = ids.clone()
    ids[0, 3] = 5  # rows differ even inside a repeated group

    out = model(input_ids=ids).logits
    out_ref = ref(input_ids=ids).logits
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    # The hypotheses really differ.
    assert (out[1] - out[2 if layout == "batch_major" else 4]).abs().max() > 1e-3

    w = torch.randn_like(out)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    grads = official_math_grads(ref)
    modules = multi_lora_modules(model)
    assert len(modules) == len(grads) > 0
    for name, m in modules:
        dA, dB = grads[name]
        assert_close_to_scale(m.lora_A.grad, dA)
        assert_close_to_scale(m.lora_B.grad, dB)


def test_patch_freezes_and_unpatch_restores():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    q_proj = model.model.layers[0].self_attn.q_proj
    ids = _batch()
    base_logits = model(input_ids=ids).logits

    patch_model(model, K, R, ALPHA)
    names = [n for n, _ in multi_lora_modules(model)]
    assert len(names) == 2 * 5 and all(n.rsplit(".", 1)[1] in TARGETS["llama"] for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{w}" for n in names for w in "AB"}
    assert model.model.layers[0].self_attn.q_proj.base_layer is q_proj
    # Fresh adapters (B = 0) compute the base model exactly.
    torch.testing.assert_close(model(input_ids=ids.repeat_interleave(K, 0)).logits,
                               base_logits.repeat_interleave(K, 0), rtol=1e-5, atol=1e-5)
    assert model.loramcl_config.num_hypotheses == K and model.loramcl_config.module_names == names

    unpatch_model(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert not multi_lora_modules(model) and not hasattr(model, "loramcl_config")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    torch.testing.assert_close(model(input_ids=ids).logits, base_logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unpatch_merge_equals_single_adapter_mode(arch):
    model = patch_model(TINY_MODELS[arch](), K, R, ALPHA, target_modules=TARGETS[arch])
    randomize_lora(model)
    ids = _batch()
    with active_hypothesis(model, 1):
        single = model(input_ids=ids).logits
    # Single-adapter mode = the K-row batch's hypothesis-1 rows.
    torch.testing.assert_close(model(input_ids=ids.repeat_interleave(K, 0)).logits[1::K], single,
                               rtol=1e-5, atol=1e-5)
    assert all(m.active_hypothesis is None for _, m in multi_lora_modules(model))
    unpatch_model(model, merge_hypothesis=1)
    assert not multi_lora_modules(model)
    torch.testing.assert_close(model(input_ids=ids).logits, single, rtol=1e-4, atol=1e-5)


def test_regex_targets_and_routing_attributes():
    model = patch_model(tiny_llama(), 2, 2, target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert [n for n, _ in multi_lora_modules(model)] == ["model.layers.1.self_attn.q_proj",
                                                          "model.layers.1.self_attn.v_proj"]
    assert model.loramcl_config.lora_alpha == 2.0  # alpha defaults to r
    with lora_attributes(model, inner=3, layout="hypothesis_major"):
        assert all(m.inner == 3 and m.layout == "hypothesis_major" for _, m in multi_lora_modules(model))
    assert all(m.inner == 1 and m.layout == "batch_major" for _, m in multi_lora_modules(model))
    with pytest.raises(ValueError, match="unknown MultiLoRALinear attributes"):
        with lora_attributes(model, rank=3):
            pass
    with pytest.raises(ValueError, match=r"hypothesis must be an int in \[0, 2\)"):
        with active_hypothesis(model, 2):
            pass


def test_bad_arguments():
    with pytest.raises(ValueError, match="no module of LlamaForCausalLM matches target_modules"):
        patch_model(tiny_llama(), K, R, target_modules=("c_attn",))
    with pytest.raises(ValueError, match="num_hypotheses must be an integer >= 1"):
        patch_model(tiny_llama(), 0, R)
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        patch_model(tiny_llama(), K, 0)
    with pytest.raises(ValueError, match="layout must be one of"):
        patch_model(tiny_llama(), K, R, layout="rows")
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        patch_model(tiny_llama(), K, R, lora_dropout=1.0)
    with pytest.raises(TypeError, match="not nn.Linear or transformers Conv1D: model.embed_tokens"):
        patch_model(tiny_llama(), K, R, target_modules=("embed_tokens",))
    with pytest.raises(TypeError, match="target_modules must be a regex string or a list"):
        patch_model(tiny_llama(), K, R, target_modules=5)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        patch_model(tiny_llama(), K, R, target_modules="([")
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            patch_model(tiny_llama(), K, R, lora_alpha=alpha)
    np = pytest.importorskip("numpy")
    numpy_ints = patch_model(tiny_llama(), np.int64(K), np.int64(R))
    assert numpy_ints.loramcl_config.num_hypotheses == K and type(numpy_ints.loramcl_config.r) is int
    model = patch_model(tiny_llama(), K, R)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, K, R)
    with pytest.raises(ValueError, match="no MultiLoRALinear modules"):
        unpatch_model(tiny_llama())


def test_torch_compile_patched_model():
    """torch.compile(fullgraph=True) of a whole patched HF model in training mode (one graph, as
    CUDA graphs of a training step need) equals eager, forward and backward."""
    torch._dynamo.reset()
    model = patch_model(tiny_llama(layers=1), 2, R, ALPHA).train()
    randomize_lora(model)
    ids = _batch(B=2, T=5).repeat_interleave(2, 0)
    eager = model(input_ids=ids).logits
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(input_ids=ids).logits
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_torch_compile_changing_shapes_recompile_as_the_unpatched_model():
    """Batch sizes and sequence lengths that change between steps (dynamic=True): the patched model
    compiles as many frames as the unpatched one (the package adds no shape guard), same values."""
    from torch._dynamo.testing import CompileCounterWithBackend

    frames = {}
    for patched in (False, True):
        torch._dynamo.reset()
        model = tiny_llama(layers=1).train()
        if patched:
            model = patch_model(model, 2, R, ALPHA).train()
            randomize_lora(model)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
        for B, T in ((2, 5), (4, 7), (3, 9), (5, 4)):
            ids = _batch(B=B, T=T).repeat_interleave(2, 0)
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5,
                                       atol=1e-5)
        frames[patched] = counter.frame_count
    assert frames[True] == frames[False]
    torch._dynamo.reset()


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=40, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, dropout=0.0, pad_token_id=0)
    return OPTForCausalLM(cfg).double().eval(), ["q_proj", "v_proj", "fc1", "fc2"]


def _tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return Qwen2MoeForCausalLM(cfg).eval(), None  # fp32: its experts' grouped GEMM has no fp64 on the CPU


@pytest.mark.parametrize("arch", ["opt", "qwen2_moe"])
@pytest.mark.parametrize("layout", ["batch_major", "hypothesis_major", "ids"])
@pytest.mark.parametrize("T", [7, K])
def test_layers_fed_flattened_token_rows(arch, layout, T):
    """Models that flatten (N, T, d) activations to (N*T, d) token rows before a patched layer
    (OPT's fc1 / fc2; Qwen2-MoE's shared expert, a default target): every token row is served by
    its sequence's hypothesis, as the model with that hypothesis merged computes it; also where
    T = K, when the N*T token rows are as many as N*K rows of sequences."""
    import copy

    model, targets = (_tiny_opt if arch == "opt" else _tiny_qwen2_moe)()
    model = patch_model(model, K, R, ALPHA, **({"target_modules": targets} if targets else {}),
                        layout="batch_major" if layout == "ids" else layout)
    assert any(".fc1" in n or "shared_expert.up_proj" in n for n, _ in multi_lora_modules(model))
    randomize_lora(model)
    ids = _batch(B=2, T=T)
    if layout == "hypothesis_major":
        rows, hyp_of_row = ids.repeat(K, 1), torch.arange(K).repeat_interleave(2)
    else:
        rows, hyp_of_row = ids.repeat_interleave(K, 0), torch.arange(2 * K) % K
    attributes = {}
    if layout == "ids":  # explicit ids, permuted and with a base-only row
        hyp_of_row = torch.tensor([2, -1, 0, 1, 1, 2])
        attributes = {"hypothesis_ids": hyp_of_row}
    tol = dict(rtol=1e-9, atol=1e-9) if arch == "opt" else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lora_attributes(model, **attributes):
        out = model(input_ids=rows).logits
    for k in range(-1, K):
        if not (hyp_of_row == k).any():
            continue
        copy_k = copy.deepcopy(model)
        merged = unpatch_model(copy_k) if k < 0 else unpatch_model(copy_k, merge_hypothesis=k)
        assert not any(type(h).__name__ in ("BatchShape", "_InnerBatchShape")
                       for m in merged.modules() for h in m._forward_pre_hooks.values())
        with torch.no_grad():
            want = merged(input_ids=rows[hyp_of_row == k]).logits
        torch.testing.assert_close(out[hyp_of_row == k], want, **tol)


def test_a_decoder_called_directly_routes_by_its_own_batch():
    """model.model(...) called directly (a custom head on the decoder's hidden states) after a forward
    of another shape with as many token rows: OPT's fc1 / fc2 token rows follow the decoder's own
    (N, T), not the last top-level forward's."""
    model, targets = _tiny_opt()
    model = patch_model(model, K, R, ALPHA, target_modules=targets)
    randomize_lora(model)
    ids = _batch(B=8, T=3, seed=1)
    with torch.no_grad():
        model(input_ids=_batch(B=4, T=6).repeat_interleave(K, 0))  # 4K x 6 token rows, as many as 8K x 3
        got = model.model(input_ids=ids.repeat_interleave(K, 0)).last_hidden_state
        for k in range(K):
            with active_hypothesis(model, k):
                want = model.model(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got[k::K], want, rtol=1e-9, atol=1e-9)


def test_rows_that_are_neither_sequences_nor_tokens_are_refused():
    """A patched layer fed a subset of the token rows (a routed MoE expert's share) cannot tell each
    row's hypothesis: it raises instead of guessing; the model's own sequences and their tokens pass."""
    from loramcl_kernels.modules import BatchShape, MultiLoRALinear

    layer = MultiLoRALinear(torch.nn.Linear(8, 8), K, R, init_lora_weights=False)
    layer.batch_shape = shape = BatchShape()
    shape(None, (), {"input_ids": torch.zeros(2 * K, 5, dtype=torch.long)})  # what the model's pre-hook does
    layer(torch.randn(2 * K, 5, 8))
    layer(torch.randn(2 * K * 5, 8))
    with pytest.raises(ValueError, match="neither the sequences nor their tokens"):
        layer(torch.randn(4 * K, 8))
    standalone = MultiLoRALinear(torch.nn.Linear(8, 8), K, R)  # no model: x's first dim is the batch
    standalone(torch.randn(4 * K, 8))


def test_a_tied_lm_head_as_target_is_refused():
    """Qwen2 with tied embeddings: its lm_head's weight is the input embedding's, which HF re-ties,
    resizes and saves as one tensor; patching it would break those, so patch_model refuses it."""
    model = TINY_MODELS["qwen2"]()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied to another module's"):
        patch_model(model, K, R, ALPHA, target_modules=["q_proj", "lm_head"])
    assert not multi_lora_modules(model)  # nothing patched
    untied = TINY_MODELS["llama"]()
    assert len(multi_lora_modules(patch_model(untied, K, R, ALPHA, target_modules=["q_proj", "lm_head"]))) == 3


def test_default_targets_that_a_model_lacks_are_named():
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: with the default targets only
    down_proj would get adapters. patch_model warns and names the missing targets and the model's
    linear layers; a model that has all five (Llama) patches without a warning."""
    import warnings

    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      pad_token_id=0))
    with pytest.warns(UserWarning, match=r"\['q_proj', 'k_proj', 'v_proj', 'up_proj'\] match no module of "
                                         r"Phi3ForCausalLM.*only \['down_proj'\].*gate_up_proj.*qkv_proj"):
        patch_model(phi3, K, R, ALPHA)
    assert [n.rpartition(".")[2] for n, _ in multi_lora_modules(phi3)] == ["down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(tiny_llama(layers=1), K, R, ALPHA)


def test_targets_in_a_vision_tower_are_named_in_a_warning():
    """A vision-language model (config.vision_config) whose vision tower the targets match: patch_model
    warns that crops of one image take hypotheses by row (as the official layer trains) and how to
    adapt the language model alone; that regex, or a model without a vision tower, gives no warning."""
    import types
    import warnings

    class VisionLanguage(torch.nn.Module):
        def __init__(self, vision_config):
            super().__init__()
            self.config = types.SimpleNamespace(vision_config=vision_config)
            self.vision_tower = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)})
            self.language_model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8), "v_proj": torch.nn.Linear(8, 8)})
            self.lm_head = torch.nn.Linear(8, 8)  # text rows only: not the vision tower's

    with pytest.warns(UserWarning, match=r"1 layers of the vision tower \(e.g. vision_tower.q_proj\)"):
        patch_model(VisionLanguage(object()), K, R, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        language_only = patch_model(VisionLanguage(object()), K, R,
                                    target_modules=r".*language_model.*\.(q|k|v|up|down)_proj|lm_head")
        assert [n for n, _ in multi_lora_modules(language_only)] == [
            "language_model.q_proj", "language_model.v_proj", "lm_head"]
        patch_model(VisionLanguage(None), K, R, target_modules=["q_proj"])


def test_all_linear_targets_every_linear_layer_but_the_output_layer():
    """PEFT's target_modules="all-linear": GPT-2's Conv1D layers and Llama's linear layers, not the lm_head."""
    for arch in ("llama", "gpt2"):
        base = TINY_MODELS[arch]()
        linear = sorted(n for n, m in base.named_modules()
                        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
        model = patch_model(base, K, R, ALPHA, target_modules="all-linear")
        assert sorted(n for n, _ in multi_lora_modules(model)) == [n for n in linear if n != "lm_head"]
        assert not model.lm_head.weight.requires_grad


def test_init_lora_weights():
    """True: Kaiming-uniform A, zero B; "gaussian" (PEFT's): A ~ N(0, 1/r^2), zero B; False: a non-zero
    B; anything else (PEFT's data-driven inits, typos) is refused before the model is touched."""
    big = 64
    model = patch_model(TINY_MODELS["llama"](), K, big, target_modules=["q_proj"], init_lora_weights="gaussian")
    for _, m in multi_lora_modules(model):
        assert (m.lora_B == 0).all() and abs(m.lora_A.std().item() * big - 1) < 0.1
    model = patch_model(TINY_MODELS["llama"](), K, big, target_modules=["q_proj"])
    for _, m in multi_lora_modules(model):
        bound = 1 / m.in_features**0.5
        assert (m.lora_B == 0).all() and m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
    model = patch_model(TINY_MODELS["llama"](), K, R, target_modules=["q_proj"], init_lora_weights=False)
    assert all((m.lora_B != 0).all() for _, m in multi_lora_modules(model))
    for bad in ("pissa", "olora", "nonsense", None, 1):
        base = TINY_MODELS["llama"]()
        with pytest.raises(ValueError, match="init_lora_weights must be True, False or 'gaussian'"):
            patch_model(base, K, R, init_lora_weights=bad)
        assert all(p.requires_grad for p in base.parameters())  # untouched
