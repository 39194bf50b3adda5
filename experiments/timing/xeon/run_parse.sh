#!/usr/bin/env bash
# The parsing timing on the Intel Xeon (README, "Reproducing the paper: parsing"): the full
# comparison cut to 2 epochs, 1 thread, three times; run from this folder (parse-2ep-*-pow.json:
# the same before the parser's cube had its own backward).
set -euo pipefail
for rep in 1 2 3; do
  msbp compare --task parse --epochs 2 --threads 1 --quiet --out parse-2ep-$rep.json | tee parse-2ep-$rep.log
done
