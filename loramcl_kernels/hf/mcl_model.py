"""MCLModel: LoRA-MCL training of a patched HuggingFace causal LM through the fused MCL loss.

forward(input_ids, attention_mask, labels, mode, epsilon, temperature, **other inputs):
  1. every batch-shaped input (a tensor whose first dimension is the batch size B: input_ids,
     attention_mask, position_ids, audio features, pixel values, ...) is repeated K times in the
     layout: batch_major row b*K + k (the official order), hypothesis_major row k*B + b;
  2. the HF model runs to its final hidden states (B*K, T, H); a forward pre-hook on the output
     embedding hands the lm_head an empty slice, so no (rows x vocab) logits are formed;
  3. `mcl_loss(hidden, lm_head.weight, labels (B, T), ...)` computes the per-hypothesis sequence
     NLL L (K, B), the winners, the weights of the mode, and the loss mean_b sum_k w[k,b] L[k,b].

Inputs whose first dimension is not the batch (Qwen2-VL's flattened image patches, say) are not
repeated correctly; keys in NON_BATCH_KEYS are never repeated. Models that transform logits after
the lm_head (final logit soft-capping, logit scaling: LOGIT_TRANSFORMS) are outside what mcl_loss
computes and are refused; compute their logits and use mcl_loss_from_logits.

AnnealingSchedule is the official temperature schedule: tau = tau0 * rho**step, plain WTA once
tau <= tau_min; `attach(optimizer)` steps it after every optimizer.step().
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
try:  # HF's ModelOutput: a dict and a pytree node (DDP / FSDP find the loss in it)
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - transformers is optional for the package itself
    ModelOutput = object

from loramcl_kernels.hf.patching import get_config, multi_lora_modules
from loramcl_kernels.modules import LAYOUTS, MultiLoRALinear, repeat_rows
from loramcl_kernels.ops.mcl_loss import _check_config

NON_BATCH_KEYS = frozenset({"cache_position", "logits_to_keep", "num_logits_to_keep", "past_key_values"})


def is_batch_input(key: str, value, batch_size: int) -> bool:
    """A model input with one row per sequence: a tensor whose first dimension is the batch size."""
    return (key not in NON_BATCH_KEYS and isinstance(value, torch.Tensor) and value.dim() >= 1
            and value.shape[0] == batch_size)


def repeat_batch_inputs(inputs: dict, batch_size: int, num_hypotheses: int, layout: str) -> dict:
    """Every tensor in `inputs` whose first dimension is batch_size repeated K times in the layout."""
    return {key: repeat_rows(value, num_hypotheses, layout) if is_batch_input(key, value, batch_size) else value
            for key, value in inputs.items()}


def _batch_size(inputs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("inputs need input_ids or inputs_embeds to know the batch size")


class _FinalHiddenCapture:
    """Forward pre-hook on the lm_head: keeps its input, passes it an empty sequence slice."""

    def __init__(self, lm_head: nn.Module):
        self.hidden = None
        self.handle = lm_head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        hidden = args[0]
        self.hidden = hidden
        return (hidden.narrow(-2, 0, 0),) + tuple(args[1:])

    def remove(self):
        self.handle.remove()


def final_hidden_states(model: nn.Module, **inputs) -> torch.Tensor:
    """The hidden states the model's lm_head would see, (rows, T, H), without forming logits."""
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head)")
    capture = _FinalHiddenCapture(lm_head)
    try:
        model(**inputs)
    finally:
        capture.remove()
    if capture.hidden is None:
        raise RuntimeError(f"{type(model).__name__}'s forward did not call its lm_head")
    return capture.hidden


@dataclass
class MCLOutput(ModelOutput):
    """loss: scalar; nll: (K, B) per-hypothesis sequence NLL (detached); winners: (B,) argmin_k;
    weights: (K, B) weight of each hypothesis in the loss (detached)."""

    loss: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    winners: torch.Tensor | None = None
    weights: torch.Tensor | None = None


# config attribute -> the value with which the model leaves its logits as the lm_head gives them:
# soft-capping (Gemma 2/3, RecurrentGemma, xLSTM, Jev), scaling (Cohere, Granite, Falcon-H1, Muse)
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_soft_cap": None, "output_logit_soft_cap": None,
                    "softcap": None, "logit_scale": 1.0, "logits_scaling": 1.0, "lm_head_multiplier": 1.0,
                    "output_multiplier": 1.0}


