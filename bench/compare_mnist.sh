#!/usr/bin/env bash
# The report comparisons shown in docs/results.md: dense vs lobster vs serene, both pruned from
# the dense baseline of bench/baselines.sh, through the `compress` CLI as a user would run it.
#   bench/compare_mnist.sh                     # LeNet-300, 120 epochs per method
#   ARCH=lenet5 EPOCHS=30 bench/compare_mnist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/datasets/mnist}
ARCH=${ARCH:-lenet300}
out=bench/results/compare
base=bench/results/baselines
mkdir -p "$out"
common=(--data "mnist:$MNIST" --epochs "${EPOCHS:-120}" --pwe 3 --twt 0.1 --max-error-increase 0.003 -q
        --baseline-report "$base/$ARCH-dense.report.json")
compress "$base/$ARCH-dense.pt" --method lobster "${common[@]}" --out "$out/$ARCH-lobster.onnx" 2> "$out/$ARCH-lobster.log"
compress "$base/$ARCH-dense.pt" --method serene  "${common[@]}" --out "$out/$ARCH-serene.onnx"  2> "$out/$ARCH-serene.log"
compress report "$base/$ARCH-dense.onnx" --data "mnist:$MNIST" --out "$out/$ARCH-dense.report.json" 2> "$out/$ARCH-dense.log" > /dev/null
compress compare --format md "$out/$ARCH-dense.report.json" "$out/$ARCH-lobster.report.json" "$out/$ARCH-serene.report.json" \
  | tee "$out/$ARCH-compare.md"
