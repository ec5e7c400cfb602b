#!/usr/bin/env bash
# The CPU "real run" of the core issue: pretrain a small UNet on Fashion-MNIST (~30 min of 2 CPU
# cores), tune it with ECT for about a tenth of that, and sample/score the teacher and the ECT model
# on the same seeds. Results: runs/cpu-*, benchmarks/results/real_run_*.json, docs/real-run-*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/ectune
$E pretrain --data fashion-mnist --preset fmnist --out runs/cpu-teacher --steps 1400 --set sample_every=700 --no-progress
$E tune --teacher runs/cpu-teacher --out runs/cpu-ect --steps 200 --batch 64 \
    --set optim.lr=3e-4 --set sample.mid_ts=2.5 --set ckpt_every=100 --no-progress
mkdir -p docs benchmarks/results
$E sample --ckpt runs/cpu-teacher --sampler heun --num-steps 18 --n 64 --out docs/real-run-teacher-heun35.png
$E sample --ckpt runs/cpu-ect --steps 1 --n 64 --out docs/real-run-ect-1step.png
$E sample --ckpt runs/cpu-ect --steps 2 --n 64 --out docs/real-run-ect-2step.png
$E eval --ckpt runs/cpu-teacher --sampler heun --num-steps 18 --n 1000 --out benchmarks/results/real_run_teacher_heun35.json
$E eval --ckpt runs/cpu-ect --steps 1 --n 1000 --out benchmarks/results/real_run_ect_1step.json
$E eval --ckpt runs/cpu-ect --steps 2 --n 1000 --out benchmarks/results/real_run_ect_2step.json
