"""PEFT interop: save_hypothesis writes an adapter PEFT loads with the same outputs; from_peft
loads K PEFT adapters (directories or PeftModels) as the K hypotheses."""
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from loramcl_kernels.hf.patching import active_hypothesis, multi_lora_modules, patch_model  # noqa: E402
from loramcl_kernels.interop.peft_adapters import from_peft, save_hypothesis  # noqa: E402

from tests.hf.helpers import TARGETS, TINY_MODELS, VOCAB, randomize_lora  # noqa: E402

K = 3


def _ids(B=2, T=6):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(5))


def _hypothesis_logits(model, k, ids):
    with active_hypothesis(model, k):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("gpt2", True)])
def test_save_hypothesis_loads_in_peft(tmp_path, arch, rslora):
    model = patch_model(TINY_MODELS[arch](), K, 4, 8, target_modules=TARGETS[arch], use_rslora=rslora)
    randomize_lora(model)
    ids = _ids()
    for k in (0, 2):
        save_hypothesis(model, k, tmp_path / f"h{k}")
        assert sorted(os.listdir(tmp_path / f"h{k}")) == ["adapter_config.json", "adapter_model.safetensors"]
        peft_model = PeftModel.from_pretrained(TINY_MODELS[arch](), tmp_path / f"h{k}")
        lora_layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert len(lora_layers) == len(multi_lora_modules(model))
        torch.testing.assert_close(peft_model(input_ids=ids).logits, _hypothesis_logits(model, k, ids),
                                   rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "h0" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(TARGETS[arch]) and config["use_rslora"] == rslora


def test_round_trip_dirs(tmp_path):
    model = patch_model(TINY_MODELS["qwen2"](), K, 4, 16, target_modules=TARGETS["qwen2"], lora_dropout=0.1)
    randomize_lora(model)
    dirs = []
    for k in range(K):
        save_hypothesis(model, k, tmp_path / str(k))
        dirs.append(tmp_path / str(k))
    loaded = from_peft(dirs, TINY_MODELS["qwen2"]())
    assert loaded.loramcl_config.lora_dropout == 0.1 and loaded.loramcl_config.lora_alpha == 16
    ours = dict(multi_lora_modules(model))
    for name, m in multi_lora_modules(loaded):
        assert torch.equal(m.lora_A, ours[name].lora_A) and torch.equal(m.lora_B, ours[name].lora_B)
    ids = _ids()
    torch.testing.assert_close(loaded(input_ids=ids.repeat_interleave(K, 0)).logits,
                               model(input_ids=ids.repeat_interleave(K, 0)).logits)


def _peft_with_adapters(configs, base=None):
    base = TINY_MODELS["llama"]() if base is None else base
    peft_model = get_peft_model(base, configs[0], adapter_name="a0")
    for i, cfg in enumerate(configs[1:], 1):
        peft_model.add_adapter(f"a{i}", cfg)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft_model.eval()


def test_from_peft_model_with_mixed_ranks_alphas_and_targets():
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "down_proj"], use_rslora=True),
        LoraConfig(r=8, lora_alpha=8, target_modules=["v_proj"]),
    ]
    peft_model = _peft_with_adapters(configs)
    ids = _ids()
    expected = []
    for i in range(3):
        peft_model.set_adapter(f"a{i}")
        expected.append(peft_model(input_ids=ids).logits)
    model = from_peft(peft_model)  # consumes the PeftModel: its base is unloaded and patched
    assert model.loramcl_config.num_hypotheses == 3 and model.loramcl_config.r == 8
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    joint = model(input_ids=ids.repeat_interleave(3, 0)).logits
    for k in range(3):
        torch.testing.assert_close(joint[k::3], expected[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_hypothesis_logits(model, k, ids), expected[k], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])


def test_from_peft_warns_when_the_adapters_dropouts_differ():
    """One LoRA dropout p serves every hypothesis of a layer: adapters trained with different ones
    get the first's, with a warning naming them; an explicit lora_dropout decides silently."""
    import warnings

    configs = [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=p) for p in (0.1, 0.05)]
    with pytest.warns(UserWarning, match=r"lora_dropout differ \(\[0.05, 0.1\]\).*first adapter's, 0.1"):
        model = from_peft(_peft_with_adapters(configs))
    assert model.loramcl_config.lora_dropout == 0.1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert from_peft(_peft_with_adapters(configs), lora_dropout=0.0).loramcl_config.lora_dropout == 0.0
    assert not [w for w in caught if "lora_dropout differ" in str(w.message)]


