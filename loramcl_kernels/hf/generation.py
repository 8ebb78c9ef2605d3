"""generate_hypotheses: all K hypotheses of a patched HF model in ONE batched `generate` call.

The B prompts are repeated batch-major (row b*K + k is prompt b under hypothesis k) and every
MultiLoRALinear is routed batch-major with inner = E for the call, E = max(num_beams,
num_return_sequences): HF expands each row into E consecutive rows (beams or samples), and beam
search only ever reorders beams inside one (b, k) group, so row n keeps hypothesis (n // E) % K
at every step. Routing attributes are restored afterwards.

Result: a LongTensor (B, K, L) of generated ids (decoder-only models: the prompt is stripped),
or (B, K, num_return_sequences, L) when num_return_sequences > 1. Rows that finish early are
padded by `generate` itself with the pad token, exactly as K separate calls would pad them up
to the longest row of the joint call.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from loramcl_kernels.hf.mcl_model import _batch_size, repeat_batch_inputs
from loramcl_kernels.hf.patching import get_config, lora_attributes


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if not hasattr(model, "loramcl_config") and inner is not None and hasattr(inner, "loramcl_config"):
        return inner  # an MCLModel
    return model


def _generation_setting(name: str, generate_kwargs: dict, model: nn.Module, default: int = 1) -> int:
    if generate_kwargs.get(name) is not None:
        return int(generate_kwargs[name])
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    value = getattr(config, name, None)
    return int(value) if value is not None else default


@torch.no_grad()
def generate_hypotheses(model: nn.Module, inputs, num_hypotheses: int | None = None, **generate_kwargs) -> torch.Tensor:
    """K continuations of every prompt, one per hypothesis, from one batched HF generate call.

    model: a patched HF model (or an MCLModel around one). inputs: input_ids (B, T) or a dict /
    BatchEncoding of model inputs (input_ids, attention_mask, audio or pixel inputs, ...).
    generate_kwargs go to `model.generate` (max_new_tokens, do_sample, num_beams, ...).
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
    num_beams = _generation_setting("num_beams", generate_kwargs, model)
    num_return = _generation_setting("num_return_sequences", generate_kwargs, model)
    expand = max(num_beams, num_return)
    generate_kwargs.pop("return_dict_in_generate", None)

    repeated = repeat_batch_inputs(inputs, batch_size, num_hypotheses, "batch_major")
    with lora_attributes(
        model, active_hypothesis=None, layout="batch_major", inner=expand, hypothesis_ids=None, shared_input=False
    ):
        sequences = model.generate(**repeated, **generate_kwargs)
    if not isinstance(sequences, torch.Tensor):
        sequences = sequences.sequences
    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if not is_encoder_decoder and "input_ids" in inputs:
        sequences = sequences[:, inputs["input_ids"].shape[1] :]
    if num_return > 1:
        return sequences.reshape(batch_size, num_hypotheses, num_return, -1)
    return sequences.reshape(batch_size, num_hypotheses, -1)
