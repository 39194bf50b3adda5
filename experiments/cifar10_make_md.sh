#!/bin/sh
# Rebuild experiments/cifar10.md: the fixed text, the table from the result files, the per-epoch
# gaps, the findings.
cd "$(dirname "$0")/.." || exit 1
R=experiments/cifar10_results
exists() { for s in "$@"; do [ -f "$R/$s.json" ] && printf '%s ' "$s"; done; }
{
    cat experiments/cifar10_head.md
    python experiments/cifar10_render.py
    echo
    echo "Test accuracy after each epoch, in brackets the difference to the dense run's accuracy"
    echo "after the same epoch. 10,000 images, 8 epochs:"
    echo
    python experiments/cifar10_render.py --epochs-of \
        $(exists long10k-e8-r0.25 long10k-e8-r0.1 long10k-e8-warmup1-r0.1)
    echo
    echo "5,000 images, 4 epochs, MSBP at k/C_out = 0.1 with per-layer changes and a warm-up:"
    echo
    python experiments/cifar10_render.py --epochs-of $(exists ratio0.1 layers-b1-0.5-r0.1 \
        layers-b3-0.25-r0.1 layers-b3-0.5-r0.1 layers-b3dense-r0.1 warmup1-r0.1 \
        warmup1-b3dense-r0.1) | sed 's/ msbp |/ |/g; s/| ratio0.1 sbp |/| sbp 0.1 |/; s/| ratio0.1 |/| msbp 0.1 |/'
    echo
    cat experiments/cifar10_findings.md
} > experiments/cifar10.md
