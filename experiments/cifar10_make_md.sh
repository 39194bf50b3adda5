#!/bin/sh
# Rebuild experiments/cifar10.md: the fixed text, the table from the result files, the per-epoch
# gap of the longest run, the findings.
cd "$(dirname "$0")/.." || exit 1
{
    cat experiments/cifar10_head.md
    python experiments/cifar10_render.py
    echo
    echo "Test accuracy after each epoch of \`long10k-e8-r0.25\` (10,000 images, 8 epochs; in"
    echo "brackets the difference to the dense run's accuracy after the same epoch):"
    echo
    python experiments/cifar10_render.py --epochs-of long10k-e8-r0.25
    echo
    cat experiments/cifar10_findings.md
} > experiments/cifar10.md
