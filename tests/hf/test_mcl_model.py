"""MCLModel: loss, per-hypothesis NLL, winners and one optimizer step against the official
recipe computed the unfused way (grouped-conv LoRA, full logits, per-sequence mean CE, WTA)."""
import os
import warnings

import pytest
import torch

from loramcl_kernels.hf.mcl_model import AnnealingSchedule, MCLModel, final_hidden_states
from loramcl_kernels.hf.patching import multi_lora_modules, patch_model
from loramcl_kernels.ops.mcl_loss import KERNEL_STATS

from tests.hf.helpers import (
    TARGETS,
    TINY_MODELS,
    VOCAB,
    OfficialMathLinear,
    audio_inputs,
    official_math_copy,
    randomize_lora,
    reference_mcl_loss,
    tiny_qwen2_audio,
)
from tests.utils import requires_cuda

K, R, ALPHA = 3, 4, 8


def _data(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt, unsupervised
    labels[1, 5] = -100
    return ids, labels


def _patched(arch="llama", layout="batch_major"):
    model = patch_model(TINY_MODELS[arch]().double(), K, R, ALPHA, target_modules=TARGETS[arch], layout=layout)
    randomize_lora(model, scale=0.2)
    return model


def _repeat(t, layout):
    return t.repeat_interleave(K, 0) if layout == "batch_major" else t.repeat(K, 1)


@pytest.mark.parametrize("arch,layout", [("llama", "batch_major"), ("qwen2", "hypothesis_major"),
                                         ("gpt2", "batch_major")])
@pytest.mark.parametrize("mode", ["wta", "relaxed", "annealed"])
def test_forward_matches_reference(arch, layout, mode):
    model = _patched(arch, layout)
    ref = official_math_copy(model, layout)
    ids, labels = _data()
    kw = {"wta": {}, "relaxed": {"epsilon": 0.1}, "annealed": {"temperature": 0.5}}[mode]
    out = MCLModel(model)(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, mode=mode, **kw)
    logits = ref(input_ids=_repeat(ids, layout)).logits
    loss, L, winners, w = reference_mcl_loss(logits, labels, K, layout, mode, **kw)
    torch.testing.assert_close(out.loss, loss.to(out.loss.dtype))
    torch.testing.assert_close(out.nll, L.to(out.nll.dtype))
    assert torch.equal(out.winners, winners)
    torch.testing.assert_close(out.weights, w.to(out.weights.dtype))
    assert out.nll.shape == (K, 3) and L.std() > 0
    # adapter gradients (soft modes: the frozen lm_head takes the loss's one-pass gradient)
    out.loss.backward()
    assert (KERNEL_STATS.pass2_rows == 0) == (mode != "wta")
    loss.backward()
    refs = {n: m for n, m in ref.named_modules() if isinstance(m, OfficialMathLinear)}
    for name, m in multi_lora_modules(model):
        torch.testing.assert_close(m.lora_A.grad, refs[name].conv_A.grad.view_as(m.lora_A))
        torch.testing.assert_close(m.lora_B.grad, refs[name].conv_B.grad.view_as(m.lora_B))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_settings_reach_the_loss(backend, monkeypatch):
    """MCLModel's sequence_reduction, ignore_index and backend reach mcl_loss: the summed loss with
    -1 as the ignored label, against the reference, computed by the backend asked for."""
    import loramcl_kernels.ops.mcl_loss as mcl_module

    asked = []
    resolve = mcl_module.resolve_backend
    monkeypatch.setattr(mcl_module, "resolve_backend",
                        lambda backend, *args: (asked.append(backend), resolve(backend, *args))[1])
    model = patch_model(TINY_MODELS["llama"]().float(), K, R, ALPHA, target_modules=TARGETS["llama"])
    randomize_lora(model, scale=0.2)
    ref = official_math_copy(model)
    ids, labels = _data()
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    mcl = MCLModel(model, sequence_reduction="sum", ignore_index=-1, backend=backend)
    out = mcl(input_ids=ids, labels=labels, mode="relaxed", epsilon=0.1)
    loss, L, winners, _ = reference_mcl_loss(ref(input_ids=ids.repeat_interleave(K, 0)).logits, labels, K,
                                             mode="relaxed", epsilon=0.1, sequence_reduction="sum", ignore_index=-1)
    torch.testing.assert_close(out.nll, L.to(out.nll.dtype), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, loss.to(out.loss.dtype), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.winners, winners) and asked == [backend]


def test_generate_hypotheses_method_is_the_function():
    from loramcl_kernels.hf.generation import generate_hypotheses

    model = _patched()
    ids, _ = _data()
    kw = dict(max_new_tokens=4, do_sample=False)
    by_method = MCLModel(model).generate_hypotheses({"input_ids": ids}, **kw)
    by_function = generate_hypotheses(model, {"input_ids": ids}, K, **kw)
    assert by_method.shape[:2] == (3, K) and torch.equal(by_method, by_function)


def test_one_adamw_step_matches_reference():
    model = _patched()
    ref = official_math_copy(model)
    ids, labels = _data()
    mcl = MCLModel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.01)

    out = mcl(input_ids=ids, labels=labels)
    out.loss.backward()
    opt.step()
    loss, _, _, _ = reference_mcl_loss(ref(input_ids=ids.repeat_interleave(K, 0)).logits, labels, K)
    loss.backward()
    ref_opt.step()

    refs = {n: m for n, m in ref.named_modules() if isinstance(m, OfficialMathLinear)}
    for name, m in multi_lora_modules(model):
        r_mod = refs[name]
        torch.testing.assert_close(m.lora_A.detach(), r_mod.conv_A.detach().view_as(m.lora_A))
        torch.testing.assert_close(m.lora_B.detach(), r_mod.conv_B.detach().view_as(m.lora_B))
    # Only the winners' adapters get gradient under hard WTA: a loser hypothesis stays put.
    winners = set(out.winners.tolist())
    q = model.model.layers[0].self_attn.q_proj
    for k in range(K):
        has_grad = q.lora_B.grad[k].abs().sum() > 0
        assert bool(has_grad) == (k in winners)


