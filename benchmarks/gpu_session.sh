#!/usr/bin/env bash
# One lent-GPU session: the CUDA tests, then the speed benchmarks, each under its own time limit,
# logs and results copied to $OUT (the device tool's return folder; defaults to ./gpu-out).
#
#   bash benchmarks/gpu_session.sh            (from the repository root)
#
# Needs: python3 with torch (CUDA), torchvision, scikit-image; webdataset for the shard benchmark
# (installed from .whl/ when that folder exists); MNIST idx files under $VEIL_DATA/mnist for the
# utility benchmark and real MNIST images in the shard benchmark (.gpudata/ when present).
set -u
OUT=${OUT:-$PWD/gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -d .gpudata ] && export VEIL_DATA=$PWD/.gpudata
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  echo "== $name: rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$LOGS/steps.log"
  # one archive under $OUT, refreshed after every step: a run stopped at its limit keeps what it did
  cp benchmarks/results/*_cuda.* benchmarks/results/*_cuda_hardened75.* benchmarks/results/*_cuda_hardened_keys* benchmarks/results/*_cuda_keys* benchmarks/results/*_cuda_long.* benchmarks/results/throughput_cuda_vgg_* benchmarks/results/profile_*.md "$LOGS"/ 2>/dev/null
  tail -n 4 "$LOGS/$name.log"
  tar -C "$LOGS" -cf "$OUT/gpu.tar" .
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# STEPS: which steps to run, in this order (default: all)
for s in ${STEPS:-pytest shard utility profile throughput}; do
  case $s in
    pytest) step pytest_cuda "${T_PYTEST:-80}" bash -c "python3 -m pytest -q tests/test_fastpath.py ${PYTEST_ARGS:-}" ;;
    levers) step mnist60k_levers "${T_LEVERS:-170}" bash -c "python3 benchmarks/mnist60k_levers.py ${LEVERS_ARGS:-}" ;;
    rewrites)  # LeNet-5's exact rewrites against the best config so far, same run (cold compile of each ~20-45 s)
      step mnist60k_rewrites "${T_REWRITES:-240}" python3 benchmarks/mnist60k_levers.py --configs "graph + compile, one batch" \
        "graph + compile, one batch, conv1 input gradient as shifted products" \
        "graph + compile, one batch, even adaptive pool as max pool" "graph + compile, one batch, both rewrites"
      step profile_lenet_rewrite "${T_PROFILE:-60}" python3 benchmarks/profile_step.py --case lenet5_28 --compile --rewrite ;;
    shard) step shard_throughput "${T_SHARD:-100}" bash -c "python3 benchmarks/shard_throughput.py --device cuda ${SHARD_ARGS:---nproc 4}" ;;
    shard_hardened) step shard_throughput_hardened "${T_SHARD:-100}" python3 benchmarks/shard_throughput.py --device cuda \
        --mode hardened --steps 75 --cases mnist_lenet5 --io-procs 0 8 --tag hardened75 ;;  # the recipe's 75 steps: pad off the veil thread
    shard_long) step shard_throughput_long "${T_SHARD_LONG:-150}" bash -c "python3 benchmarks/shard_throughput.py --device cuda --cases mnist_lenet5 --images 131072 --io-procs 8 --tag long" ;;
    tail) step compile_tail "${T_TAIL:-120}" python3 benchmarks/compile_tail.py --device cuda ;;  # recompile vs pad a last batch
    utility_hardened) step precision_utility_hardened "${T_UTILITY:-150}" python3 benchmarks/precision_utility.py --device cuda \
        --mode hardened --steps 75 --configs "bf16 + CUDA graph" --keys 10 --block 10 --chunk 60 --seeds 0 1 2 --trainer many ;;
    utility) step precision_utility "${T_UTILITY:-110}" bash -c "python3 benchmarks/precision_utility.py --device cuda ${UTILITY_ARGS:-}" ;;
    profile) step profile_lenet "${T_PROFILE:-40}" python3 benchmarks/profile_step.py --case lenet5_28
             step profile_lenet_compiled "${T_PROFILE:-40}" python3 benchmarks/profile_step.py --case lenet5_28 --compile ;;
    profile_vgg) step profile_vgg "${T_PROFILE:-60}" python3 benchmarks/profile_step.py --case vgg16_112 --bf16 --compile ;;
    vgg_batch)  # VGG-16 bf16 + CUDA graph + compile at larger batches (the table's 256 as the same-run baseline)
      for b in ${VGG_BATCHES:-1024 256 512}; do
        plain=--skip-plain; [ "$b" = 512 ] && plain=
        step vgg_b$b "${T_VGG:-150}" python3 benchmarks/throughput.py --device cuda --cases vgg16_112 --batch "$b" --one-sample 0 \
          --no-60k $plain --methods "library bf16 + CUDA graph + compile" --out-name throughput_cuda_vgg_b$b
      done ;;
    throughput) step throughput "${T_THROUGHPUT:-300}" python3 benchmarks/throughput.py --device cuda --one-sample 2 ${THROUGHPUT_ARGS:-} ;;
  esac
done
tail -n 3 "$LOGS"/pytest_cuda.log
cat "$LOGS"/throughput_cuda.md "$LOGS"/precision_utility_cuda*.md "$LOGS"/shard_throughput_cuda.md "$LOGS"/mnist60k_levers_cuda.md 2>/dev/null | cut -c1-220
