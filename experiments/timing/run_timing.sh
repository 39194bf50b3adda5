#!/usr/bin/env bash
# The README's MNIST timing table: the paper's setting (784-500-500-10, batch 10, k = 20,
# memory 0.8, the mnist task's default optimizer lazy_adam), 1 epoch on all 55,000 training
# images, 1 thread; dense, SBP and MSBP in one process each time.
set -euo pipefail
cd "$(dirname "$0")"
for sel in per_example unified; do
  msbp compare --task mnist --epochs 1 --threads 1 --selection "$sel" --quiet \
    --out "mnist-b10-$sel.json" | tee "mnist-b10-$sel.log"
done
msbp compare --task mnist --epochs 1 --threads 1 --selection unified --batch-size 50 --quiet \
  --out mnist-b50-unified.json | tee mnist-b50-unified.log
