#!/usr/bin/env bash
# One call on a GPU machine: environment, GPU tests, benchmarks. Logs and JSON go to $OUT
# (the device tool's output folder) or ./results. Steps: env smoke tests bench profile host e2e
# decode bench_loss profile_loss sweep (STEPS chooses; default env smoke tests bench). smoke runs both ops once and, should
# launch() fail on this machine's Triton, sends every later step's launches through Triton's JIT.
# PYTEST_ARGS and PYTEST_K (pytest's -k) select tests (PYTEST_ARGS="tests -v -n 8": pytest-xdist, on the GPU image); E2E_ARGS goes to bench_e2e.py (--graphs, --checkpointing). Each step has its own time limit so a slow
# one cannot eat the rest (TESTS_TIMEOUT, BENCH_TIMEOUT, SWEEP_TIMEOUT).
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# wheels carried in .whl/ (the loss benchmark's Cut Cross-Entropy and Liger rows; see NOTES.md)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
STEPS=${STEPS:-"env smoke tests bench"}
# pytest -v names each test as it finishes: a step cut by its time limit still shows which passed
PYTEST_ARGS=${PYTEST_ARGS:-"tests -v"}
# smoke's decision on this machine (results/ stays between calls while the machine is warm)
if [ -f results/triton_launch ]; then
  export LORAMCL_TRITON_LAUNCH=$(cat results/triton_launch)
fi
PYTEST_K=${PYTEST_K:-"gpu and not smoke"}
for step in $STEPS; do
  case $step in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.txt"
      python3 -m loramcl_kernels.env 2>&1 | tee -a "$OUT/env.txt" ;;
    smoke)
      if ! timeout 120 python3 benchmarks/launch_smoke.py >>"$OUT/env.txt" 2>&1; then
        echo "launch() failed (see env.txt): every later launch goes through Triton" | tee -a "$OUT/env.txt"
        export LORAMCL_TRITON_LAUNCH=triton
        mkdir -p results && echo triton > results/triton_launch
        timeout 120 python3 benchmarks/launch_smoke.py >>"$OUT/env.txt" 2>&1
      fi
      tail -2 "$OUT/env.txt" ;;
    tests)
      timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest $PYTEST_ARGS -k "$PYTEST_K" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    bench)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_multi_lora.py --out "$OUT/multi_lora.json" 2>&1 | tee "$OUT/bench_multi_lora.log" ;;
    profile)
      { timeout 150 python3 benchmarks/profile_multi_lora.py --K 4 --T 2048 --r 16 --paths fused,fused-pointer-store,cublas
        timeout 90 python3 benchmarks/profile_multi_lora.py --K 4 --T 2048 --r 64
        timeout 60 python3 benchmarks/profile_multi_lora.py --K 5 --T 780 --r 8 --shared
        timeout 45 python3 benchmarks/profile_multi_lora.py --decode --K 8 --r 8
        timeout 45 python3 benchmarks/profile_multi_lora.py --decode --K 4 --r 64; } 2>&1 | tee "$OUT/profile.log" ;;
    host)
      { timeout 45 python3 benchmarks/profile_multi_lora.py --K 5 --T 780 --r 8 --host
        echo "## the same, every launch through Triton's JIT (LORAMCL_TRITON_LAUNCH=triton)"
        LORAMCL_TRITON_LAUNCH=triton timeout 45 python3 benchmarks/profile_multi_lora.py --K 5 --T 780 --r 8 --host
        timeout 45 python3 benchmarks/profile_multi_lora.py --K 5 --T 8 --r 8 --host --paths fused,cublas,decode; } 2>&1 | tee "$OUT/host.log" ;;
    e2e)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_e2e.py --out "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.log" ;;
    decode)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_decode.py --out "$OUT/decode.json" 2>&1 | tee "$OUT/bench_decode.log" ;;
    sweep)
      # the multi-LoRA sweeps share one log: the device tool returns at most 8 files
      { timeout "${SWEEP_TIMEOUT:-120}" python3 benchmarks/sweep_decode.py
        timeout 60 python3 benchmarks/sweep_shrink.py; } 2>&1 | tee "$OUT/sweep_multi_lora.log"
      timeout "${SWEEP_TIMEOUT:-120}" python3 benchmarks/sweep_mcl_loss.py 2>&1 | tee "$OUT/sweep_mcl_loss.log" ;;
    profile_loss)
      timeout 150 python3 benchmarks/profile_mcl_loss.py 2>&1 | tee "$OUT/profile_mcl_loss.log" ;;
    bench_loss)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_mcl_loss.py --out "$OUT/mcl_loss.json" 2>&1 | tee "$OUT/bench_mcl_loss.log" ;;
    *)
      echo "unknown step '$step' (steps: env smoke tests bench profile host e2e decode bench_loss profile_loss sweep)" ;;
  esac
done
