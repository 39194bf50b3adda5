#!/usr/bin/env bash
# The README's LSTM tagger timing: WSJ sample, first 2,500 sentences, 1 epoch, k = 5 of 2,000
# gate units, 1 thread; the dense tagger with PyTorch's nn.LSTM and, --dense-impl msbp, through
# msbp's own layers with every unit kept; dense, SBP and MSBP in one process for each.
# Then the parsing timing: the full comparison cut to 2 epochs.
set -euo pipefail
cd "$(dirname "$0")"
for sel in per_example unified; do
  msbp compare --task pos --pos-data conll2000 --k 5 --epochs 1 --limit-train 2500 \
    --selection "$sel" --threads 1 --quiet --out "pos-wsj-k5-nnlstm-$sel.json" \
    | tee "pos-wsj-k5-nnlstm-$sel.log"
  msbp compare --task pos --pos-data conll2000 --k 5 --epochs 1 --limit-train 2500 \
    --dense-impl msbp --selection "$sel" --threads 1 --quiet \
    --out "pos-wsj-k5-samecode-$sel.json" | tee "pos-wsj-k5-samecode-$sel.log"
done
msbp compare --task parse --epochs 2 --threads 1 --quiet --out parse-full-2ep.json \
  | tee parse-full-2ep.log
