#!/usr/bin/env bash
# Train the shipped Fashion-MNIST teacher on one GPU with ectune's own `pretrain`, for about
# TEACHER_SECONDS of training: a short probe run measures images/s, then the budget is set in steps.
# Usage: ECTUNE_DATA=DIR OUT=DIR bash scripts/train_teacher_gpu.sh
set -euo pipefail
: "${OUT:?set OUT to the folder that receives the teacher}"
SECONDS_BUDGET=${TEACHER_SECONDS:-360}
BATCH=${TEACHER_BATCH:-512}
DEVICE=${TEACHER_DEVICE:-cuda}
PROBE_STEPS=${TEACHER_PROBE_STEPS:-150}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ect() { python -m ectune.cli "$@"; }
nvidia-smi -L || true
ect pretrain --preset fmnist --data fashion-mnist --out /tmp/probe --steps "$PROBE_STEPS" --batch "$BATCH" \
    --device "$DEVICE" --no-progress --set log_every=50 --set sample_every=100000
rate=$(python -c "import json; print(json.loads(open('/tmp/probe/log.jsonl').read().splitlines()[-1])['img_per_s'])")
steps=$(python -c "print(int($rate * $SECONDS_BUDGET / $BATCH) // 100 * 100)")
echo "probe: $rate img/s -> $steps steps of batch $BATCH"
start=$(date +%s)
ect pretrain --preset fmnist --data fashion-mnist --out /tmp/teacher --steps "$steps" --batch "$BATCH" \
    --device "$DEVICE" --no-progress --set log_every=100 --set ckpt_every=1000 --set sample_every=100000 \
    --set optim.warmup_steps=200
echo "train_seconds=$(( $(date +%s) - start )) steps=$steps batch=$BATCH"
last=$(ls -d /tmp/teacher/checkpoints/0* | tail -1)
cp "$last/model.safetensors" "$last/train_state.pt" /tmp/teacher/config.json /tmp/teacher/log.jsonl "$OUT/"
cp "$(ls /tmp/teacher/samples/*.png | tail -1)" "$OUT/teacher_heun18.png"
