"""MultiLoRALinear: a frozen linear layer carrying K LoRA hypotheses, run by one fused op.

Math (DESIGN section 2.1), for batch row n served by hypothesis h(n):

    y[n] = x[n] W^T + bias + s * (dropout(x[n]) A_h^T) B_h^T

Parameters and buffers:
    base_layer  the wrapped layer, frozen: nn.Linear (weight (d_out, d_in)) or transformers' GPT-2
                style Conv1D (weight (d_in, d_out), passed to the op transposed, no copy).
    lora_A      (K, r, d_in), each A_k Kaiming-uniform with a = sqrt(5) over fan_in = d_in, the same
                distribution as PEFT's and the official grouped-conv layer's init.
    lora_B      (K, d_out, r), zeros, so a fresh module computes exactly the base layer.
    scaling     lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), a Python float.

Scaling convention: this module applies alpha/r in every mode. The official LoRA-MCL layer applies
NO alpha/r in its multi-hypothesis path and alpha/r only in its single-adapter path (its shipped
configs use alpha == r, where the two agree); `loramcl_kernels.interop.official` reproduces the
official convention exactly when it runs official layers on our op.

Which hypothesis serves a row (attributes, changeable between calls):
    active_hypothesis  None: all K by layout; k: every row through adapter k (single-adapter mode,
                       like PEFT with one adapter active, scaling alpha/r).
    hypothesis_ids     None, or an int tensor (N,) with values in [-1, K); -1 = base layer only.
    layout             "batch_major" (official: row n -> (n // inner) % K) or "hypothesis_major"
                       (row n -> n // (N / K)).
    inner              consecutive rows sharing one hypothesis in batch_major (beams in generate).
    shared_input       x holds N rows every hypothesis sees; the output has N*K rows in the layout.
    batch_shape        None, or the (sequences N, tokens T) of the model's current forward (patch_model
                       keeps it up to date with a forward pre-hook on the model): a model that
                       flattens its (N, T, d) activations to (N*T, d) token rows before this layer
                       (MoE shared experts, OPT's MLP) hands it row n*T + t of sequence n, whose
                       hypothesis is sequence n's. Without it, x's first dim is the batch.

Dropout: masks are drawn per element of x, and different rows belong to different hypotheses,
so every hypothesis gets its own masks. In training the op applies the dropout inside its kernels
(the shrink reads dropout(x), the base GEMM x; nothing extra stored), one fused call as without
dropout. In shared-input mode the input is repeated first so that each hypothesis still draws its
own mask: the base GEMM then runs once in PyTorch and the op adds the LoRA delta.
"""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from loramcl_kernels.ops._autocast import autocast_enabled

LAYOUTS = ("batch_major", "hypothesis_major")


