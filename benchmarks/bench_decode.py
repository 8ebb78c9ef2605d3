"""Decoding K hypotheses: one batched generate (ours) against K single-adapter generate calls (official).

    python benchmarks/bench_decode.py [--out results/decode.json] [--layers 8] [--beams 1] [--static]

The official LoRA-MCL code decodes hypothesis k in its single-adapter mode (PEFT adapter lora{k}
active, alpha/r scaling): one `generate` call per hypothesis, K calls in turn. Ours decodes the
B*K rows in one call (`generate_hypotheses`: row b*K + k is prompt b under hypothesis k; each
projection runs multi_lora_linear, its decode path on Hopper). The model is a random-initialised
decoder shaped like ALMA-7B's (Llama-2: d=4096, FFN 11008, 32 heads, vocab 32000) with K=3, r=16,
alpha=32 as in the official translation configuration, bf16, with fewer layers (--layers).
B prompts of P tokens, N new tokens per row, greedy (or beam search, --beams), every call forced
to N tokens (min_new_tokens). Variants, on the same weights and adapters:

  peft-sequential      K generate calls through a PeftModel holding lora0 ... lora{K-1}
                       (set_adapter): what the official code runs (skipped without peft)
  ours-sequential      K generate calls of the patched model, one hypothesis active at a time
  ours-batched         generate_hypotheses: one call over the B*K rows
  ours-batched-static  (--static) the same with cache_implementation="static": on CUDA, HF
                       compiles the decoding step and replays it from CUDA graphs (the compile
                       happens in the warm-up call and is not timed)

Reported per variant: ms for all K hypotheses of the B prompts, ms per decoding step (/ N),
generated tokens per second (B*K*N per call set), speedup against the first variant, the fraction
of (prompt, hypothesis) sequences whose tokens equal the first variant's (on the GPU a few may part
after a near-tie: bf16 rounding differs between batch shapes, and PEFT keeps its adapters in fp32
while ours are loaded in bf16, as one would for decoding; fp32 on the CPU: all), and whether the K
hypotheses decoded differently at all (if not, agreeing would prove nothing). Greedy decoding of
a random-initialised model meets near-ties, where one flipped token makes every later one differ;
so, for greedy decoding, the first variant's tokens are also fed back to each model in one forward
(teacher forcing) and the fraction of positions whose argmax is that token is reported: for the
model that decoded them (PEFT: its noise floor, below 1 only by near-ties between its cached and
full forwards) and for ours with all K hypotheses in one batch (as high, if ours computes the
same function; about 1/vocab per position if it does not).
Without a GPU: a labelled CPU smoke run on a tiny config (fp32).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from loramcl_kernels import from_peft, generate_hypotheses, patch_model  # noqa: E402
from loramcl_kernels.hf import active_hypothesis, multi_lora_modules  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
GPU_SHAPE = dict(hidden=4096, ffn=11008, heads=32, vocab=32000, K=3, r=16, alpha=32, B=8, prompt=64, new_tokens=64)
CPU_SHAPE = dict(hidden=64, ffn=128, heads=4, vocab=256, K=3, r=4, alpha=8, B=2, prompt=8, new_tokens=8)
PAD, EOS = 0, 2


def build_model(shape, layers, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         num_hidden_layers=layers, vocab_size=shape["vocab"], max_position_embeddings=4096,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def randomize_lora_B(modules, seed):
    """Non-zero B (initialised to zeros), so that the hypotheses decode differently."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in modules:
            weight.copy_(torch.randn(weight.shape, generator=gen) * 0.05)


