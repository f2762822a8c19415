#!/usr/bin/env bash
# The report comparison shown in docs/results.md: dense vs lobster vs serene on LeNet-300,
# both pruned from the dense baseline of bench/baselines.sh, through the `compress` CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/datasets/mnist}
out=bench/results/compare
base=bench/results/baselines
mkdir -p "$out"
common=(--data "mnist:$MNIST" --epochs "${EPOCHS:-120}" --pwe 3 --twt 0.1 --max-error-increase 0.003 -q
        --baseline-report "$base/lenet300-dense.report.json")
compress "$base/lenet300-dense.pt" --method lobster "${common[@]}" --out "$out/lenet300-lobster.onnx" 2> "$out/lenet300-lobster.log"
compress "$base/lenet300-dense.pt" --method serene  "${common[@]}" --out "$out/lenet300-serene.onnx"  2> "$out/lenet300-serene.log"
compress report "$base/lenet300-dense.onnx" --data "mnist:$MNIST" --out "$out/lenet300-dense.report.json" 2> "$out/lenet300-dense.log" > /dev/null
compress compare --format md "$out/lenet300-dense.report.json" "$out/lenet300-lobster.report.json" "$out/lenet300-serene.report.json" \
  | tee "$out/lenet300-compare.md"
