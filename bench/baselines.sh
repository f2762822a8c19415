#!/usr/bin/env bash
# Dense baselines on real MNIST with the CLI defaults (`--method none`), 10 epochs each.
# Writes ONNX, reports, checkpoints and logs to bench/results/baselines/.
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/datasets/mnist}
out=bench/results/baselines
mkdir -p "$out"
for arch in lenet300 lenet5; do
  start=$(date +%s)
  compress "$arch" --method none --data "mnist:$MNIST" --epochs 10 -q \
    --out "$out/$arch-dense.onnx" --save-checkpoint "$out/$arch-dense.pt" 2> "$out/$arch-dense.log"
  echo "$arch: $(( $(date +%s) - start )) s wall" >> "$out/$arch-dense.log"
done
# A longer LeNet-300 baseline (40 epochs, same recipe) for the pruning runs tagged "dense40".
compress lenet300 --method none --data "mnist:$MNIST" --epochs 40 -q \
  --out "$out/lenet300-dense40.onnx" --save-checkpoint "$out/lenet300-dense40.pt" 2> "$out/lenet300-dense40.log"
# A LeNet-5 baseline trained with augmentation (random shifts of up to 2 pixels), 20 epochs: the
# starting point and teacher of the pruning runs tagged "shift2t".
compress lenet5 --method none --data "mnist:$MNIST" --epochs 20 --shift 2 -q \
  --out "$out/lenet5-dense-shift2.onnx" --save-checkpoint "$out/lenet5-dense-shift2.pt" 2> "$out/lenet5-dense-shift2.log"