def test_extra_inputs_are_repeated_and_logits_without_labels():
    model = _patched()
    ref = official_math_copy(model)
    ids, labels = _data()
    pos = torch.arange(7).expand(3, 7) + 2  # shifted positions change the result
    out = MCLModel(model)(input_ids=ids, labels=labels, position_ids=pos)
    logits = ref(input_ids=ids.repeat_interleave(K, 0), position_ids=pos.repeat_interleave(K, 0)).logits
    torch.testing.assert_close(out.nll, reference_mcl_loss(logits, labels, K)[1])
    plain = MCLModel(model)(input_ids=ids, position_ids=pos)
    torch.testing.assert_close(plain.logits, logits)
    # The lm_head hook hands back the final hidden states, and the model forms no logits.
    hidden = final_hidden_states(model, input_ids=ids)
    torch.testing.assert_close(model.lm_head(hidden), model(input_ids=ids).logits)


def test_annealing_schedule():
    sched = AnnealingSchedule(tau0=1.0, rho=0.5, tau_min=0.2)
    assert sched.temperature == 1.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched.attach(opt)
    taus = []
    for _ in range(4):
        opt.step()
        taus.append(sched.temperature)
    assert taus == [0.5, 0.25, None, None]  # 0.125 <= tau_min: plain WTA
    state = sched.state_dict()
    fresh = AnnealingSchedule(1.0, 0.9)
    fresh.load_state_dict(state)
    assert fresh.step_count == 4 and fresh.temperature is None
    with pytest.raises(ValueError, match="rho"):
        AnnealingSchedule(1.0, 1.5)
    with pytest.raises(TypeError, match="tau0 must be a real number"):
        AnnealingSchedule("1", 0.5)

    model = _patched()
    ids, labels = _data()
    sched = AnnealingSchedule(tau0=2.0, rho=0.5, tau_min=0.3)
    mcl = MCLModel(model, schedule=sched)
    out = mcl(input_ids=ids, labels=labels)  # annealed at tau = 2
    torch.testing.assert_close(out.weights, torch.softmax(-out.nll / 2.0, dim=0))
    sched.step_count = 3  # tau = 0.25 <= 0.3: WTA
    out = mcl(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.weights, torch.nn.functional.one_hot(out.winners, K).t().to(out.weights.dtype))
    with pytest.raises(ValueError, match="needs temperature"):
        MCLModel(model)(input_ids=ids, labels=labels, mode="annealed")
    with pytest.raises(ValueError, match="patched with 3"):
        MCLModel(model, num_hypotheses=2)