def _check_plain_logits(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    configs = [config]
    if hasattr(config, "get_text_config"):  # multimodal models keep the language model's in a sub-config
        configs.append(config.get_text_config())
    for (name, identity), cfg in ((item, cfg) for item in LOGIT_TRANSFORMS.items() for cfg in configs):
        value = getattr(cfg, name, identity)
        if value is not None and value != identity:
            raise ValueError(
                f"the model transforms its logits after the lm_head (config.{name}={value!r}), which the fused "
                "MCL loss does not: compute the logits (K-repeated batch) and use mcl_loss_from_logits")


def mode_from_settings(epsilon, temperature, schedule) -> str:
    """mode=None: from what was given, a temperature or a schedule anneals, an epsilon relaxes, else WTA."""
    if schedule is not None or temperature is not None:
        return "annealed"
    return "relaxed" if epsilon else "wta"


def _check_training_routing(model: nn.Module, layout: str) -> None:
    """The K-repeated rows reach every MultiLoRALinear routed by the layout alone: a routing left
    set (an active_hypothesis from evaluating one adapter, generation's inner) would give rows the
    wrong hypotheses without an error. Refused rather than overridden, because a gradient-checkpointed
    layer recomputes its forward with the routing it finds at backward time."""
    expected = dict(active_hypothesis=None, layout=layout, inner=1, hypothesis_ids=None, shared_input=False)
    for name, module in multi_lora_modules(model):
        changed = {a: getattr(module, a) for a, value in expected.items()
                   if (getattr(module, a) is not None if value is None else getattr(module, a) != value)}
        if changed:
            raise ValueError(
                f"LoRA-MCL training routes every row by the layout, but {name} has routing {changed}: leave the "
                "`with active_hypothesis(...)` / lora_attributes block first, or reset it with set_lora_attributes("
                f"model, active_hypothesis=None, layout={layout!r}, inner=1, hypothesis_ids=None, shared_input=False)")


def mcl_forward(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    num_hypotheses: int,
    layout: str = "batch_major",
    mode: str = "wta",
    epsilon: float = 0.0,
    temperature: float | None = None,
    sequence_reduction: str = "mean",
    ignore_index: int = -100,
    backend: str | None = None,
    **inputs,
) -> MCLOutput:
    """One LoRA-MCL forward of a patched HF causal LM on B un-repeated rows; see the module doc."""
    from loramcl_kernels.ops.mcl_loss import mcl_loss

    if labels is None:
        raise ValueError("mcl_forward needs labels (B, T)")
    batch_size = _batch_size(inputs)
    if labels.shape[0] != batch_size:
        raise ValueError(f"labels must be (B, T) with B = {batch_size}, got shape {tuple(labels.shape)}")
    _check_plain_logits(model)
    lm_head = model.get_output_embeddings()
    if isinstance(lm_head, MultiLoRALinear):
        raise ValueError(
            "the lm_head carries LoRA adapters (patched with MultiLoRALinear): the fused MCL loss reads "
            "the lm_head weight alone, so leave lm_head out of target_modules, or compute the loss "
            "from the model's logits with mcl_loss_from_logits")
    if not isinstance(lm_head, nn.Linear) or type(lm_head).forward is not nn.Linear.forward:
        raise ValueError(
            f"the lm_head is a {type(lm_head).__name__} with a forward of its own, not a plain linear layer: the "
            "fused MCL loss reads its weight and bias alone, so compute the logits (K-repeated batch) and use "
            "mcl_loss_from_logits")
    _check_training_routing(model, layout)
    inputs = repeat_batch_inputs(inputs, batch_size, num_hypotheses, layout)
    inputs.setdefault("use_cache", False)
    hidden = final_hidden_states(model, **inputs)
    result = mcl_loss(
        hidden,
        lm_head.weight,
        labels,
        num_hypotheses=num_hypotheses,
        lm_head_bias=getattr(lm_head, "bias", None),
        layout=layout,
        mode=mode,
        epsilon=epsilon,
        temperature=temperature,
        sequence_reduction=sequence_reduction,
        ignore_index=ignore_index,
        shift_labels=True,
        backend=backend,
    )
    return MCLOutput(loss=result.loss, nll=result.nll, winners=result.winners, weights=result.weights)


class AnnealingSchedule:
    """Official annealed-MCL temperature: tau = tau0 * rho**step; None (plain WTA) once
    tau <= tau_min. Step it once per optimizer step (attach(optimizer) does that)."""

    def __init__(self, tau0: float, rho: float, tau_min: float = 0.0):
        for name, value in (("tau0", tau0), ("rho", rho), ("tau_min", tau_min)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {value!r}")
        if not tau0 > 0:
            raise ValueError(f"tau0 must be > 0, got {tau0!r}")
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        if not tau_min >= 0:
            raise ValueError(f"tau_min must be >= 0, got {tau_min!r}")
        self.tau0, self.rho, self.tau_min = float(tau0), float(rho), float(tau_min)
        self.step_count = 0

    @property
    def tau(self) -> float:
        return self.tau0 * self.rho**self.step_count

    @property
    def temperature(self) -> float | None:
        tau = self.tau
        return None if tau <= self.tau_min else tau

    def step(self) -> None:
        self.step_count += 1

    def attach(self, optimizer: torch.optim.Optimizer):
        """Step the schedule after every optimizer.step(); returns the hook handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def state_dict(self) -> dict:
        return {"tau0": self.tau0, "rho": self.rho, "tau_min": self.tau_min, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.tau0, self.rho, self.tau_min = state["tau0"], state["rho"], state["tau_min"]
        self.step_count = int(state["step_count"])

    def __repr__(self) -> str:
        return (
            f"AnnealingSchedule(tau0={self.tau0:g}, rho={self.rho:g}, tau_min={self.tau_min:g}, "
            f"step={self.step_count})"
        )


class MCLModel(nn.Module):
    """A patched HF causal LM trained with the LoRA-MCL loss; see the module docstring.

    mode: "wta" (hard winner-takes-all), "relaxed" (winner 1 - epsilon, others epsilon / (K-1)),
    "annealed" (weights softmax_k(-L / temperature); temperature defaults to the schedule's, and
    the loss is plain WTA once the schedule reaches tau_min). forward's mode=None picks annealed
    when given a temperature or a schedule, relaxed when given epsilon > 0, else wta; an epsilon or
    a temperature that the mode would ignore is refused.
    """

    # The loss is a mean over the batch's sequences, not a sum normalised by HF Trainer's
    # num_items_in_batch: Trainer then divides it by the gradient accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(
        self,
        model: nn.Module,
        num_hypotheses: int | None = None,
        *,
        layout: str | None = None,
        schedule: AnnealingSchedule | None = None,
        sequence_reduction: str = "mean",
        ignore_index: int = -100,
        backend: str | None = None,
    ):
        super().__init__()
        config = get_config(model)
        if num_hypotheses is not None and num_hypotheses != config.num_hypotheses:
            raise ValueError(
                f"num_hypotheses={num_hypotheses} but the model was patched with {config.num_hypotheses}"
            )
        layout = layout or config.layout
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout != config.layout:
            raise ValueError(f"layout={layout!r} but the model was patched with layout={config.layout!r}")
        self.model = model
        self.num_hypotheses = config.num_hypotheses
        self.layout = layout
        self.schedule = schedule
        self.sequence_reduction = sequence_reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mode: str | None = None,
        epsilon: float = 0.0,
        temperature: float | None = None,
        **inputs,
    ):
        """With labels: an MCLOutput. Without: the HF model's output on the K-repeated batch."""
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if labels is None:
            batch_size = _batch_size(inputs)
            return self.model(**repeat_batch_inputs(inputs, batch_size, self.num_hypotheses, self.layout))
        if mode is None:
            mode = mode_from_settings(epsilon, temperature, self.schedule)
        if mode == "annealed" and temperature is None:
            if self.schedule is None:
                raise ValueError("mode='annealed' needs temperature= or an AnnealingSchedule (schedule=)")
            temperature = self.schedule.temperature
            if temperature is None:
                mode = "wta"  # the schedule reached tau_min: plain WTA from here on
        # before the model runs: the mode, and an epsilon or temperature the mode would ignore
        _check_config(self.num_hypotheses, self.layout, mode, epsilon, temperature, self.sequence_reduction)
        return mcl_forward(
            self.model,
            labels,
            num_hypotheses=self.num_hypotheses,
            layout=self.layout,
            mode=mode,
            epsilon=epsilon,
            temperature=temperature,
            sequence_reduction=self.sequence_reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
            **inputs,
        )

    def generate_hypotheses(self, inputs, **generate_kwargs):
        from loramcl_kernels.hf.generation import generate_hypotheses

        return generate_hypotheses(self.model, inputs, self.num_hypotheses, **generate_kwargs)
