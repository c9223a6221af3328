#!/usr/bin/env bash
# The CUDA checks of issue 25, on a machine with an NVIDIA GPU, in under 8 minutes:
#
#   1. the CUDA tests: MLP training on CUDA (tests/model/test_mlp.py), the fast path on
#      CUDA against the scikit-learn pipeline for every candidate
#      (tests/model/test_fastpath.py), and a real `bentoml serve` with the split executor
#      under CLINML_GPU=1 and CLINML_DEVICE=cuda (tests/integration/test_gpu.py). Each is
#      skipped on a machine without CUDA; here a skip is a failure;
#   2. bench/gpu_bench.py: MLP training and fast-path execution, CPU vs CUDA, written into
#      docs/benchmarks.md.
#
# Run from anywhere: bench/gpu_check.sh. It uses .venv (make venv creates it; on a Linux
# machine with a GPU, PyPI's torch==2.13.0 is the CUDA build). Logs, the tests' JUnit XML
# and the updated docs/benchmarks.md are also copied to $OUT when it is set (a CI job's
# artifact folder). Exit status: 0 all passed; 1 a test failed or was skipped; 2 no
# .venv; 3 no CUDA device visible to torch; 124 a step ran past its time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [[ ! -x $PY ]]; then
    echo "gpu_check: no .venv here; run 'make venv' first" >&2
    exit 2
fi
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device ($($PY -c 'import torch; print(torch.__version__)'));" \
        "on a GPU machine, install the CUDA build of torch==2.13.0 into .venv" >&2
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L >&2; fi
    exit 3
fi
{ nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: not found'; } | tee "$OUT/gpu.txt"
$PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' | tee -a "$OUT/gpu.txt"

started=$SECONDS
timeout 330 $PY -m pytest -p no:cacheprovider -rs -q \
    --junitxml="$OUT/gpu-tests.xml" \
    tests/model/test_mlp.py::test_cuda_training_learns_like_the_cpu_and_leaves_a_cpu_network \
    tests/model/test_fastpath.py::test_cuda_matches_the_pipeline \
    tests/integration/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}
echo "gpu_check: tests took $((SECONDS - started)) s (exit $tests)"
skipped=$($PY -c 'import sys, xml.etree.ElementTree as t
r = t.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(s.get("skipped"))' "$OUT/gpu-tests.xml" 2>/dev/null || echo "?")
if [[ $tests -eq 0 && $skipped != 0 ]]; then
    echo "gpu_check: $skipped CUDA test(s) skipped on a CUDA machine" >&2
    tests=1
fi

started=$SECONDS
timeout 150 $PY bench/gpu_bench.py 2>&1 | tee "$OUT/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: benchmark took $((SECONDS - started)) s (exit $bench)"
cp docs/benchmarks.md "$OUT/benchmarks.md"

if [[ $tests -ne 0 ]]; then exit "$tests"; fi
exit "$bench"
