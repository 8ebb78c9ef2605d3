"""generate_hypotheses: one batched HF generate over B*K rows equals K separate single-adapter
generate calls, token for token (fp32), for greedy, beam search and (top_k=1) sampling."""
import pytest
import torch

from loramcl_kernels.hf.generation import generate_hypotheses
from loramcl_kernels.hf.mcl_model import MCLModel
from loramcl_kernels.hf.patching import active_hypothesis, multi_lora_modules, patch_model

from tests.hf.helpers import TARGETS, TINY_MODELS, VOCAB, audio_inputs, randomize_lora, tiny_qwen2_audio
from tests.utils import requires_cuda

K, R = 3, 4
PAD = 0


def _patched(arch, seed=0):
    model = patch_model(TINY_MODELS[arch](seed), K, R, 8, target_modules=TARGETS[arch])
    randomize_lora(model, seed=seed + 1, scale=0.5)
    return model


def _prompts(B=2, T=6):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def _separate(model, inputs, **kw):
    """K single-adapter generate calls; generated ids only, per hypothesis."""
    T = inputs["input_ids"].shape[1]
    outs = []
    for k in range(K):
        with active_hypothesis(model, k):
            outs.append(model.generate(**inputs, **kw)[:, T:])
    return outs


def _assert_equal_to_separate(joint, separate):
    B, K_, L = joint.shape
    assert K_ == len(separate)
    for k, sep in enumerate(separate):
        n = sep.shape[1]
        assert torch.equal(joint[:, k, :n], sep), f"hypothesis {k} differs"
        assert (joint[:, k, n:] == PAD).all()  # a shorter separate call: the joint one pads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_separate_calls(arch):
    model = _patched(arch)
    inputs = _prompts()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    joint = generate_hypotheses(model, inputs, **kw)
    assert joint.dtype == torch.long and joint.shape == (2, K, 8)
    separate = _separate(model, inputs, **kw)
    _assert_equal_to_separate(joint, separate)
    assert not torch.equal(separate[0], separate[1])  # the hypotheses decode differently
    assert all(m.inner == 1 and m.active_hypothesis is None for _, m in multi_lora_modules(model))


def test_greedy_with_eos_pads_finished_rows():
    model = _patched("llama")
    inputs = _prompts()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    first = _separate(model, inputs, **kw)
    eos = int(first[0][0, 2])  # hypothesis 0, prompt 0 stops after 3 tokens
    kw["eos_token_id"] = eos
    joint = generate_hypotheses(model, inputs, **kw)
    separate = _separate(model, inputs, **kw)
    _assert_equal_to_separate(joint, separate)
    row = joint[0, 0]
    stop = int((row == eos).nonzero()[0])
    assert stop <= 2 and (row[stop + 1 :] == PAD).all()


def test_beam_search_equals_separate_beam_search():
    model = _patched("llama")
    inputs = _prompts()
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD)
    joint = generate_hypotheses(model, inputs, **kw)
    _assert_equal_to_separate(joint, _separate(model, inputs, **kw))
    assert all(m.inner == 1 for _, m in multi_lora_modules(model))  # restored after the call

    kw["num_return_sequences"] = 2
    joint = generate_hypotheses(model, inputs, **kw)
    assert joint.shape[:3] == (2, K, 2)
    for k, sep in enumerate(_separate(model, inputs, **kw)):
        assert torch.equal(joint[:, k, :, : sep.shape[1]], sep.view(2, 2, -1))


