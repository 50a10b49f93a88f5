#!/usr/bin/env bash
# One prepared check for the first GPU this project is lent (at most ~8 minutes on one GPU):
#   1. every CUDA test (pytest -m cuda, sync-debug test included), 2. the whole ops suite on the device's
#   torch build, 3. provetrain parity with TF32 off (the obligation) and on (reported apart),
#   4. bench/step.py --device cuda at 16 x 1M (float32, bfloat16) and on GPT-2 small's parameter list,
#   printing ratios against torch fused+clip and the dispatched ops (launches) per step.
# Run from the repository root with the project installed (pip install -e ".[dev]" over a CUDA torch).
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== $*"; }
run() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }

step "device"
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" || exit 1

step "CUDA tests (skip-mode step under set_sync_debug_mode('error'), clip parity, FALSIFY-TRAIN-003, RNG)"
run timeout 180 pytest -q -p no:cacheprovider -m cuda -rs

step "ops suite on this torch build (multi-tensor path, GradScaler, exact-arithmetic bound)"
run timeout 180 pytest -q -p no:cacheprovider tests/ops -x

step "provetrain parity (TF32 off is the obligation; TF32 on is reported apart)"
run timeout 60 provetrain parity

for args in "--tensors 16 --numel 1000000 --dtype float32" \
            "--tensors 16 --numel 1000000 --dtype bfloat16" \
            "--model gpt2-small --dtype float32" \
            "--model gpt2-small --dtype bfloat16"; do
  step "bench/step.py --device cuda $args"
  run timeout 120 python bench/step.py --device cuda --repeats 20 --flush-mb 512 $args
done
echo
[ "$status" -eq 0 ] && echo "gpu_check: all passed" || echo "gpu_check: FAILURES above"
exit "$status"