def test_mode_follows_what_is_given_and_ignored_arguments_are_refused():
    """mode=None: a temperature means annealed, an epsilon relaxed; an epsilon or temperature that
    the chosen mode would ignore is an error (it used to train plain WTA silently)."""
    model = _patched()
    ids, labels = _data()
    mcl = MCLModel(model)
    annealed = mcl(input_ids=ids, labels=labels, temperature=2.0)
    torch.testing.assert_close(annealed.weights, torch.softmax(-annealed.nll / 2.0, dim=0))
    relaxed = mcl(input_ids=ids, labels=labels, epsilon=0.3)
    expected = torch.full_like(relaxed.weights, 0.3 / (K - 1))
    expected[relaxed.winners, torch.arange(ids.shape[0])] = 0.7
    torch.testing.assert_close(relaxed.weights, expected)
    with pytest.raises(ValueError, match="temperature=2.0 applies to mode='annealed'"):
        mcl(input_ids=ids, labels=labels, mode="wta", temperature=2.0)
    with pytest.raises(ValueError, match="epsilon=0.3 applies to mode='relaxed'"):
        mcl(input_ids=ids, labels=labels, mode="wta", epsilon=0.3)
    with pytest.raises(ValueError, match="epsilon=0.1 applies to mode='relaxed'"):
        mcl(input_ids=ids, labels=labels, mode="annealed", temperature=1.0, epsilon=0.1)


@pytest.mark.parametrize("name,value", [("final_logit_softcapping", 30.0), ("logits_soft_cap", 30.0),
                                        ("output_logit_soft_cap", 15.0), ("softcap", 30.0), ("logit_scale", 0.0625),
                                        ("logits_scaling", 8.0), ("lm_head_multiplier", 0.5),
                                        ("output_multiplier", 0.25)])
def test_models_that_transform_their_logits_are_refused(name, value):
    """Gemma 2, RecurrentGemma, xLSTM and Jev soft-cap their logits, Cohere, Granite, Falcon-H1 and
    Muse scale them: the fused loss, which reads the lm_head weight, would compute another loss, so
    MCLModel says so instead."""
    model = _patched()
    ids, labels = _data()
    setattr(model.config, name, value)
    with pytest.raises(ValueError, match=f"config.{name}={value!r}"):
        MCLModel(model)(input_ids=ids, labels=labels)
    setattr(model.config, name, None if "cap" in name else 1.0)  # no transform
    loss, _, _, _ = reference_mcl_loss(official_math_copy(model)(input_ids=_repeat(ids, "batch_major")).logits,
                                       labels, K)
    torch.testing.assert_close(MCLModel(model)(input_ids=ids, labels=labels).loss, loss)


def test_an_lm_head_with_a_forward_of_its_own_is_refused():
    """An lm_head that is an nn.Linear subclass computing more than x W^T + b (a learned logit scale,
    as some models have) is not what the fused loss computes from its weight: refused, plain
    nn.Linear subclasses that keep Linear's forward pass."""

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    class RenamedHead(torch.nn.Linear):
        pass

    ids, labels = _data()
    for cls, refused in ((ScaledHead, True), (RenamedHead, False)):
        model = _patched()
        head = model.lm_head
        model.lm_head = cls(head.in_features, head.out_features, bias=False, dtype=head.weight.dtype)
        model.lm_head.weight = head.weight
        if refused:
            with pytest.raises(ValueError, match="ScaledHead with a forward of its own"):
                MCLModel(model)(input_ids=ids, labels=labels)
        else:  # Linear's own forward: the loss of the model with a plain nn.Linear head
            plain = _patched()
            torch.testing.assert_close(MCLModel(model)(input_ids=ids, labels=labels).loss,
                                       MCLModel(plain)(input_ids=ids, labels=labels).loss)


def test_lora_on_the_lm_head_is_refused():
    """The fused loss reads the lm_head weight alone: adapters on the lm_head would be dropped."""
    model = patch_model(TINY_MODELS["llama"]().double(), K, R, ALPHA, target_modules=["q_proj", "lm_head"])
    ids, labels = _data()
    with pytest.raises(ValueError, match="lm_head carries LoRA adapters"):
        MCLModel(model)(input_ids=ids, labels=labels)


