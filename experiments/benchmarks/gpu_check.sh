#!/usr/bin/env bash
# One prepared GPU check of cljax.kernels: the GPU kernel tests and the full-size benchmark.
# Run once from the repository root on a machine with a GPU and jax[cuda], pytest and chex
# installed (nothing is downloaded; cljax itself is installed editable, without dependencies):
#   OUT=/some/dir bash experiments/benchmarks/gpu_check.sh
# Writes $OUT/env.txt, $OUT/pytest_gpu.txt, $OUT/pytest_interpret.txt, $OUT/kernels_bench.md
# and $OUT/results.json. Budget: ~2 min of tests + ~4 min of benchmark on an H100.
set -u
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export CLJAX_NO_PROGRESS=1

# cljax.kernels lives in kernels/ and is mapped by setup.cfg: an editable install from the
# working tree (no dependencies, no build isolation: nothing is fetched) makes it importable.
if ! "$PY" -c "import cljax.kernels" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.txt" 2>&1 \
    || echo "editable install failed: see $OUT/pip.txt"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  "$PY" -c "import cljax.kernels; print('cljax.kernels importable')" 2>&1
  "$PY" -c "import pytest, chex; print('pytest', pytest.__version__)" 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Native kernels against the references (the 'gpu' variants), then the rest of the
#    kernel tests (they also run natively here, since the backend is the GPU).
timeout 300 "$PY" -m pytest -q -m gpu tests/kernels -rA --durations=10 -p no:cacheprovider \
  > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest -m gpu: exit $?" | tee -a "$OUT/env.txt"
tail -5 "$OUT/pytest_gpu.txt"
timeout 240 "$PY" -m pytest -q -m "not gpu" tests/kernels -p no:cacheprovider \
  > "$OUT/pytest_interpret.txt" 2>&1
echo "pytest -m 'not gpu': exit $?" | tee -a "$OUT/env.txt"

# 2. Full-size benchmark: ViT-B/32 and ViT-L/14, T = 8 and 20, XLA vs Pallas, same device.
timeout 420 "$PY" -m experiments.benchmarks.kernels_bench --preset gpu --out "$OUT" \
  > "$OUT/kernels_bench.md" 2>&1
echo "kernels_bench: exit $?" | tee -a "$OUT/env.txt"
cat "$OUT/kernels_bench.md"
