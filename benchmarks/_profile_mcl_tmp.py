import sys, os, torch
sys.path.insert(0, os.getcwd())
from benchmarks.bench_mcl_loss import make_inputs
from loramcl_kernels.ops import mcl_loss as M
from torch.profiler import profile, ProfilerActivity
for name, K, B, T, n_sup, H, V in [("captioning", 5, 4, 780, 32, 4096, 156032), ("small vocab", 8, 4, 512, 448, 2048, 32000)]:
    hidden, weight, labels = make_inputs(K, B, T, n_sup, H, V, "cuda", torch.bfloat16)
    def run():
        hidden.grad = None
        M.mcl_loss(hidden, weight, labels, num_hypotheses=K, backend="triton").loss.backward()
    for _ in range(3): run()
    torch.cuda.synchronize()
    print(name, "mm out_dtype ok:", M._MM_OUT_DTYPE_OK)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5): run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record(); [run() for _ in range(10)]; e.record(); torch.cuda.synchronize(); print(name, "ms/iter", s.elapsed_time(e)/10)
    del hidden, weight; torch.cuda.empty_cache()
