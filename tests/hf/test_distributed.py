"""DDP and FSDP2 (fully_shard) on CPU with gloo, 2 processes: after one step of MCLModel on a
global batch split over the ranks, gradients and updated adapters equal a single-process run
on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loramcl_kernels.hf.mcl_model import MCLModel
from loramcl_kernels.hf.patching import patch_model

from tests.hf.helpers import VOCAB, randomize_lora, tiny_llama

K, WORLD, GLOBAL_B, T = 2, 2, 4, 8

pytest.importorskip("torch.distributed.fsdp")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_batch():
    model = patch_model(tiny_llama(seed=0), K, 4, 8)
    randomize_lora(model, scale=0.2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (GLOBAL_B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return MCLModel(model), ids, labels


def _trainable(mcl):
    return [(n, p) for n, p in mcl.named_parameters() if p.requires_grad]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(wrapped, mcl, ids, labels):
    """One SGD step; returns {name: grad} and {name: updated parameter} as plain tensors."""
    params = _trainable(mcl)
    opt = torch.optim.SGD([p for _, p in params], lr=0.5)
    out = wrapped(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in params}
    opt.step()
    return grads, {n: _full(p).detach().clone() for n, p in params}, out.loss.detach()


def _worker(rank, port, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        rows = slice(rank * GLOBAL_B // WORLD, (rank + 1) * GLOBAL_B // WORLD)
        results = {}

        mcl, ids, labels = _model_and_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(mcl)
        results["ddp"] = _step(ddp, mcl, ids[rows], labels[rows])

        from torch.distributed.fsdp import fully_shard

        mcl, ids, labels = _model_and_batch()
        for layer in mcl.model.model.layers:
            fully_shard(layer)
        fully_shard(mcl)
        results["fsdp"] = _step(mcl, mcl, ids[rows], labels[rows])
        if rank == 0:
            torch.save(results, result_file)
        # both ranks done with every collective before either tears gloo down (one run aborted
        # with "terminate called without an active exception" as the processes exited)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    result_file = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(_free_port(), result_file), nprocs=WORLD, join=True)
    results = torch.load(result_file, weights_only=False)

    mcl, ids, labels = _model_and_batch()
    grads, params, _ = _step(mcl, mcl, ids, labels)
    assert any(g.abs().max() > 0 for g in grads.values())
    for kind in ("ddp", "fsdp"):
        got_grads, got_params, _ = results[kind]
        assert set(got_grads) == set(grads) and len(grads) == 20
        for n in grads:
            torch.testing.assert_close(got_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=f"{kind} grad {n}")
            torch.testing.assert_close(got_params[n], params[n], rtol=1e-5, atol=1e-6, msg=f"{kind} param {n}")
