#!/bin/bash
# POS tagger (UD EWT, first 6,000 training sentences, 4 epochs, ratio 0.04 = k 80 of 2,000 gate
# units, per-example top-k, batches of 32 sentences, 1 thread): SBP against MSBP variants.
# usage: run_pos.sh SEED [VARIANT...]; writes experiments/memory_variants/pos-<variant>.seed<SEED>.json
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/src  # this tree, not an installed msbp
seed=$1; shift
common="--task pos --limit-train 6000 --epochs 4 --threads 1 --quiet --seed $seed"
for v in "$@"; do
  case $v in
    dense)      args="--method dense" ;;
    sbp)        args="--method sbp" ;;
    msbp-all)   args="--method msbp --memory-rows all" ;;   # the old behaviour
    msbp)       args="--method msbp" ;;                      # padding-safe (default)
    msbp-a05)   args="--method msbp --memory 0.5" ;;
    msbp-a02)   args="--method msbp --memory 0.2" ;;
    msbp-slot)  args="--method msbp --memory-layout slot" ;;
    msbp-unified) args="--method msbp --selection unified" ;;
    sbp-unified)  args="--method sbp --selection unified" ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  out=experiments/memory_variants/pos-$v.seed$seed.json
  /usr/bin/time -f "$v seed $seed: %e s" python -m msbp train $common $args --out "$out"
done
