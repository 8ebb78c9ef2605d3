"""End-to-end: one LoRA-MCL training step of a random-initialised decoder, official way vs ours.

    python benchmarks/bench_e2e.py [--out results/e2e.json] [--layers 4,8] [--checkpointing] [--graphs]

The model is shaped like Qwen2-Audio's language model (DESIGN.md section 3): d=4096, FFN 11008,
32 heads (MHA), vocab 156032, bf16; K=5 hypotheses, r = alpha = 8 on q/k/v/up/down_proj; B=1
sequence of T=780 positions of which the last 32 are supervised. One step = forward, backward,
AdamW on the adapters, zero_grad. Variants, on the same base weights and the same adapters:

  official  the official layer: two grouped 1x1 convolutions per projection (lora_A weight
            [K*r, d_in, 1], lora_B [K*d_out, r, 1], groups=K) on the K-repeated batch, full fp32
            logits for all K*B*T positions, CE with reduction none, per-sequence mean, min over K.
  ours      patch_model + MCLModel: multi_lora_linear on every projection and mcl_loss on the final
            hidden states (no logits), backend auto.
  ours-compiled  (--graphs) the README's recipe: MCLModel(torch.compile(model, mode="reduce-overhead")),
            the decoder compiled by inductor (which also fuses the elementwise work around the
            GEMMs) and its forward and backward replayed from CUDA graphs, without the host's
            per-launch time; mcl_loss eager. Compilation, warm-up and capture take the untimed
            first steps (minutes at d=4096); the graphs' memory pool is allocated there, so this
            row's peak extra memory leaves the pool out and is not comparable with the others'.
            `cudagraph_skips` counts the graphs inductor declined (0: every graph replays). On the
            CPU (smoke run) the decoder is compiled with backend "aot_eager", no graphs.
  ours-checkpointed  (--checkpointing) ours with HF's gradient checkpointing (non-reentrant): each
            decoder layer keeps its input only and recomputes its forward in the backward, so the
            per-layer memory slope is what it saves and the per-layer time what it costs.

Both variants' first-step losses are compared (same function, same weights). Per-layer time is the
slope between the layer counts; peak extra memory is the peak above what the model and optimizer
hold before the step. Without a GPU: a labelled CPU smoke run on a tiny config (fp32).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from loramcl_kernels import MCLModel, patch_model, unpatch_model  # noqa: E402
from loramcl_kernels.hf import multi_lora_modules  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
GPU_SHAPE = dict(hidden=4096, ffn=11008, heads=32, vocab=156032, K=5, r=8, T=780, supervised=32)
CPU_SHAPE = dict(hidden=64, ffn=128, heads=4, vocab=512, K=3, r=4, T=24, supervised=4)


class OfficialGroupLinear(nn.Module):
    """The official GroupLinear math: base + grouped 1x1 convs over batch-major rows, no scaling."""

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor):
        super().__init__()
        self.base_layer = base
        K, r, d_in = lora_A.shape
        self.num_hypotheses = K
        self.lora_A = nn.Parameter(lora_A.detach().reshape(K * r, d_in, 1).clone())
        self.lora_B = nn.Parameter(lora_B.detach().reshape(K * lora_B.shape[1], r, 1).clone())

    def forward(self, x):
        K = self.num_hypotheses
        n, t, d_in = x.shape[0], x.shape[1], x.shape[2]
        xc = x.view(n // K, K, t, d_in).permute(0, 1, 3, 2).reshape(n // K, K * d_in, t)
        h = F.conv1d(xc, self.lora_A, groups=K)
        lora = F.conv1d(h, self.lora_B, groups=K)  # (B, K*d_out, T)
        lora = lora.view(n // K, K, -1, t).permute(0, 1, 3, 2).reshape(n, t, -1)
        return self.base_layer(x) + lora


def official_loss(model, input_ids, labels, K):
    """Full fp32 logits for every position, CE (reduction none), per-sequence mean, min over K."""
    rep = input_ids.unsqueeze(1).expand(-1, K, -1).reshape(-1, input_ids.shape[1])
    logits = model(input_ids=rep, use_cache=False).logits.float()  # no KV cache: ours builds none either
    lab = labels.unsqueeze(1).expand(-1, K, -1).reshape(-1, labels.shape[1])
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (K*B*(T-1), V), as the official code
    nll = F.cross_entropy(shift_logits, lab[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    nll = nll.view(lab.shape[0], -1)
    mask = (lab[:, 1:] != -100).float()
    per_seq = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.view(-1, K).min(1).values.mean()


def build_model(shape, layers, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         num_hidden_layers=layers, vocab_size=shape["vocab"], max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval()  # eval: no dropout in either variant


def run_variant(name, model, loss_fn, params, warmup, reps, setup_steps=1):
    opt = torch.optim.AdamW(params, lr=1e-4)
    first = {}

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if "loss" not in first:
            first["loss"] = loss.item()

    for _ in range(setup_steps):  # optimizer states (and a compiled variant's graphs) exist from here on
        step()
    peak = common.peak_extra_gib(step)
    ms = common.wall_ms(step, warmup=warmup, reps=reps)[0]
    return {"impl": name, "ms": ms, "peak_extra_gib": peak, "first_loss": first["loss"]}


def _reset_adapters(model, adapters):
    """The adapters every variant starts from."""
    with torch.no_grad():
        for name, module in multi_lora_modules(model):
            module.lora_A.copy_(adapters[name][0])
            module.lora_B.copy_(adapters[name][1])


def bench_layers(shape, layers, device, dtype, cuda, warmup, reps, graphs=False, checkpointing=False):
    model = build_model(shape, layers, device, dtype)
    K, r, T, sup = shape["K"], shape["r"], shape["T"], shape["supervised"]
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, shape["vocab"], (1, T), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, : T - sup] = -100

    patch_model(model, K, r, lora_alpha=r, target_modules=TARGETS)
    adapters = {}
    for name, module in multi_lora_modules(model):  # non-zero B so that the hypotheses differ
        with torch.no_grad():
            module.lora_B.normal_(0, 0.02)
        adapters[name] = (module.lora_A.detach().clone(), module.lora_B.detach().clone())
    mcl = MCLModel(model)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    ours_loss = lambda: mcl(input_ids=input_ids, labels=labels, mode="wta").loss  # noqa: E731
    ours = [run_variant("ours", model, ours_loss, lora_params, warmup, reps)]
    if checkpointing:
        _reset_adapters(model, adapters)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF checkpoints in training mode only; the config has no dropout
        ours.append(run_variant("ours-checkpointed", model, ours_loss, lora_params, warmup, reps))
        model.gradient_checkpointing_disable()
        model.eval()
    if graphs:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        _reset_adapters(model, adapters)
        compiled = torch.compile(model, mode="reduce-overhead") if cuda else torch.compile(model, backend="aot_eager")
        mcl_compiled = MCLModel(compiled)
        try:  # a failed compile is recorded; the other variants' rows stay
            row = run_variant("ours-compiled", model,
                              lambda: mcl_compiled(input_ids=input_ids, labels=labels, mode="wta").loss,
                              lora_params, warmup, reps, setup_steps=3)
            ours.append({**row, "cudagraph_skips": counters["inductor"]["cudagraph_skips"]})
        except Exception as exc:
            ours.append({"impl": "ours-compiled", "error": common.error_chain(exc)})

    unpatch_model(model)
    model.requires_grad_(False)  # unpatch gives the base weights back their requires_grad: frozen, as in ours
    for name, (A, B) in adapters.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, OfficialGroupLinear(getattr(parent, child), A, B))
    official_params = [p for n, p in model.named_parameters() if ".lora_" in n]
    official = run_variant("official", model, lambda: official_loss(model, input_ids, labels, K), official_params,
                           warmup, reps)
    del model
    common_fields = {"what": "e2e_step", "layers": layers, **{k: shape[k] for k in ("K", "r", "T", "supervised")}}
    return [{**common_fields, **official}] + [{**common_fields, **row} for row in ours]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "results", "e2e.json"))
    parser.add_argument("--layers", default="4,8")
    parser.add_argument("--graphs", action="store_true",
                        help="also time ours with the decoder compiled (mode='reduce-overhead': CUDA graphs)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also time ours with HF's gradient checkpointing (memory against time)")
    args = parser.parse_args(argv)
    cuda = common.HAS_CUDA
    card = common.device_name()
    if cuda:
        shape, device, dtype, warmup, reps = GPU_SHAPE, "cuda", torch.bfloat16, 2, 5
    else:
        print("No GPU: a labelled CPU smoke run on a tiny config (fp32); its times say nothing about the GPU.")
        shape, device, dtype, warmup, reps = CPU_SHAPE, "cpu", torch.float32, 1, 2
    layer_counts = [int(v) for v in args.layers.split(",")]
    rows = []
    for layers in layer_counts:
        rows += bench_layers(shape, layers, device, dtype, cuda, warmup, reps, graphs=args.graphs,
                             checkpointing=args.checkpointing)
        if cuda:
            torch.cuda.empty_cache()
    table, ok = [], True
    for row in rows:
        if "error" in row:
            ok = False
            table.append([row["impl"], row["layers"], row["error"][:60], "", "", "", "", ""])
    for impl in ("official", "ours", "ours-checkpointed", "ours-compiled"):
        mine = sorted((r for r in rows if r["impl"] == impl and "error" not in r), key=lambda r: r["layers"])
        per_layer = ((mine[-1]["ms"] - mine[0]["ms"]) / (mine[-1]["layers"] - mine[0]["layers"])
                     if len(mine) > 1 else float("nan"))
        for r in mine:
            r["per_layer_ms"] = per_layer
            off = next(o for o in rows if o["impl"] == "official" and o["layers"] == r["layers"])
            r["speedup_vs_official"] = off["ms"] / r["ms"]
            r["memory_vs_official"] = r["peak_extra_gib"] / off["peak_extra_gib"] if cuda else float("nan")
            rel = abs(r["first_loss"] - off["first_loss"]) / max(abs(off["first_loss"]), 1e-12)
            r["loss_rel_diff_vs_official"] = rel
            ok &= math.isfinite(r["first_loss"]) and rel < (2e-2 if cuda else 1e-4)
            table.append([impl, r["layers"], r["ms"], per_layer, r["speedup_vs_official"],
                          common.fmt_gib(r["peak_extra_gib"]), f"{r['first_loss']:.5f}", f"{rel:.1e}"])
    common.print_table(
        f"LoRA-MCL training step (K={shape['K']}, r={shape['r']}, T={shape['T']}, {shape['supervised']} supervised, "
        f"d={shape['hidden']}, vocab={shape['vocab']}), ms, on {card}",
        ["impl", "layers", "step ms", "per layer ms", "speedup vs official", "peak extra GiB", "first loss",
         "loss rel diff"], table)
    common.write_json(rows, args.out, {**common.run_meta(), "shape": shape})
    print(f"rows written to {args.out}")
    if not ok:
        print("a variant failed, or the variants' first-step losses disagree")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