def peft_model_with_adapters(model, shape):
    """A PeftModel holding K adapters lora0 ... lora{K-1} (the official single-adapter names), or
    None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    config = LoraConfig(r=shape["r"], lora_alpha=shape["alpha"], target_modules=list(TARGETS), lora_dropout=0.0)
    peft_model = get_peft_model(model, config, adapter_name="lora0")
    for k in range(1, shape["K"]):
        peft_model.add_adapter(f"lora{k}", config)
    lora_B = [m.lora_B[name].weight for m in peft_model.modules() if hasattr(m, "lora_B")
              for name in sorted(m.lora_B.keys())]
    randomize_lora_B(lora_B, seed=1)
    return peft_model.eval()


def teacher_forced_agreement(logits_of, prompt_ids, ids, batched):
    """Fraction of the (B, K, N) generated `ids` that are the argmax of the logits of the prompt +
    hypothesis-k sequences fed back in one forward: logits_of(k, (B, P + N) sequences) per k, or
    (batched) logits_of(None, (B*K, P + N)) with row b*K + k under hypothesis k (batch-major)."""
    B, K, N = ids.shape
    P = prompt_ids.shape[1]
    sequences = torch.cat([prompt_ids.cpu()[:, None].expand(B, K, P), ids], -1)  # (B, K, P + N)
    with torch.no_grad():
        if batched:
            logits = logits_of(None, sequences.reshape(B * K, P + N)).view(B, K, P + N, -1)
        else:
            logits = torch.stack([logits_of(k, sequences[:, k]) for k in range(K)], 1)
    logits = logits[:, :, P - 1:-1].float()
    logits[..., EOS] = -math.inf  # min_new_tokens keeps generate from choosing it
    predicted = logits.argmax(-1).cpu()
    return (predicted == ids).float().mean().item()


def run(shape, layers, beams, static, device, dtype, warmup, reps):
    K, B, P, N = shape["K"], shape["B"], shape["prompt"], shape["new_tokens"]
    model = build_model(shape, layers, device, dtype)
    gen = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(3, shape["vocab"], (B, P), generator=gen).to(device),
              "attention_mask": torch.ones(B, P, dtype=torch.long, device=device)}
    kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, num_beams=beams, pad_token_id=PAD)
    rows, first = [], []

    def measure(name, fn):
        """Time fn (it returns the (B, K, N) generated ids) and record a row; a failed variant (a
        missing compiler, out of memory) is recorded with its error and the run goes on."""
        try:
            ms, ids = common.wall_ms(fn, warmup=warmup, reps=reps)
        except Exception as exc:
            rows.append({"what": "decode", "impl": name, "error": common.error_chain(exc)})
            return
        ids = ids.cpu()
        if not first:
            first[:] = [ms, ids]
        rows.append({"what": "decode", "impl": name, "layers": layers, "beams": beams, "K": K, "r": shape["r"],
                     "B": B, "prompt": P, "new_tokens": N, "ms": ms, "ms_per_step": ms / N,
                     "tokens_per_s": B * K * N / (ms / 1e3), "speedup_vs_first": first[0] / ms,
                     "sequences_equal_to_first": (ids == first[1]).all(-1).float().mean().item(),
                     "first_tokens_equal_to_first": (ids[..., 0] == first[1][..., 0]).float().mean().item(),
                     "hypotheses_differ": bool((ids != ids[:, :1]).any())})

    peft_model = peft_model_with_adapters(model, shape)
    if peft_model is not None:
        def peft_sequential():
            outs = []
            for k in range(K):
                peft_model.set_adapter(f"lora{k}")
                outs.append(peft_model.generate(**inputs, **kw)[:, P:])
            return torch.stack(outs, 1)

        measure("peft-sequential", peft_sequential)

        def peft_logits(k, sequences):
            peft_model.set_adapter(f"lora{k}")
            return peft_model(input_ids=sequences.to(device)).logits

        if first and beams == 1:
            rows[-1]["teacher_forced_agreement"] = teacher_forced_agreement(
                peft_logits, inputs["input_ids"], first[1], batched=False)
        # the same adapters as K hypotheses (the PeftModel is consumed), in the base dtype for decoding
        model = from_peft(peft_model, adapter_dtype=dtype)
    else:
        patch_model(model, K, shape["r"], shape["alpha"], target_modules=TARGETS)
        randomize_lora_B([m.lora_B for _, m in multi_lora_modules(model)], seed=1)
    model.eval()

    def ours_sequential():
        outs = []
        for k in range(K):
            with active_hypothesis(model, k):
                outs.append(model.generate(**inputs, **kw)[:, P:])
        return torch.stack(outs, 1)

    measure("ours-sequential", ours_sequential)
    measure("ours-batched", lambda: generate_hypotheses(model, inputs, **kw))
    if static:
        measure("ours-batched-static", lambda: generate_hypotheses(model, inputs, cache_implementation="static", **kw))
    if first and beams == 1:
        # the first variant's tokens through ours, all K hypotheses in one batch
        agreement = teacher_forced_agreement(lambda k, sequences: model(input_ids=sequences.to(device)).logits,
                                             inputs["input_ids"], first[1], batched=True)
        for row in rows:
            if row["impl"].startswith("ours") and "error" not in row:
                row["teacher_forced_agreement"] = agreement
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "results", "decode.json"))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (8 on a GPU, 2 on the CPU)")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--static", action="store_true", help="also time cache_implementation='static'")
    args = parser.parse_args(argv)
    cuda = common.HAS_CUDA
    card = common.device_name()
    if cuda:
        shape, device, dtype, warmup, reps, layers = GPU_SHAPE, "cuda", torch.bfloat16, 1, 3, args.layers or 8
    else:
        print("No GPU: a labelled CPU smoke run on a tiny config (fp32); its times say nothing about the GPU.")
        shape, device, dtype, warmup, reps, layers = CPU_SHAPE, "cpu", torch.float32, 1, 1, args.layers or 2
    rows = run(shape, layers, args.beams, args.static, device, dtype, warmup, reps)
    def fraction(row, key):
        return f"{row[key]:.3f}" if row.get(key) is not None else "-"

    table = [[r["impl"], r["ms"], r["ms_per_step"], f"{r['tokens_per_s']:.0f}", r["speedup_vs_first"],
              fraction(r, "sequences_equal_to_first"), fraction(r, "first_tokens_equal_to_first"),
              fraction(r, "teacher_forced_agreement")]
             if "error" not in r else [r["impl"], r["error"][:60], "", "", "", "", "", ""] for r in rows]
    common.print_table(
        f"Decoding K={shape['K']} hypotheses of B={shape['B']} prompts ({shape['prompt']} tokens, {shape['new_tokens']} new, "
        f"beams {args.beams}; d={shape['hidden']}, {layers} layers, r={shape['r']}), on {card}",
        ["impl", "ms (all K)", "ms per step", "tokens/s", "speedup vs first", "same tokens", "same first token",
         "teacher-forced argmax = first's tokens"], table)
    common.write_json(rows, args.out, {**common.run_meta(), "shape": shape, "layers": layers})
    print(f"rows written to {args.out}")
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
