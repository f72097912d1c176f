#!/usr/bin/env bash
# One prepared GPU check: the kernel tests natively on the GPU, the full-size kernel benchmark
# with a block-size sweep, and the aTLAS step benchmark (whose cost is the kernels'). Run once from the repository root on a machine with a GPU, jax[cuda], flax, optax,
# chex and pytest installed; nothing is downloaded or installed:
#   OUT=/some/dir bash experiments/benchmarks/gpu_check.sh
# Writes at most 9 files to $OUT: env.txt, pytest_gpu.txt, kernels_ties.txt, kernels_sweep.txt,
# kernels_bench.txt, atlas_bench.txt, mtl_lenet.txt, summary.txt and runs.tgz (every benchmark's
# JSON). projection_bench runs the same way (`stage NAME LIMIT python -m experiments.benchmarks.NAME`).
# Each stage has its own time limit, so one that fails or hangs does not cost the others;
# the stage limits add up to under 9 minutes (measured figures in the README).
set -u
OUT="${OUT:-runs/gpu_check}"
RUNS="${RUNS:-/tmp/cljax_gpu_runs}"
mkdir -p "$OUT" "$RUNS"
PY="${PYTHON:-python3}"
export CLJAX_NO_PROGRESS=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# cljax.kernels lives in kernels/ and setup.cfg maps it into the package on install. Without
# installing anything, a link inside this (throwaway) working copy makes it importable.
if ! "$PY" -c "import cljax.kernels" 2>/dev/null; then
  [ -e cljax/kernels ] || ln -s ../kernels cljax/kernels
fi

stage() {  # stage NAME LIMIT_S CMD...: run with a limit, log to $OUT/NAME.txt, record exit
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  "$PY" -c "import flax, optax, chex, pytest; print('flax', flax.__version__, 'optax', optax.__version__, 'chex', chex.__version__, 'pytest', pytest.__version__)"
  "$PY" -c "import cljax.kernels; print('cljax.kernels importable')" 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Every kernel test, natively on the GPU: the 'gpu' variants (default GPU block sizes) and
#    the others (interpret-sized blocks, which on a GPU also compile natively).
stage pytest_gpu 75 "$PY" -m pytest -q tests/kernels -rfEs --durations=10 -p no:cacheprovider

# Compilation dominated earlier GPU sessions (each multi-leaf Triton kernel takes seconds):
# a persistent cache makes a rerun of any stage, or the same kernel in a later stage, cheap.
export JAX_COMPILATION_CACHE_DIR="$RUNS/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

# 2. TIES first (its GPU speed is the figure still owed): ViT-B/32, T = 8, XLA reference vs
#    Pallas (radix-select threshold, fused vote and merge) vs cljax.merging.ties.
stage kernels_ties 100 "$PY" -m experiments.benchmarks.kernels_bench --preset gpu --ops ties \
  --models vit-b32 --tasks 8 --out "$RUNS/kernels_ties"

# 3. Block sizes of the Pallas kernels (ViT-B/32, T = 8).
stage kernels_sweep 60 "$PY" -m experiments.benchmarks.kernels_bench --preset gpu --sweep \
  --out "$RUNS/kernels_sweep"

# 4. weighted_sum and block_dots at ViT-B/32 and ViT-L/14 sizes, T = 8 and 20, with the copy
#    bandwidth of the same run.
stage kernels_bench 150 "$PY" -m experiments.benchmarks.kernels_bench --preset gpu \
  --ops weighted_sum block_dots --out "$RUNS/kernels_bench"

# 5. One aTLAS step vs one fine-tuning step (small ViT and ViT-B/32 shape, batch 8, T = 8,
#    bfloat16 task vectors; the naive-autodiff variant is left out: it only costs compile time).
stage atlas_bench 90 "$PY" -m experiments.benchmarks.atlas_bench --no_autodiff \
  --tv_dtype bfloat16 --out "$RUNS/atlas_bench"

# 6. The LeNet rows of the F-MTL step benchmark at T = 2, whose F-MGDA / F-CAGrad exceeded the
#    bound on an H100 before their T = 2 solvers became loop-free.
stage mtl_lenet 60 "$PY" -m experiments.benchmarks.mtl_bench --models lenet --tasks 2 --repeats 20

tar -czf "$OUT/runs.tgz" --exclude=./jax_cache -C "$RUNS" . 2>/dev/null
tail -3 "$OUT/pytest_gpu.txt"
cat "$OUT/summary.txt"
