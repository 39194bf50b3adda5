#!/usr/bin/env bash
# The CPU timing table of the README: the paper's MNIST setting (784-500-500-10, batch 10,
# k = 20, memory 0.8, Adam 1e-3), 2 epochs on all 55,000 training images, 2 threads, on a
# quiet machine; dense, SBP and MSBP in one process each time.
set -euo pipefail
cd "$(dirname "$0")"
for sel in unified per_example; do
  msbp compare --task mnist --epochs 2 --threads 2 --selection "$sel" --optimizer lazy_adam \
    --quiet --out "mnist-b10-$sel-lazy.json"
done
msbp compare --task mnist --epochs 2 --threads 2 --selection unified --optimizer adam \
  --quiet --out mnist-b10-unified-adam.json
msbp compare --task mnist --epochs 2 --threads 2 --selection unified --optimizer lazy_adam \
  --batch-size 50 --quiet --out mnist-b50-unified-lazy.json
