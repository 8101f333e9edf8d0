#!/usr/bin/env bash
# GPU check: synthetic 224-px shards; stage 1 with a TResNet-L teacher (random weights, fp16: auto on CUDA);
# stage 2 with a ResNet-50 student from that cache vs label-only vs online KD. Prints views/s
# and images/s ratios, and whole-run wall times (tables also land in benchmarks/results/*.json).
# Budget: < 10 minutes.
#
#   bash benchmarks/gpu_check.sh           # on a GPU machine
#   bash benchmarks/gpu_check.sh --tiny    # the same pipeline at toy size (CPU smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
WORK=$(mktemp -d /tmp/usi-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ "${1:-}" = "--tiny" ]; then
    S1=(--teacher test_resnet --size 32 --images 128 --views 2 --batch 32 --workers 1)
    S2=(--student test_efficientnet --teacher test_resnet --size 32 --batch 16 --images 256 --steps 3 --rounds 1 --whole-rounds 1 --workers 1)
else
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    W=$(( $(nproc) > 12 ? 12 : $(nproc) ))
    S1=(--teacher tresnet_v2_l --size 224 --images 4096 --views 2 --batch 128 --workers "$W" --classes 1000)
    S2=(--student resnet50 --teacher tresnet_v2_l --size 224 --batch 128 --images 8192 --steps 25 --rounds 2 \
        --whole-rounds 2 --workers "$W" --classes 1000)
fi
echo "== stage 1: cache_teacher vs bare teacher forward"
"$PY" benchmarks/stage1_efficiency.py "${S1[@]}" --work "$WORK/s1"
echo "== stage 2: label-only vs cache vs online KD"
"$PY" benchmarks/stage2_overhead.py "${S2[@]}" --work "$WORK/s2"
