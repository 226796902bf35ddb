#!/usr/bin/env bash
# The one command a session lent the GPU host runs (issue 22), from the repository root there:
#   1. the CUDA tests: tests/test_cuda.py and the CUDA canaries of tests/test_compat.py (-m cuda);
#   2. benchmarks/gpu.py (every case, its repeats cut short past a time budget).
# Both together stay under 5 minutes (each has its own timeout). Everything lands under $OUT:
#   env.txt (versions, GPU), tests.log, junit.xml, bench.log, gpu/gpu.json, gpu/gpu.txt
#
# Before calling it: build the Ray bundle on the machine with network, from the project root
# with the packages fedckpt needs that the GPU image lacks (see /work/shared/gpu/README.md),
#   /work/shared/gpu/bundle.sh isal==1.9.1
# then run this with carry [".devbundle"]:
#   bash benchmarks/gpu_device_run.sh
# Dry run without a GPU (no bundle needed; the CUDA tests are skipped and the benchmark says why it cannot run):
#   OUT=/tmp/gpu-dry PYTHON=.venv/bin/python bash benchmarks/gpu_device_run.sh
set -uo pipefail

OUT=${OUT:-$PWD/gpu-run}
PYTHON=${PYTHON:-python3}
TESTS_SECONDS=${TESTS_SECONDS:-120}
BENCH_SECONDS=${BENCH_SECONDS:-165}
BENCH_BUDGET=${BENCH_BUDGET:-90}  # past it the benchmark's cases stop repeating
mkdir -p "$OUT/gpu"

if [ -f .devbundle/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .devbundle/site.tar.xz -C /tmp/site
elif ! "$PYTHON" -c "import ray" 2>/dev/null; then
  echo "no .devbundle/site.tar.xz and no Ray: build it with /work/shared/gpu/bundle.sh isal==1.9.1 and carry .devbundle" >&2
  exit 3
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "(no git)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "(no nvidia-smi)"
  df -h /tmp /dev/shm 2>&1
  "$PYTHON" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "devices", torch.cuda.device_count())
try:
    import ray
    print("ray", ray.__version__)
except Exception as error:
    print("ray: not importable:", error)
try:
    import flwr  # noqa: F401
    print("flwr: present")
except ImportError:
    print("flwr: absent (nothing run here imports it)")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

started=$(date +%s)
timeout --kill-after=10 "$TESTS_SECONDS" "$PYTHON" -m pytest -m cuda tests/test_cuda.py tests/test_compat.py \
  -p no:cacheprovider -q -rs --durations=10 --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
tests_done=$(date +%s)

timeout --kill-after=10 "$BENCH_SECONDS" "$PYTHON" benchmarks/gpu.py --out "$OUT/gpu" \
  --budget-seconds "$BENCH_BUDGET" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
finished=$(date +%s)

echo "CUDA tests: exit $tests_rc in $((tests_done - started)) s; benchmark: exit $bench_rc in $((finished - tests_done)) s;" \
  "together $((finished - started)) s (124: a timeout)" | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