def test_audio_model_inputs_repeated_and_encoder_adapted():
    """Qwen2-Audio: the default suffix targets adapt the audio encoder's q/k/v too, and the audio
    features are repeated with the text inputs."""
    model = patch_model(tiny_qwen2_audio().double(), K, R, ALPHA)
    names = [n for n, _ in multi_lora_modules(model)]
    assert any(n.startswith("model.audio_tower.") for n in names)
    assert any(n.startswith("model.language_model.") for n in names)
    randomize_lora(model, scale=0.2)
    ref = official_math_copy(model)
    inputs = audio_inputs()
    inputs["input_features"] = inputs["input_features"].double()
    labels = inputs["input_ids"].clone()
    labels[:, :6] = -100
    out = MCLModel(model)(labels=labels, **inputs)
    repeated = {k: v.repeat_interleave(K, 0) for k, v in inputs.items()}
    loss, L, winners, _ = reference_mcl_loss(ref(**repeated).logits, labels, K)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.nll, L)
    assert torch.equal(out.winners, winners)


def test_torch_compile_mcl_model():
    """torch.compile of MCLModel (graph breaks allowed around the lm_head hook): same loss,
    NLL, winners and adapter gradients as eager."""
    torch._dynamo.reset()
    from tests.hf.helpers import tiny_llama

    model = patch_model(tiny_llama(layers=1), 2, R, ALPHA)
    randomize_lora(model, scale=0.2)
    mcl = MCLModel(model)
    ids, labels = _data()
    eager = mcl(input_ids=ids, labels=labels)
    eager.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    out = torch.compile(mcl)(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.nll, eager.nll, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.winners, eager.winners)
    for p, g in zip([p for p in model.parameters() if p.requires_grad], grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def _train_steps(mcl, params, batches, lr=0.05):
    """One SGD step per batch; the losses and, after the last step, the parameters."""
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for ids, labels in batches:
        out = mcl(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in params]


def test_mcl_model_around_a_compiled_model_trains_without_recompiling():
    """The README's recipe for running the decoder from compiled graphs (CUDA graphs with
    mode="reduce-overhead"): MCLModel(torch.compile(model)), mcl_loss staying eager. The lm_head
    hook that MCLModel registers and removes every step does not recompile the model: one graph
    over three training steps (new batches, same shapes), and the same losses and adapters as eager."""
    from torch._dynamo.testing import CompileCounter

    from tests.hf.helpers import tiny_llama

    torch._dynamo.reset()
    batches = [_data(seed=s) for s in range(3)]
    results = []
    for compiled in (False, True):
        model = patch_model(tiny_llama(layers=1), 2, R, ALPHA)
        randomize_lora(model, scale=0.2)
        params = [p for p in model.parameters() if p.requires_grad]
        initial = [p.detach().clone() for p in params]
        counter = CompileCounter()
        mcl = MCLModel(torch.compile(model, backend=counter) if compiled else model)
        results.append(_train_steps(mcl, params, batches))
        if compiled:
            assert counter.frame_count == 1
    (eager_losses, eager_params), (losses, params) = results
    assert all(not torch.equal(p, p0) for p, p0 in zip(eager_params, initial))  # the steps trained the adapters
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_trains_as_without(backend, use_reentrant):
    """HF's gradient checkpointing (each decoder layer's activations recomputed in the backward) on a
    patched model with LoRA dropout: the recomputed forward draws the same dropout masks (the seed
    comes from torch's generator, whose state checkpointing restores), so the loss, the gradients
    and the adapters after two SGD steps equal those without checkpointing."""
    from tests.hf.helpers import tiny_llama
    from tests.utils import TRITON_DEVICE

    device = TRITON_DEVICE if backend == "triton" else "cpu"
    batches = [tuple(t.to(device) for t in _data(seed=s)) for s in range(2)]
    results = []
    for checkpointing in (False, True):
        model = patch_model(tiny_llama(layers=2), K, R, ALPHA, lora_dropout=0.2, backend=backend).to(device)
        randomize_lora(model, scale=0.2)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            assert model.model.gradient_checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(7)  # the dropout seeds
        results.append(_train_steps(MCLModel(model), params, batches))
    (losses, params), (losses_ckpt, params_ckpt) = results
    assert losses[0] != losses[1]  # the first step trained the adapters
    torch.testing.assert_close(losses_ckpt, losses, rtol=1e-6, atol=1e-6)
    for p, q in zip(params_ckpt, params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@requires_cuda
def test_gpu_mcl_model_around_cuda_graphs_trains_as_eager():
    """MCLModel(torch.compile(model, backend="cudagraphs")): the decoder's forward and backward
    replayed from CUDA graphs (our Triton kernels captured in them), mcl_loss eager: the same
    losses and adapters as eager over three training steps (bf16)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batches = [tuple(t.cuda() for t in _data(seed=s)) for s in range(3)]
    results = []
    for compiled in (False, True):
        model = TINY_MODELS["llama"]().to("cuda", torch.bfloat16)
        model = patch_model(model, K, R, ALPHA, target_modules=TARGETS["llama"])
        randomize_lora(model, scale=0.2)
        params = [p for p in model.parameters() if p.requires_grad]
        mcl = MCLModel(torch.compile(model, backend="cudagraphs") if compiled else model)
        results.append(_train_steps(mcl, params, batches))
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])  # graphs, not a fallback
    (eager_losses, eager_params), (losses, params) = results
    torch.testing.assert_close(losses.float(), eager_losses.float(), rtol=2e-2, atol=2e-2)
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p.float(), e.float(), rtol=2e-2, atol=2e-3)


@requires_cuda
def test_gpu_training_step_reads_the_device_once_in_the_package():
    """A LoRA-MCL training step of a patched model on the GPU (bf16, Triton backend): the package's
    own code waits on the device once, for mcl_loss's count of supervised positions (the README's
    one host sync per step); the multi-LoRA layers and the backward never do. HF's model code may
    synchronise on its own: only warnings raised from the package's files count."""
    model = patch_model(TINY_MODELS["llama"]().to("cuda", torch.bfloat16), K, R, ALPHA, target_modules=TARGETS["llama"])
    randomize_lora(model, scale=0.2)
    mcl = MCLModel(model)
    ids, labels = (t.cuda() for t in _data())

    def step():
        mcl(input_ids=ids, labels=labels).loss.backward()

    step()  # compiles and autotunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [os.path.basename(w.filename) for w in caught
            if "synchroniz" in str(w.message) and f"{os.sep}loramcl_kernels{os.sep}" in w.filename]
    assert ours == ["mcl_loss.py"], [(w.filename, w.lineno, str(w.message)[:80]) for w in caught]