def test_sampling():
    model = _patched("qwen2")
    inputs = _prompts()
    greedy = generate_hypotheses(model, inputs, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    # top_k = 1 sampling is greedy: checks the sampling path's routing by value.
    sampled = generate_hypotheses(model, inputs, max_new_tokens=6, do_sample=True, top_k=1, pad_token_id=PAD,
                                  num_return_sequences=2)
    assert sampled.shape == (2, K, 2, 6)
    assert torch.equal(sampled[:, :, 0], greedy) and torch.equal(sampled[:, :, 1], greedy)
    # Real sampling: reproducible under a seed, valid ids; batches of two prompts and of one.
    torch.manual_seed(0)
    a = generate_hypotheses(MCLModel(model), inputs, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=PAD)
    torch.manual_seed(0)
    b = generate_hypotheses(model, inputs["input_ids"][:1], max_new_tokens=6, do_sample=True, top_k=0,
                            pad_token_id=PAD)
    assert a.shape == (2, K, 6) and b.shape == (1, K, 6)
    assert ((a >= 0) & (a < VOCAB)).all()
    torch.manual_seed(0)
    a2 = generate_hypotheses(model, inputs, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=PAD)
    assert torch.equal(a, a2)


def test_static_cache_decode_compiles_in_one_graph():
    """With a static cache HF compiles the decoding step (on CUDA with mode="reduce-overhead": CUDA
    graphs, no host work per layer). The patched model compiles there in one graph (fullgraph:
    a graph break would raise) and generates, with left padding, the tokens of the eager call."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = _patched("llama")
    inputs = _prompts()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    eager = generate_hypotheses(model, inputs, **kw)
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # HF compiles on accelerators only by default
    compiled = generate_hypotheses(model, inputs, cache_implementation="static", compile_config=config, **kw)
    assert hasattr(model, "_compiled_call")  # HF took the compiled decoding step
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


@requires_cuda
def test_gpu_static_cache_decode_from_cuda_graphs():
    """On CUDA, HF compiles the static-cache decoding step with mode="reduce-overhead": the patched
    model's kernels replay from CUDA graphs and give the eager tokens."""
    torch._dynamo.reset()
    model = patch_model(TINY_MODELS["llama"](layers=1).cuda(), K, R, 8, target_modules=TARGETS["llama"])
    randomize_lora(model, seed=1, scale=0.5)
    inputs = {name: t.cuda() for name, t in _prompts().items()}
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    eager = generate_hypotheses(model, inputs, **kw)
    graphed = generate_hypotheses(model, inputs, cache_implementation="static", **kw)
    assert hasattr(model, "_compiled_call")  # HF took the compiled decoding step
    assert torch.equal(graphed, eager)
    torch._dynamo.reset()


def test_bad_arguments():
    model = _patched("llama")
    with pytest.raises(ValueError, match="patched with 3"):
        generate_hypotheses(model, _prompts(), num_hypotheses=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="not patched"):
        generate_hypotheses(TINY_MODELS["llama"](), _prompts(), max_new_tokens=2)


def test_audio_model_greedy_equals_separate_calls():
    model = patch_model(tiny_qwen2_audio(), K, R, 8)
    randomize_lora(model, scale=0.5)
    inputs = audio_inputs()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    joint = generate_hypotheses(model, inputs, **kw)
    separate = _separate(model, inputs, **kw)
    _assert_equal_to_separate(joint, separate)
    assert not torch.equal(separate[0], separate[2])


def test_settings_left_unset_in_a_generation_config_come_from_the_models():
    """transformers 5 fills a passed GenerationConfig's unset (None) fields from the model's: the
    routing must expand rows by the num_beams / num_return_sequences HF will use."""
    from transformers import GenerationConfig

    model = _patched("llama")
    inputs = _prompts()
    model.generation_config.num_beams = 3
    config = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    joint = generate_hypotheses(model, inputs, generation_config=config)
    _assert_equal_to_separate(joint, _separate(model, inputs, generation_config=config))

    model.generation_config.num_beams = 1
    model.generation_config.num_return_sequences = 2
    model.generation_config.do_sample, model.generation_config.top_k = True, 1  # sampling, greedy by value
    config = GenerationConfig(max_new_tokens=5, pad_token_id=PAD)
    joint = generate_hypotheses(model, inputs, generation_config=config)
    assert joint.shape == (2, K, 2, 5)
    greedy = generate_hypotheses(model, inputs, max_new_tokens=5, do_sample=False, num_return_sequences=1,
                                 pad_token_id=PAD)
    assert torch.equal(joint[:, :, 0], greedy) and torch.equal(joint[:, :, 1], greedy)


def test_batch_shaped_keywords_are_repeated_with_the_inputs():
    """generate(input_ids, attention_mask=mask): the mask is repeated K times like input_ids."""
    model = _patched("llama")
    inputs = _prompts()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    joint = generate_hypotheses(model, inputs["input_ids"], attention_mask=inputs["attention_mask"], **kw)
    _assert_equal_to_separate(joint, _separate(model, inputs, **kw))
    # a token-id setting given as a tensor of B elements stays a setting
    kw["eos_token_id"] = torch.tensor([VOCAB - 1, VOCAB - 2])
    joint = generate_hypotheses(model, inputs["input_ids"], attention_mask=inputs["attention_mask"], **kw)
    _assert_equal_to_separate(joint, _separate(model, inputs, **kw))


def test_return_dict_in_generate_keeps_hfs_output_with_sequences_reshaped():
    model = _patched("llama")
    inputs = _prompts()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    plain = generate_hypotheses(model, inputs, **kw)
    out = generate_hypotheses(model, inputs, return_dict_in_generate=True, output_scores=True, **kw)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == 4 and out.scores[0].shape == (2 * K, VOCAB)
    for k in range(K):  # row b*K + k is prompt b under hypothesis k
        with active_hypothesis(model, k):
            separate = model.generate(**inputs, return_dict_in_generate=True, output_scores=True, **kw)
        for step in range(4):
            torch.testing.assert_close(out.scores[step][k::K], separate.scores[step], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_encoder_decoder_beam_search_equals_separate_calls(num_beams):
    """HF runs the encoder once on the B*K rows, then expands them by num_beams: the encoder's
    rows are routed with inner = 1, the decoder's with inner = num_beams."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, forced_eos_token_id=None)
    model = patch_model(BartForConditionalGeneration(config).eval(), K, R, 8,
                        target_modules=("q_proj", "k_proj", "v_proj", "fc1", "fc2"))
    randomize_lora(model, scale=0.5)
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(3, VOCAB, (3, 7), generator=g)}
    kw = dict(max_new_tokens=5, num_beams=num_beams, do_sample=False, pad_token_id=1)
    joint = generate_hypotheses(model, inputs, **kw)
    for k in range(K):
        with active_hypothesis(model, k):
            separate = model.generate(**inputs, **kw)
        assert torch.equal(joint[:, k, : separate.shape[1]], separate), f"hypothesis {k} differs"
    assert all(m.inner == 1 for _, m in multi_lora_modules(model))
