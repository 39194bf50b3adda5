#!/bin/sh
# Rebuild experiments/cifar10.md: the fixed text, the table from the result files, the findings.
cd "$(dirname "$0")/.." || exit 1
{ cat experiments/cifar10_head.md; python experiments/cifar10_render.py; echo; cat experiments/cifar10_findings.md; } > experiments/cifar10.md