def test_from_peft_defaults_and_failures(tmp_path):
    """A config without lora_alpha means PEFT's default 8; fp64 adapters whose scalings differ are
    folded in fp64; an adapter that does not fit leaves the caller's model unpatched."""
    model = patch_model(TINY_MODELS["llama"]().double(), 2, 4, 8, target_modules=["q_proj"])
    randomize_lora(model)
    save_hypothesis(model, 0, tmp_path / "h0")
    cfg_file = tmp_path / "h0" / "adapter_config.json"
    config = json.loads(cfg_file.read_text())
    del config["lora_alpha"]
    config["r"] = 4
    cfg_file.write_text(json.dumps(config))
    save_hypothesis(model, 1, tmp_path / "h1")
    cfg1 = json.loads((tmp_path / "h1" / "adapter_config.json").read_text())
    (tmp_path / "h1" / "adapter_config.json").write_text(json.dumps({**cfg1, "lora_alpha": 2}))
    loaded = from_peft([tmp_path / "h0", tmp_path / "h1"], TINY_MODELS["llama"]().double())
    ours = dict(multi_lora_modules(model))
    for name, m in multi_lora_modules(loaded):
        assert m.scaling == 1.0  # scalings 8/4 and 2/4 differ: folded into B under a scaling of 1
        torch.testing.assert_close(m.lora_B[0], ours[name].lora_B[0] * 2.0, rtol=1e-15, atol=0)
        torch.testing.assert_close(m.lora_B[1], ours[name].lora_B[1] * 0.5, rtol=1e-15, atol=0)

    wide = TINY_MODELS["llama"]().double()
    with torch.no_grad():  # a base whose q_proj does not match the adapter's shapes
        wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 40, bias=False).double()
    flags = {n: p.requires_grad for n, p in wide.named_parameters()}
    with pytest.raises(ValueError, match="but the base layer maps 32 -> 40"):
        from_peft([tmp_path / "h0", tmp_path / "h1"], wide)
    assert not multi_lora_modules(wide) and not hasattr(wide, "loramcl_config")
    assert {n: p.requires_grad for n, p in wide.named_parameters()} == flags


def test_from_peft_list_of_peft_models_and_dirs(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    a = _peft_with_adapters([cfg])
    b = _peft_with_adapters([cfg])
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "lora_B" in n:
                p.mul_(-2)
    b.save_pretrained(tmp_path / "b")
    ids = _ids()
    want = [a(input_ids=ids).logits, b(input_ids=ids).logits]
    model = from_peft([a, tmp_path / "b" / "a0"])  # PEFT saves a non-default adapter name in a subfolder
    for k in range(2):
        torch.testing.assert_close(_hypothesis_logits(model, k, ids), want[k], rtol=1e-5, atol=1e-5)


def test_unknown_keys_ignored_and_unsupported_refused(tmp_path):
    model = patch_model(TINY_MODELS["llama"](), 2, 4, 8)
    randomize_lora(model)
    save_hypothesis(model, 1, tmp_path / "h")
    cfg_file = tmp_path / "h" / "adapter_config.json"
    config = json.loads(cfg_file.read_text())
    config["some_future_option"] = {"x": 1}
    cfg_file.write_text(json.dumps(config))
    loaded = from_peft([tmp_path / "h"], TINY_MODELS["llama"]())
    ids = _ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, _hypothesis_logits(model, 1, ids))

    for key, value, message in [
        ("use_dora", True, "DoRA"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "lora_only", "trained biases"),
        ("peft_type", "IA3", "only LoRA adapters"),
        ("alora_invocation_tokens", [8, 9], "activated LoRA"),
    ]:
        cfg_file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            from_peft([tmp_path / "h"], TINY_MODELS["llama"]())
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base_model is required"):
        from_peft([tmp_path / "h"])
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        from_peft([tmp_path], TINY_MODELS["llama"]())
    with pytest.raises(ValueError, match="lacks"):
        from_peft([tmp_path / "h"], TINY_MODELS["gpt2"]())
    # A PEFT DoRA model is refused too.
    dora = get_peft_model(TINY_MODELS["llama"](), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        from_peft(dora)


def test_from_peft_keeps_fp32_adapters_of_a_16bit_base():
    """PEFT keeps its adapters in fp32 on a bf16 base (autocast_adapter_dtype): from_peft keeps them
    fp32 (master weights, not rounded), and the model matches PEFT's outputs in bf16; with
    adapter_dtype=torch.bfloat16 they are rounded once, for inference."""
    ids = _ids()
    for adapter_dtype in (None, torch.bfloat16):
        base = TINY_MODELS["llama"]().to(torch.bfloat16)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS["llama"]))
        peft_model = get_peft_model(base, config, adapter_name="lora0")
        peft_model.add_adapter("lora1", config)
        with torch.no_grad():
            for m in peft_model.modules():
                if isinstance(m, peft.tuners.lora.LoraLayer):
                    for name in ("lora0", "lora1"):
                        m.lora_B[name].weight.normal_(0, 0.2)
        layer = next(m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        assert layer.lora_A["lora1"].weight.dtype == torch.float32  # PEFT's own choice
        peft_A = layer.lora_A["lora1"].weight.detach().clone()
        peft_model.set_adapter("lora1")
        want = peft_model(input_ids=ids).logits.float()
        model = from_peft(peft_model, adapter_dtype=adapter_dtype)
        module = multi_lora_modules(model)[0][1]
        expected = torch.float32 if adapter_dtype is None else torch.bfloat16
        assert module.lora_A.dtype == module.lora_B.dtype == expected
        assert module.base_layer.weight.dtype == torch.bfloat16
        assert torch.equal(module.lora_A[1].float(), peft_A.to(expected).float())  # fp32: not rounded
        got = _hypothesis_logits(model, 1, ids).float()
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_a_merged_peft_model_is_refused():
    """After merge_adapter() the PeftModel's base weights hold W + s B A: loading its adapter onto
    that base would apply the delta twice."""
    peft_model = _peft_with_adapters([LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])])
    ids = _ids()
    expected = peft_model(input_ids=ids).logits
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged into its base weights"):
        from_peft(peft_model)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(_hypothesis_logits(from_peft(peft_model), 0, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_whose_init_rewrote_the_base_weight(tmp_path, init):
    """PiSSA / OLoRA replace W by a residual W - s B0 A0: from a directory onto a fresh base the
    outputs would be wrong, so it is refused; a single one from its PeftModel keeps the residual."""
    peft_model = get_peft_model(TINY_MODELS["llama"](), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"],
                                                                   init_lora_weights=init))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    peft_model.eval()
    ids = _ids()
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="replaced the base weight by a residual"):
        from_peft([tmp_path / "a"], TINY_MODELS["llama"]())
    with pytest.raises(ValueError, match="replaced the base weight by a residual"):
        from_peft([peft_model, peft_model])
    torch.testing.assert_close(_hypothesis_logits(from_peft(peft_model), 0, ids), expected, rtol=1e-5, atol=1e-5)


