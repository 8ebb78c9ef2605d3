#!/usr/bin/env bash
# One call on a GPU machine: environment, GPU tests, benchmarks. Logs and JSON go to $OUT
# (the device tool's output folder) or ./results. Steps: env tests bench profile host e2e bench_loss
# (STEPS chooses; default env tests bench),
# PYTEST_ARGS selects tests. Each step has its own time limit so a slow one cannot eat the rest.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STEPS=${STEPS:-"env tests bench"}
PYTEST_ARGS=${PYTEST_ARGS:-"tests -q -x -k gpu"}
for step in $STEPS; do
  case $step in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.txt"
      python3 -m loramcl_kernels.env 2>&1 | tee -a "$OUT/env.txt" ;;
    tests)
      timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest $PYTEST_ARGS -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    bench)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_multi_lora.py --out "$OUT/multi_lora.json" 2>&1 | tee "$OUT/bench_multi_lora.log" ;;
    profile)
      { timeout 120 python3 benchmarks/profile_multi_lora.py --K 4 --T 2048 --r 16
        timeout 60 python3 benchmarks/profile_multi_lora.py --K 5 --T 780 --r 8 --shared; } 2>&1 | tee "$OUT/profile.log" ;;
    host)
      { timeout 60 python3 benchmarks/profile_multi_lora.py --K 5 --T 780 --r 8 --host
        echo "## the same, every launch through Triton's JIT (LORAMCL_TRITON_LAUNCH=triton)"
        LORAMCL_TRITON_LAUNCH=triton timeout 60 python3 benchmarks/profile_multi_lora.py --K 5 --T 780 --r 8 --host
        timeout 60 python3 benchmarks/profile_multi_lora.py --K 5 --T 8 --r 8 --host --paths fused,cublas,decode; } 2>&1 | tee "$OUT/host.log" ;;
    e2e)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_e2e.py --out "$OUT/e2e.json" 2>&1 | tee "$OUT/bench_e2e.log" ;;
    bench_loss)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_mcl_loss.py --out "$OUT/mcl_loss.json" 2>&1 | tee "$OUT/bench_mcl_loss.log" ;;
  esac
done
