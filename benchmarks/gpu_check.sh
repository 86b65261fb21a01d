#!/usr/bin/env bash
# The GPU checks of this repository in one short run, for the minutes a GPU machine is lent.
#
# 1. The CUDA tests, where pytest and hypothesis are installed: the whole pipeline, the
#    `cudagraph` backend and a Newton block without synchronization against the CPU
#    (tests/test_accelerator.py), and the compiled Triton kernels (tests/kernels).
# 2. Every GPU figure of issue 16: benchmarks/bench_gpu.py (this script's arguments go to it).
#
# The lent machines have no package index: wheels a machine lacks travel in .device/ (ignored
# by git through .git/info/exclude) and are installed first without dependencies, e.g.
#   pip download captum==0.9.0 hypothesis --no-deps -d .device
# Usage: bash benchmarks/gpu_check.sh [bench_gpu.py options]
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".device/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-deps .device/*.whl
fi
export CAPTUM_EFFATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONPATH=.
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
status=0
if python3 -c "import pytest, hypothesis" 2>/dev/null; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_accelerator.py tests/kernels \
        || status=$?
else
    echo "pytest or hypothesis is missing: the CUDA tests are skipped (add their wheels to .device/)"
fi
timeout 300 python3 benchmarks/bench_gpu.py "$@" || status=$?
exit "$status"