def test_modules_an_adapter_does_not_target_stay_without_lora_in_training():
    """Adapters with different targets: at a module adapter k leaves alone, A_k = B_k = 0, so its
    gradients are 0 and training does not grow LoRA there (PEFT's adapter k has none)."""
    configs = [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
               LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"])]
    model = from_peft(_peft_with_adapters(configs))
    model.train()
    model(input_ids=_ids().repeat_interleave(2, 0)).logits.square().sum().backward()
    for name, m in multi_lora_modules(model):
        absent = 1 if name.endswith("q_proj") else 0
        assert (m.lora_A[absent] == 0).all() and (m.lora_B[absent] == 0).all()
        assert (m.lora_A.grad[absent] == 0).all() and (m.lora_B.grad[absent] == 0).all()
        assert m.lora_A.grad[1 - absent].abs().max() > 0 and m.lora_B.grad[1 - absent].abs().max() > 0


def test_an_adapted_lm_head_loads_and_its_saved_base_weight_is_checked(tmp_path):
    """PEFT saves an adapted (untied) lm_head's base weight beside its LoRA: it must equal the base
    model's, and is not loaded."""
    def base():
        model = TINY_MODELS["llama"]()
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        return model

    peft_model = _peft_with_adapters([LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])], base())
    ids = _ids()
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)  # adapter "a0": in tmp_path / "a0"
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a0" / "adapter_model.safetensors")
    assert any(k.endswith("lm_head.base_layer.weight") for k in saved)
    model = from_peft([tmp_path / "a0"], base())
    torch.testing.assert_close(_hypothesis_logits(model, 0, ids), expected, rtol=1e-5, atol=1e-5)
    other = base()
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    with pytest.raises(ValueError, match="copy of lm_head's base weight .* differs"):
        from_peft([tmp_path / "a0"], other)
    # trained on a bf16 load of the checkpoint, loaded onto its fp32 load: equal at bf16 precision
    peft_bf16 = get_peft_model(base().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    peft_bf16.save_pretrained(tmp_path / "b")
    assert multi_lora_modules(from_peft([tmp_path / "b"], base()))
