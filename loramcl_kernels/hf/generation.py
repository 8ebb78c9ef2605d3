"""generate_hypotheses: all K hypotheses of a patched HF model in ONE batched `generate` call.

The B prompts are repeated batch-major (row b*K + k is prompt b under hypothesis k) and every
MultiLoRALinear is routed batch-major with inner = E for the call, E = max(num_beams,
num_return_sequences): HF expands each row into E consecutive rows (beams or samples), and beam
search only ever reorders beams inside one (b, k) group, so row n keeps hypothesis (n // E) % K
at every step. Routing attributes are restored afterwards.

Encoder-decoder models run their encoder once on the B*K rows before HF expands them, so the
encoder's layers are routed with inner = 1 for the call.

Result: a LongTensor (B, K, L) of generated ids (decoder-only models: the prompt is stripped),
or (B, K, num_return_sequences, L) when num_return_sequences > 1. Rows that finish early are
padded by `generate` itself (the pad token; beam search takes the eos token where pad_token_id is 0
or unset), exactly as K separate calls would pad them up to the longest row of the joint call. With
return_dict_in_generate=True, HF's output object with `sequences` so reshaped; its other fields
(scores, ...) keep HF's rows, row (b*K + k)*E + j for prompt b, hypothesis k, beam or sample j.

What a joint call cannot reproduce of K separate ones: sampling draws its random numbers for the
B*K*E rows at once, so with a seed it is reproducible, and each (b, k) follows its hypothesis's
distribution, but its tokens are not those of K separate seeded calls; logits processors,
stopping criteria and prefix_allowed_tokens_fn see the B*K*E rows (batch_id b*K + k).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

from loramcl_kernels.hf.mcl_model import _batch_size, is_batch_input, repeat_batch_inputs
from loramcl_kernels.hf.patching import get_config, lora_attributes, multi_lora_modules


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if not hasattr(model, "loramcl_config") and inner is not None and hasattr(inner, "loramcl_config"):
        return inner  # an MCLModel
    return model


def _generation_setting(name: str, generate_kwargs: dict, model: nn.Module, default: int = 1) -> int:
    """As HF resolves it: generate's keyword, else the generation_config passed (whose unset fields
    are None in transformers 5), else the model's generation_config."""
    sources = (generate_kwargs, generate_kwargs.get("generation_config"), getattr(model, "generation_config", None))
    for source in sources:
        value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
        if value is not None:
            return int(value)
    return default


@functools.lru_cache(maxsize=1)
def _generation_config_keys() -> frozenset:
    """generate's settings (GenerationConfig's fields), never model inputs; built once."""
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


@torch.no_grad()
def generate_hypotheses(model: nn.Module, inputs, num_hypotheses: int | None = None, **generate_kwargs):
    """K continuations of every prompt, one per hypothesis, from one batched HF generate call.

    model: a patched HF model (or an MCLModel around one). inputs: input_ids (B, T) or a dict /
    BatchEncoding of model inputs (input_ids, attention_mask, audio or pixel inputs, ...).
    generate_kwargs go to `model.generate` (max_new_tokens, do_sample, num_beams, ...); batch-shaped
    tensors among them (attention_mask=...) are model inputs, repeated with the others.
    Returns the ids (see the module docstring), or HF's output object for return_dict_in_generate.
    """
    model = _unwrap(model)
    config = get_config(model)
    if num_hypotheses is None:
        num_hypotheses = config.num_hypotheses
    if num_hypotheses != config.num_hypotheses:
        raise ValueError(f"num_hypotheses={num_hypotheses} but the model was patched with {config.num_hypotheses}")
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    inputs = dict(inputs)
    batch_size = _batch_size(inputs)
    # batch-shaped tensors passed as keywords (attention_mask=..., audio or pixel inputs) are model
    # inputs too: repeated with the rest (token-id settings such as eos_token_id are not inputs)
    settings = _generation_config_keys()
    for key in list(generate_kwargs):
        if key not in settings and is_batch_input(key, generate_kwargs[key], batch_size):
            inputs[key] = generate_kwargs.pop(key)
    num_beams = _generation_setting("num_beams", generate_kwargs, model)
    num_return = _generation_setting("num_return_sequences", generate_kwargs, model)
    expand = max(num_beams, num_return)
    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    repeated = repeat_batch_inputs(inputs, batch_size, num_hypotheses, "batch_major")
    with contextlib.ExitStack() as stack:
        stack.enter_context(lora_attributes(
            model, active_hypothesis=None, layout="batch_major", inner=expand, hypothesis_ids=None, shared_input=False
        ))
        if is_encoder_decoder and expand > 1 and multi_lora_modules(model.get_encoder()):
            # the encoder runs once on the B*K rows, before HF expands them into beams or samples
            stack.enter_context(lora_attributes(model.get_encoder(), inner=1))
        output = model.generate(**repeated, **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    if not is_encoder_decoder and "input_ids" in inputs:
        sequences = sequences[:, inputs["input_ids"].shape[1] :]
    shape = (batch_size, num_hypotheses, num_return, -1) if num_return > 1 else (batch_size, num_hypotheses, -1)
    sequences = sequences.reshape(shape)
    if isinstance(output, torch.Tensor):
        return sequences
    output.sequences = sequences
    return output
