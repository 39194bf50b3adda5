#!/usr/bin/env bash
# The MNIST timings on the Intel Xeon (README, "Reproducing the paper: MNIST", Time), each
# twice, with denormals flushed (the default) and, for the default setting, kept; run from
# this folder. Then the step benchmark, 1 and 2 threads.
set -euo pipefail
for rep in 1 2; do
  msbp compare --task mnist --epochs 1 --threads 1 --selection per_example --quiet --out b10-pe-$rep.json
  msbp compare --task mnist --epochs 1 --threads 1 --selection unified --quiet --out b10-un-$rep.json
  msbp compare --task mnist --epochs 1 --threads 1 --selection unified --batch-size 50 --quiet --out b50-un-$rep.json
  msbp compare --task mnist --epochs 1 --threads 1 --selection per_example --denormals keep --quiet --out b10-pe-keep-$rep.json
done
bench=../../../benchmarks/bench_step.py
python "$bench" --threads 1 --rounds 7
python "$bench" --threads 1 --rounds 7 --batch-size 50
python "$bench" --threads 2 --rounds 7
