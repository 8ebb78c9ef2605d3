"""LoRA-MCL training under DistributedDataParallel or FSDP2, launched with torchrun.

    torchrun --nproc_per_node 2 examples/train_ddp.py                  # DDP, tiny random Llama, CPU/gloo
    torchrun --nproc_per_node 8 examples/train_ddp.py --fsdp --model /path/to/local/hf/model

Every rank patches the model with K LoRA hypotheses (same seed, so the adapters start equal),
takes its share of each global batch, and trains through MCLModel (fused multi-LoRA linears +
fused MCL loss, annealed then hard winner-takes-all). Rank 0 saves every hypothesis as a
standard PEFT adapter at the end. Without --model a tiny Llama is built from a config and the
data are random tokens, so the script runs anywhere in seconds.
"""
import argparse
import os

import torch
import torch.distributed as dist

from loramcl_kernels.hf import AnnealingSchedule, MCLModel, generate_hypotheses, patch_model
from loramcl_kernels.interop import save_hypothesis


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    return LlamaForCausalLM(config).to(getattr(torch, args.dtype))


def random_batch(step, rank, args, vocab, device):
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own share of the batch
    ids = torch.randint(3, vocab, (args.batch_per_rank, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100  # supervise only the second half, like a caption
    return ids.to(device), labels.to(device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="a local HF model directory (default: tiny random Llama)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    p.add_argument("--num-hypotheses", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-per-rank", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="mcl_adapters")
    args = p.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # identical base model and adapter init on every rank
    model = build_model(args).to(device)
    patch_model(model, args.num_hypotheses, args.r, args.lora_alpha, lora_dropout=args.lora_dropout)
    schedule = AnnealingSchedule(tau0=1.0, rho=0.5, tau_min=0.1)
    mcl = MCLModel(model, schedule=schedule)

    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(mcl)
        wrapped = mcl
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(mcl, device_ids=[local_rank] if use_cuda else None)

    optimizer = torch.optim.AdamW([q for q in mcl.parameters() if q.requires_grad], lr=args.lr)
    schedule.attach(optimizer)  # the temperature steps with the optimizer
    vocab = model.get_output_embeddings().weight.shape[0]
    for step in range(args.steps):
        ids, labels = random_batch(step, rank, args, vocab, device)
        out = wrapped(input_ids=ids, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        if rank == 0:
            tau = schedule.temperature
            print(f"step {step}: loss {loss.item():.4f}  winners {out.winners.tolist()}  "
                  f"temperature {'wta' if tau is None else f'{tau:.3f}'}")

    if args.fsdp:  # gather the full (unsharded) weights on every rank, keep them on CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(mcl, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if args.fsdp:
            plain = build_model(args)
            patch_model(plain, args.num_hypotheses, args.r, args.lora_alpha)
            missing, unexpected = plain.load_state_dict({k[len("model."):]: v for k, v in full.items()}, strict=False)
            assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
            model = plain.to(device)
        model.eval()
        for k in range(args.num_hypotheses):
            save_hypothesis(model, k, os.path.join(args.out, f"hypothesis_{k}"))
        prompts = random_batch(0, 0, args, vocab, device)[0][:, :8]
        hyps = generate_hypotheses(model, prompts, max_new_tokens=8, do_sample=False,
                                   pad_token_id=model.config.pad_token_id)
        print(f"saved {args.num_hypotheses} PEFT adapters to {args.out}; hypotheses of prompt 0:")
        for k in range(args.num_hypotheses):
            print(f"  {k}: {hyps[0, k].tolist()}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