def test_a_routing_left_set_is_refused_not_trained_on():
    """A leftover active_hypothesis (evaluation of one adapter) or inner (generation) would route
    every row wrongly: MCLModel refuses it, and trains as usual once it is reset."""
    from loramcl_kernels.hf.patching import active_hypothesis, set_lora_attributes

    model = _patched()
    ids, labels = _data()
    reference = MCLModel(model)(input_ids=ids, labels=labels).loss
    for attributes in ({"active_hypothesis": 1}, {"inner": 3}, {"layout": "hypothesis_major"},
                       {"hypothesis_ids": torch.zeros(9, dtype=torch.long)}, {"shared_input": True}):
        saved = set_lora_attributes(model, **attributes)
        name = next(iter(attributes))
        with pytest.raises(ValueError, match=f"has routing {{'{name}'"):
            MCLModel(model)(input_ids=ids, labels=labels)
        set_lora_attributes(model, **{a: v for a, v in next(iter(saved.values())).items()})
    with active_hypothesis(model, 2), pytest.raises(ValueError, match="active_hypothesis"):
        MCLModel(model)(input_ids=ids, labels=labels)
    torch.testing.assert_close(MCLModel(model)(input_ids=ids, labels=labels).loss, reference, rtol=0, atol=0)


def test_hf_trainer_gradient_accumulation_matches_the_full_batch():
    """HF Trainer with gradient accumulation: MCLModel's loss is a per-batch mean, so Trainer must
    divide it by the accumulation steps (accepts_loss_kwargs = False): 2 x 2 rows give the update of
    one batch of 4 (SGD, no clipping)."""
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    assert MCLModel.accepts_loss_kwargs is False
    ids, labels = _data(B=4)
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(4)]

    def update(batch_size, accumulation):
        model = patch_model(TINY_MODELS["llama"](), K, R, ALPHA, target_modules=TARGETS["llama"])
        randomize_lora(model, scale=0.2)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size,
                                     gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0,
                                     optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", weight_decay=0.0,
                                     report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                     remove_unused_columns=False, seed=0, data_seed=0)
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                Trainer(model=MCLModel(model), args=args, train_dataset=data).train()
            finally:
                hf_logging.set_verbosity(verbosity)
        return torch.cat([(b - p.detach()).flatten() for b, p in
                          zip(before, [p for p in model.parameters() if p.requires_grad])])

    full, accumulated = update(4, 1), update(2, 2)
    assert full.abs().max() > 0
    torch.testing.assert_close(accumulated, full, rtol=1e-4, atol=1e-6)