def _multi_lora_linear(*args, **kwargs):
    # Imported at call time so that this module imports even where the op's kernels cannot load.
    from loramcl_kernels.ops.multi_lora_linear import multi_lora_linear

    return multi_lora_linear(*args, **kwargs)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2 style: weight (d_in, d_out), y = x W + b)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def supported_base_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def repeat_rows(t: torch.Tensor, num_hypotheses: int, layout: str, inner: int = 1) -> torch.Tensor:
    """(N, ...) -> (N*K, ...): row n repeated for every hypothesis, in the layout's row order, the
    shared-input order of the op: batch_major, output row (g*K + k)*inner + j <- input row
    g*inner + j (groups of `inner` rows, e.g. beams, repeated together); hypothesis_major, k*N + n."""
    if layout == "batch_major":
        n, rest = t.shape[0], t.shape[1:]
        if n % inner:
            raise ValueError(f"shared input: the batch N={n} must be divisible by inner={inner}")
        groups = t.reshape(n // inner, 1, inner, *rest)
        return groups.expand(n // inner, num_hypotheses, inner, *rest).reshape(n * num_hypotheses, *rest)
    return t.repeat(num_hypotheses, *([1] * (t.dim() - 1)))


def _check_positive_int(name: str, value) -> int:
    """value as an int >= 1 (Python or numpy integers; not bools)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_init_lora_weights(init_lora_weights) -> None:
    if not (isinstance(init_lora_weights, bool) or init_lora_weights == "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")


class BatchShape:
    """The (sequences, tokens) of a patched model's current forward, shared by its MultiLoRALinear
    modules and kept up to date by forward pre-hooks on the model and its decoder (patch_model installs them)."""

    def __init__(self):
        self.sequences: int | None = None
        self.tokens: int | None = None

    @torch.compiler.disable  # two ints of host bookkeeping: never a compiled frame of its own
    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with kwargs): read (N, T) off input_ids or inputs_embeds."""
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            self.sequences, self.tokens = ids.shape[0], ids.shape[1]
        else:
            self.sequences = self.tokens = None


class MultiLoRALinear(nn.Module):
    """K LoRA adapters on one frozen linear layer; see the module docstring for the math."""

    def __init__(
        self,
        base_layer: nn.Module,
        num_hypotheses: int,
        r: int,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        layout: str = "batch_major",
        inner: int = 1,
        backend: str | None = None,
        init_lora_weights: bool | str = True,
        adapter_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not supported_base_layer(base_layer):
            raise TypeError(
                "MultiLoRALinear wraps nn.Linear or transformers' Conv1D, "
                f"got {type(base_layer).__module__}.{type(base_layer).__name__}"
            )
        num_hypotheses = _check_positive_int("num_hypotheses", num_hypotheses)
        r = _check_positive_int("r", r)
        if lora_alpha is None:
            lora_alpha = r
        if isinstance(lora_alpha, bool) or not math.isfinite(float(lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight = base_layer.weight
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.num_hypotheses = num_hypotheses
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout_p = float(lora_dropout)  # applied by the op's kernels in training
        self.layout = layout
        self.inner = _check_positive_int("inner", inner)
        self.hypothesis_ids: torch.Tensor | None = None
        self.active_hypothesis: int | None = None
        self.shared_input = False
        self.batch_shape: BatchShape | None = None
        self.backend = backend
        if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
            raise TypeError(f"adapter_dtype must be a floating torch.dtype or None, got {adapter_dtype!r}")
        factory = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(num_hypotheses, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_hypotheses, self.out_features, r, **factory))
        self.reset_lora_parameters(init_lora_weights)

    # -- parameters -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """True (PEFT's and the official default): A_k Kaiming-uniform (a = sqrt(5), fan_in = d_in:
        bound 1/sqrt(d_in)), B_k zeros; "gaussian" (PEFT's): A_k ~ N(0, 1/r^2), B_k zeros; False: A_k and
        B_k Kaiming-uniform, a non-zero delta (for tests). PEFT's other inits are not offered: pissa,
        olora, corda, loftq and lora_ga also rewrite the base weight, which the K hypotheses share;
        eva, orthogonal and the like need data or a layout this module does not take."""
        check_init_lora_weights(init_lora_weights)
        K, r, d_in = self.lora_A.shape
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.view(K * r, d_in), a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B)
        else:  # a random B, for tests that need a non-zero delta
            nn.init.kaiming_uniform_(self.lora_B.view(K * self.out_features, r), a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as (d_out, d_in), a view for Conv1D bases."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self, k: int) -> torch.Tensor:
        """s * B_k A_k as (d_out, d_in), computed in fp32 (fp64 for fp64 weights), in the base dtype."""
        return self._delta(k).to(self.base_layer.weight.dtype)

    def _delta(self, k: int) -> torch.Tensor:
        """s * B_k A_k as (d_out, d_in) in fp32 (fp64 where an operand is fp64)."""
        self._check_hypothesis(k)
        acc = torch.promote_types(torch.promote_types(self.lora_A.dtype, self.base_layer.weight.dtype), torch.float32)
        return self.lora_B[k].to(acc) @ self.lora_A[k].to(acc) * self.scaling

    @torch.no_grad()
    def merge(self, k: int) -> nn.Module:
        """A copy of the base layer (nn.Linear, or transformers' Conv1D with its (d_in, d_out)
        weight) computing hypothesis k: weight W + s B_k A_k rounded once to the base dtype, the
        base bias; frozen."""
        delta = self._delta(k)
        merged = (self.weight.to(delta.dtype) + delta).to(self.base_layer.weight.dtype)
        out = copy.deepcopy(self.base_layer)
        out.weight.copy_(merged.t() if self.fan_in_fan_out else merged)
        out.requires_grad_(False)
        return out

    def _check_hypothesis(self, k, name: str = "hypothesis") -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_hypotheses:
            raise ValueError(f"{name} must be an int in [0, {self.num_hypotheses}), got {k!r}")

    # -- forward ----------------------------------------------------------------------------
    def _adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A, lora_B in the base layer's dtype: adapters kept in another dtype (fp32 master
        weights, as PEFT keeps them) are cast for the fused op; gradients reach them through the cast.
        Under autocast the op casts every operand to the autocast dtype itself."""
        lora_A, lora_B = self.lora_A, self.lora_B
        dtype = self.base_layer.weight.dtype
        if lora_A.dtype != dtype and not autocast_enabled(lora_A.device.type):
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        return lora_A, lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (N, ..., in_features={self.in_features}), "
                            f"got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (N, ..., in_features={self.in_features}), got {tuple(x.shape)}")
        weight, bias = self.weight, self.bias
        dropout = self.training and self.lora_dropout_p > 0
        k = self.active_hypothesis
        all_A, all_B = self._adapters()
        if k is not None:
            # Single-adapter mode: every row through adapter k.
            self._check_hypothesis(k, "active_hypothesis")
            lora_A, lora_B = all_A[k : k + 1], all_B[k : k + 1]
            kw = dict(num_hypotheses=1, layout="batch_major", inner=1, backend=self.backend)
            return _multi_lora_linear(x, weight, bias, lora_A, lora_B, self.scaling,
                                      lora_dropout=self.lora_dropout_p if dropout else 0.0, **kw)
        inner, hypothesis_ids = self._row_map(x)
        kw = dict(
            num_hypotheses=self.num_hypotheses,
            # explicit ids give each row's hypothesis: the layout's map is not used
            layout=self.layout if hypothesis_ids is None else "batch_major",
            inner=inner if hypothesis_ids is None else 1,
            hypothesis_ids=hypothesis_ids,
            backend=self.backend,
        )
        if not (dropout and self.shared_input):
            return _multi_lora_linear(x, weight, bias, all_A, all_B, self.scaling, shared_input=self.shared_input,
                                      lora_dropout=self.lora_dropout_p if dropout else 0.0, **kw)
        if self.hypothesis_ids is not None:  # the op would see repeated rows, not shared input: checked here
            raise ValueError("hypothesis_ids cannot be combined with shared_input=True")
        base = F.linear(x, weight, bias)
        # shared input with dropout: each hypothesis draws its own mask, so repeat first, then drop
        x = repeat_rows(x, self.num_hypotheses, self.layout, inner)  # inner of the row map: token rows
        base = repeat_rows(base, self.num_hypotheses, self.layout, inner)
        delta = _multi_lora_linear(x, None, None, all_A, all_B, self.scaling, lora_dropout=self.lora_dropout_p, **kw)
        return base + delta

    def _row_map(self, x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(inner, hypothesis_ids) for the rows of x. Token rows (x (N*T, d) of a model whose forward
        has N sequences of T tokens, or N*K after a shared-input layer repeated them): row n*T + t
        belongs to sequence n, so in batch_major a hypothesis's rows come in runs of T * inner and
        explicit ids repeat T times (hypothesis_major's blocks stay blocks). 2-D rows that are
        neither sequences nor their tokens (a routed expert's share of the tokens) have no
        hypothesis this layer can tell: an error, not a guess."""
        shape = self.batch_shape
        # 3-D x (the usual case) reads nothing off the shared shape: no guard on it under torch.compile
        if x.dim() != 2 or shape is None or shape.sequences is None or shape.tokens == 1:
            return self.inner, self.hypothesis_ids
        sequences = (shape.sequences, shape.sequences * self.num_hypotheses)
        # token rows first: where T = K the N*T token rows of a layer that sees every token are as
        # many as the N*K rows of sequences repeated for shared input, and are the usual case
        if x.shape[0] not in tuple(n * shape.tokens for n in sequences):
            if x.shape[0] in sequences:
                return self.inner, self.hypothesis_ids
            raise ValueError(
                f"MultiLoRALinear got {x.shape[0]} rows while the model's forward has {shape.sequences} sequences "
                f"of {shape.tokens} tokens: neither the sequences nor their tokens (N or N*T rows), so the "
                "hypothesis of each row is unknown (a routed MoE expert's share of the tokens?). Patch layers "
                "that see every token, or set hypothesis_ids per row.")
        ids = self.hypothesis_ids
        if ids is not None:
            return self.inner, ids.repeat_interleave(shape.tokens)
        return (self.inner * shape.tokens if self.layout == "batch_major" else self.inner), None

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, base={kind}, "
            f"num_hypotheses={self.num_hypotheses}, r={self.r}, lora_alpha={self.lora_alpha:g}, "
            f"scaling={self.scaling:g}{', rslora' if self.use_rslora else ''}, "
            f"dropout={self.lora_dropout_p:g}, layout={self.layout}, inner={self.inner}, "
            f"backend={self.backend or 'auto'}"
        )
