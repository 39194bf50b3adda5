#!/usr/bin/env bash
# The LSTM tagger timing on the Intel Xeon (README, "Speed of the LSTM tagger"): WSJ sample,
# 2,500 sentences, 1 epoch, k = 5 of 2,000 gate units, 1 thread, against the nn.LSTM tagger;
# per-example once, unified three times; run from this folder.
set -euo pipefail
msbp compare --task pos --pos-data conll2000 --k 5 --epochs 1 --limit-train 2500 \
  --selection per_example --threads 1 --quiet --out pos-k5-per_example.json | tee pos-k5-per_example.log
for rep in 1 2 3; do
  msbp compare --task pos --pos-data conll2000 --k 5 --epochs 1 --limit-train 2500 \
    --selection unified --threads 1 --quiet --out pos-k5-unified-$rep.json | tee pos-k5-unified-$rep.log
done
