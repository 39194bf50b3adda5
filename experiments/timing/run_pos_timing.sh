#!/usr/bin/env bash
# The README's same-code POS timing: the LSTM tagger (hidden 500) on the first 2,500 WSJ-sample
# sentences, 1 epoch, k = 5 of 2,000 gate units, the dense run through msbp's own layers with
# every unit kept (--dense-impl msbp), 2 threads on a quiet machine; dense, SBP and MSBP in one
# process for each selection.
set -euo pipefail
cd "$(dirname "$0")"
for sel in per_example unified; do
  msbp compare --task pos --pos-data conll2000 --k 5 --epochs 1 --limit-train 2500 \
    --dense-impl msbp --selection "$sel" --threads 2 --quiet \
    --out "pos-wsj-k5-samecode-$sel.json" | tee "pos-wsj-k5-samecode-$sel.log"
done
